//! Evaluation rounds, and runs resumed around them.

use super::*;

pub(super) fn eval_report(round: u32, pos: Vec<u64>, neg: Vec<u64>) -> EvalReport {
    EvalReport {
        round,
        examples: pos.iter().sum::<u64>() + neg.iter().sum::<u64>(),
        positives: pos.iter().sum(),
        loss: 0.5,
        histogram: fedslm_protocol::ScoreHistogram {
            positive: pos,
            negative: neg,
        },
    }
}

/// The evaluate tasks of `acts`: (centre, task id, fold) for each.
pub(super) fn evaluations(acts: &[Action]) -> Vec<(String, TaskId, Option<Fold>)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SendEvaluate { task, to } => Some(
                to.iter()
                    .map(|(c, t)| (c.to_string(), *t, task.fold))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect()
}

fn evaluating(every: u32, rounds: u32) -> RoundSettings {
    RoundSettings {
        rounds,
        fold: Fold::new(1, 5, 3),
        evaluation: EvaluationSettings {
            bins: 4,
            every,
            adapt_batch_norm: false,
        },
        ..settings(3)
    }
}

/// Runs round `round` with every training centre answering the same model.
fn train_round(m: &mut Coordinator, acts: &[Action], round: u32, t: Instant) -> Vec<Action> {
    for (c, task) in sent(acts) {
        answer(m, &c, task, round, model(&[1.0; 4], 1.0), 10, t);
    }
    actions(m, t)
}

#[test]
fn the_last_round_is_evaluated_everywhere_before_the_run_finishes() {
    let t0 = Instant::now();
    let mut m = machine(evaluating(0, 2));
    connect_all(&mut m, t0);
    let acts = actions(&mut m, t0);
    let Some(Action::SendFit { task, .. }) = acts.last() else {
        panic!("{acts:?}")
    };
    assert_eq!(
        task.fold,
        Fold::new(1, 5, 3),
        "training leaves the fold out"
    );
    let acts = train_round(&mut m, &acts, 1, t0);
    assert!(
        evaluations(&acts).is_empty(),
        "only the last round: {acts:?}"
    );
    let acts = train_round(&mut m, &acts, 2, t0);
    assert!(committed(&acts).is_some());
    assert!(!acts.iter().any(|a| matches!(a, Action::Finish(_))));
    let evals = evaluations(&acts);
    let folds: BTreeMap<String, Option<Fold>> =
        evals.iter().map(|(c, _, f)| (c.clone(), *f)).collect();
    assert_eq!(
        folds["a"],
        Fold::new(1, 5, 3),
        "training centres: their fold"
    );
    assert_eq!(folds["x"], None, "the validator: its whole cohort");
    assert_eq!(folds.len(), 4);
    let task = |c: &str| evals.iter().find(|e| e.0 == c).unwrap().1;
    let report = |m: &mut Coordinator, c: &str, r: EvalReport| {
        m.handle(
            Input::EvalAnswered {
                center: id(c),
                task: task(c),
                report: r,
            },
            t0,
        )
    };
    // A report with the wrong number of bins is refused and the centre counts as missing.
    report(&mut m, "c", eval_report(2, vec![1, 1], vec![1, 1]));
    assert!(matches!(
        actions(&mut m, t0).as_slice(),
        [Action::Refuse {
            refusal: UpdateRefusal::BadReport(_),
            ..
        }]
    ));
    report(
        &mut m,
        "a",
        eval_report(2, vec![0, 0, 1, 2], vec![2, 1, 0, 0]),
    );
    report(
        &mut m,
        "b",
        eval_report(2, vec![0, 1, 0, 1], vec![1, 1, 1, 0]),
    );
    report(
        &mut m,
        "x",
        eval_report(2, vec![0, 0, 0, 3], vec![3, 0, 0, 0]),
    );
    let acts = actions(&mut m, t0);
    let Some(Action::StoreEvaluation(e)) = acts
        .iter()
        .find(|a| matches!(a, Action::StoreEvaluation(_)))
    else {
        panic!("{acts:?}")
    };
    assert_eq!(e.round, 2);
    assert_eq!(e.centers.len(), 3);
    assert_eq!(e.missing.len(), 1);
    let internal = e.pooled(Role::Train).unwrap();
    assert_eq!((internal.n_positive(), internal.n_negative()), (5, 6));
    assert_eq!(e.pooled(Role::Validate).unwrap().delong().unwrap().auc, 1.0);
    assert!(matches!(
        acts.last(),
        Some(Action::Finish(Outcome::Completed { rounds: 2, .. }))
    ));
}

#[test]
fn evaluation_every_round_and_a_silent_center_at_the_deadline() {
    let t0 = Instant::now();
    let mut m = machine(evaluating(1, 2));
    connect_all(&mut m, t0);
    let acts = actions(&mut m, t0);
    let acts = train_round(&mut m, &acts, 1, t0);
    let evals = evaluations(&acts);
    assert_eq!(evals.len(), 4, "after round 1 too");
    for (c, task, _) in &evals[..3] {
        m.handle(
            Input::EvalAnswered {
                center: id(c),
                task: *task,
                report: eval_report(1, vec![0, 0, 1, 1], vec![1, 1, 0, 0]),
            },
            t0,
        );
    }
    assert_eq!(m.poll_timeout(), Some(t0 + MINUTE));
    m.handle_timeout(t0 + MINUTE);
    let acts = actions(&mut m, t0);
    assert!(acts.iter().any(|a| matches!(a, Action::Cancel { .. })));
    let Some(Action::StoreEvaluation(e)) = acts
        .iter()
        .find(|a| matches!(a, Action::StoreEvaluation(_)))
    else {
        panic!("{acts:?}")
    };
    assert_eq!(
        e.missing,
        vec![(id(&evals[3].0), "no report before the deadline".to_string())]
    );
    assert!(matches!(acts.last(), Some(Action::SendFit { task, .. }) if task.round == 2));
}

#[test]
fn a_run_resumed_before_its_last_evaluation_was_stored_evaluates_first() {
    let t0 = Instant::now();
    let saved = model(&[1.0; 4], 1.0);
    let mut m = Coordinator::resume(
        evaluating(0, 2),
        roles(),
        model(&[0.0; 4], 1.0),
        &[],
        Committed {
            round: 2,
            global: saved.clone(),
            newton_history: vec![],
            evaluated: false,
        },
    )
    .unwrap();
    assert!(!m.is_finished());
    connect_all(&mut m, t0);
    let acts = actions(&mut m, t0);
    assert!(
        !acts.iter().any(|a| matches!(a, Action::SendFit { .. })),
        "{acts:?}"
    );
    let evals = evaluations(&acts);
    assert_eq!(evals.len(), 4);
    for (c, task, _) in &evals {
        m.handle(
            Input::EvalAnswered {
                center: id(c),
                task: *task,
                report: eval_report(2, vec![0, 0, 1, 1], vec![1, 1, 0, 0]),
            },
            t0,
        );
    }
    let acts = actions(&mut m, t0);
    assert!(matches!(
        acts.last(),
        Some(Action::Finish(Outcome::Completed { rounds: 2, weights, .. })) if **weights == saved
    ));
    // Evaluated already: it ends at once.
    let done = Coordinator::resume(
        evaluating(0, 2),
        roles(),
        model(&[0.0; 4], 1.0),
        &[],
        Committed {
            round: 2,
            global: saved,
            newton_history: vec![],
            evaluated: true,
        },
    )
    .unwrap();
    assert!(done.is_finished());
}

#[test]
fn a_resumed_fedavg_run_goes_on_from_its_checkpoint_or_ends_at_once() {
    let t0 = Instant::now();
    let saved = model(&[1.0, 2.0, 3.0, 4.0], 2.0);
    let mut m = Coordinator::resume(
        settings(3),
        roles(),
        model(&[0.0; 4], 1.0),
        &[],
        Committed {
            round: 1,
            global: saved.clone(),
            newton_history: vec![],
            evaluated: true,
        },
    )
    .unwrap();
    assert_eq!(m.committed(), 1);
    connect_all(&mut m, t0);
    let acts = actions(&mut m, t0);
    let Some(Action::SendFit { task, .. }) = acts.last() else {
        panic!("{acts:?}")
    };
    assert_eq!(task.round, 2);
    assert_eq!(task.weights, saved);
    assert_eq!(
        task.seed,
        round_seed(7, 2),
        "the uninterrupted run's seed for round 2"
    );

    let mut done = Coordinator::resume(
        settings(3),
        roles(),
        model(&[0.0; 4], 1.0),
        &[],
        Committed {
            round: 2,
            global: saved.clone(),
            newton_history: vec![],
            evaluated: true,
        },
    )
    .unwrap();
    assert!(done.is_finished());
    assert!(matches!(
        actions(&mut done, t0).as_slice(),
        [Action::Finish(Outcome::Completed { rounds: 2, weights, fit: None })] if **weights == saved
    ));

    let other = Weights::from_tensors(vec![Tensor::from_f32(
        "x",
        vec![1],
        TensorRole::Parameter,
        &[0.0],
    )
    .unwrap()])
    .unwrap();
    let err = Coordinator::resume(
        settings(3),
        roles(),
        model(&[0.0; 4], 1.0),
        &[],
        Committed {
            round: 1,
            global: other,
            newton_history: vec![],
            evaluated: true,
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("the last checkpoint"), "{err}");
}
