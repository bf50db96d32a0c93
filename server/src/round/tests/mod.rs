//! The round machine driven with a fake clock, one sentence per behaviour.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedslm_metrics::{fit_logistic, logistic_stats, LogisticStats};
use fedslm_protocol::clinical::{newton_weights, COEFFICIENTS, COVARIANCE};
use fedslm_protocol::{
    CenterId, DType, EvalReport, FitResult, Fold, LocalObjective, ModelKind, Role, Tensor,
    TensorRole, Weights,
};

use super::fit::clinical_weights;
use super::*;
use crate::aggregate::UpdateRefusal;

const MINUTE: Duration = Duration::from_secs(60);

fn id(s: &str) -> CenterId {
    CenterId::new(s).unwrap()
}

fn model(w: &[f32], stat: f32) -> Weights {
    Weights::from_tensors(vec![
        Tensor::from_f32("conv.weight", vec![2, 2], TensorRole::Parameter, w).unwrap(),
        Tensor::from_f32(
            "bn.running_var",
            vec![1],
            TensorRole::BatchNormStatistic,
            &[stat],
        )
        .unwrap(),
    ])
    .unwrap()
}

fn settings(quorum: usize) -> RoundSettings {
    RoundSettings {
        model: ModelKind::Mri,
        rounds: 2,
        local_epochs: 1,
        learning_rate: 0.01,
        batch_size: 16,
        quorum,
        deadline: MINUTE,
        start_grace: Duration::from_secs(10),
        retries: 1,
        strategy: Strategy::FedAvg,
        norm_bound: Some(10.0),
        seed: 7,
        fold: None,
        // The machine's evaluation rounds have their own tests.
        evaluation: EvaluationSettings { bins: 0, every: 0 },
    }
}

fn roles() -> BTreeMap<CenterId, Role> {
    [
        ("a", Role::Train),
        ("b", Role::Train),
        ("c", Role::Train),
        ("x", Role::Validate),
    ]
    .into_iter()
    .map(|(c, r)| (id(c), r))
    .collect()
}

fn machine(settings: RoundSettings) -> Coordinator {
    Coordinator::new(settings, roles(), model(&[0.0; 4], 1.0), &[]).unwrap()
}

fn connect_all(m: &mut Coordinator, now: Instant) {
    for (n, c) in ["a", "b", "x", "c"].into_iter().enumerate() {
        m.handle(
            Input::Connected {
                center: id(c),
                connection: n as u64,
            },
            now,
        );
    }
}

/// Every action queued, the store confirming each commit and evaluation at `now`, as a store that
/// never fails would.
fn actions(m: &mut Coordinator, now: Instant) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let batch: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
        if batch.is_empty() {
            return all;
        }
        let stored: Vec<Input> = batch
            .iter()
            .filter_map(|a| match a {
                Action::CommitRound { record, .. } => Some(Input::RoundStored {
                    round: record.round,
                }),
                Action::StoreEvaluation(e) => Some(Input::EvaluationStored { round: e.round }),
                _ => None,
            })
            .collect();
        all.extend(batch);
        for input in stored {
            m.handle(input, now);
        }
    }
}

/// The task ids of the last SendFit in `acts`, by centre.
fn sent(acts: &[Action]) -> BTreeMap<String, TaskId> {
    acts.iter()
        .rev()
        .find_map(|a| match a {
            Action::SendFit { to, .. } => {
                Some(to.iter().map(|(c, t)| (c.to_string(), *t)).collect())
            }
            _ => None,
        })
        .expect("a SendFit")
}

fn answer(
    m: &mut Coordinator,
    c: &str,
    task: TaskId,
    round: u32,
    w: Weights,
    n: u64,
    now: Instant,
) {
    m.handle(
        Input::FitAnswered {
            center: id(c),
            task,
            result: FitResult {
                round,
                weights: w,
                examples: n,
                train_loss: 0.5,
            },
        },
        now,
    );
}

/// A committed round's record with its model.
#[derive(Debug, Clone)]
struct CommittedRound {
    record: RoundRecord,
    weights: Arc<Weights>,
}

impl std::ops::Deref for CommittedRound {
    type Target = RoundRecord;
    fn deref(&self) -> &RoundRecord {
        &self.record
    }
}

fn committed(acts: &[Action]) -> Option<CommittedRound> {
    acts.iter().find_map(|a| match a {
        Action::CommitRound { record, weights } => Some(CommittedRound {
            record: record.clone(),
            weights: weights.clone(),
        }),
        _ => None,
    })
}

fn conv(w: &Weights) -> Vec<f32> {
    w.require("conv.weight").unwrap().to_f32_vec()
}

#[test]
fn a_round_starts_at_quorum_and_commits_as_soon_as_every_centre_has_answered() {
    let t0 = Instant::now();
    let mut m = machine(settings(3));
    m.handle(
        Input::Connected {
            center: id("a"),
            connection: 1,
        },
        t0,
    );
    m.handle(
        Input::Connected {
            center: id("x"),
            connection: 2,
        },
        t0,
    );
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 3,
        },
        t0,
    );
    assert!(actions(&mut m, t0).is_empty(), "two of three: no round yet");
    assert_eq!(m.poll_timeout(), None);
    m.handle(
        Input::Connected {
            center: id("c"),
            connection: 4,
        },
        t0,
    );
    let acts = actions(&mut m, t0);
    let tasks = sent(&acts);
    assert_eq!(
        tasks.keys().collect::<Vec<_>>(),
        ["a", "b", "c"],
        "the validator never trains"
    );
    let Action::SendFit { task, .. } = &acts[0] else {
        panic!()
    };
    assert_eq!((task.round, task.local_epochs, task.batch_size), (1, 1, 16));
    assert_eq!(task.objective, LocalObjective::Plain);
    assert_eq!(m.poll_timeout(), Some(t0 + MINUTE));

    let t1 = t0 + Duration::from_secs(5);
    answer(
        &mut m,
        "a",
        tasks["a"],
        1,
        model(&[1.0, 2.0, 3.0, 4.0], 2.0),
        10,
        t1,
    );
    answer(
        &mut m,
        "b",
        tasks["b"],
        1,
        model(&[3.0, 2.0, 1.0, 0.0], 4.0),
        30,
        t1,
    );
    assert!(committed(&actions(&mut m, t1)).is_none());
    let t2 = t0 + Duration::from_secs(9);
    answer(&mut m, "c", tasks["c"], 1, model(&[2.0; 4], 6.0), 60, t2);
    let acts = actions(&mut m, t2);
    let record = committed(&acts).expect("committed before the deadline");
    assert_eq!(record.round, 1);
    assert_eq!(record.duration, Duration::from_secs(9));
    assert_eq!(record.contributions.len(), 3);
    assert!(record.silent.is_empty() && record.refused.is_empty());
    // (10 * [1,2,3,4] + 30 * [3,2,1,0] + 60 * [2,2,2,2]) / 100
    assert_eq!(conv(&record.weights), vec![2.2, 2.0, 1.8, 1.6]);
    assert_eq!(
        record
            .weights
            .require("bn.running_var")
            .unwrap()
            .to_f32_vec(),
        vec![5.0]
    );
    // Round 2 goes out at once, from the new global model.
    let Some(Action::SendFit { task, .. }) = acts.last() else {
        panic!("{acts:?}")
    };
    assert_eq!(task.round, 2);
    assert_eq!(conv(&task.weights), vec![2.2, 2.0, 1.8, 1.6]);
    assert_ne!(task.seed, round_seed(7, 1));
    assert_eq!(m.poll_timeout(), Some(t2 + MINUTE));
}

#[test]
fn the_last_round_finishes_the_run() {
    let t0 = Instant::now();
    let mut m = machine(RoundSettings {
        rounds: 1,
        ..settings(3)
    });
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    for c in ["a", "b", "c"] {
        answer(&mut m, c, tasks[c], 1, model(&[1.0; 4], 1.0), 5, t0);
    }
    let acts = actions(&mut m, t0);
    assert!(matches!(
        acts.last(),
        Some(Action::Finish(Outcome::Completed {
            rounds: 1,
            fit: None,
            ..
        }))
    ));
    assert!(m.is_finished());
    assert_eq!(m.poll_timeout(), None);
    // An answer after the end is refused as late.
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 5, t0);
    assert!(matches!(
        actions(&mut m, t0)[..],
        [Action::Refuse {
            refusal: UpdateRefusal::Late { round: 1 },
            ..
        }]
    ));
}

#[test]
fn a_centre_that_never_answers_is_dropped_at_the_deadline_and_the_quorum_commits() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
    answer(&mut m, "b", tasks["b"], 1, model(&[4.0; 4], 1.0), 20, t0);
    m.handle_timeout(t0 + MINUTE - Duration::from_millis(1));
    assert!(actions(&mut m, t0)
        .iter()
        .all(|a| matches!(a, Action::Accept { .. })));
    m.handle_timeout(t0 + MINUTE);
    let acts = actions(&mut m, t0);
    assert_eq!(
        acts[0],
        Action::Cancel {
            center: id("c"),
            task: tasks["c"]
        }
    );
    let record = committed(&acts).unwrap();
    assert_eq!(record.silent, vec![id("c")]);
    assert_eq!(conv(&record.weights), vec![3.0; 4]);
    // c's answer to round 1 arrives during round 2: late.
    answer(
        &mut m,
        "c",
        tasks["c"],
        1,
        model(&[9.0; 4], 1.0),
        10,
        t0 + MINUTE,
    );
    assert!(matches!(
        actions(&mut m, t0)[..],
        [Action::Refuse {
            refusal: UpdateRefusal::Late { round: 1 },
            ..
        }]
    ));
}

#[test]
fn a_deadline_with_too_few_answers_retries_the_round_then_fails_naming_the_silent() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
    m.handle_timeout(t0 + MINUTE);
    let acts = actions(&mut m, t0);
    assert!(committed(&acts).is_none());
    let retry = sent(&acts);
    assert_eq!(retry.len(), 3);
    let Some(Action::SendFit { task, .. }) = acts.last() else {
        panic!()
    };
    assert_eq!(task.round, 1, "the same round again");
    assert_eq!(
        conv(&task.weights),
        vec![0.0; 4],
        "from the same global model"
    );
    answer(
        &mut m,
        "b",
        retry["b"],
        1,
        model(&[1.0; 4], 1.0),
        10,
        t0 + MINUTE,
    );
    m.handle_timeout(t0 + 2 * MINUTE);
    let acts = actions(&mut m, t0);
    let Some(Action::Finish(Outcome::Failed { rounds: 0, reason })) = acts.last() else {
        panic!("{acts:?}")
    };
    assert!(
        reason.contains("1 of the 2 answers needed") && reason.contains("no answer from a, c"),
        "{reason}"
    );
}

#[test]
fn a_centre_that_disconnects_mid_round_is_not_waited_for_and_a_stale_disconnect_is_ignored() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    // b reconnects (connection 9); the old connection's end arrives afterwards and changes nothing.
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 9,
        },
        t0,
    );
    m.handle(
        Input::Disconnected {
            center: id("b"),
            connection: 1,
        },
        t0,
    );
    assert_eq!(m.connected_training(), 3);
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
    answer(&mut m, "b", tasks["b"], 1, model(&[1.0; 4], 1.0), 10, t0);
    m.handle(
        Input::Disconnected {
            center: id("c"),
            connection: 3,
        },
        t0,
    );
    let acts = actions(&mut m, t0);
    let record = committed(&acts).expect("no need to wait for the deadline");
    assert_eq!(record.silent, vec![id("c")]);
    assert_eq!(m.connected_training(), 2);
}

#[test]
fn fedprox_sends_mu_and_a_failed_centre_is_recorded() {
    let t0 = Instant::now();
    let mut m = machine(RoundSettings {
        strategy: Strategy::FedProx { mu: 0.01 },
        ..settings(2)
    });
    connect_all(&mut m, t0);
    let acts = actions(&mut m, t0);
    let Action::SendFit { task, .. } = &acts[0] else {
        panic!()
    };
    assert_eq!(task.objective, LocalObjective::Proximal { mu: 0.01 });
    let tasks = sent(&acts);
    m.handle(
        Input::TaskFailed {
            center: id("c"),
            task: tasks["c"],
            reason: "out of memory".into(),
        },
        t0,
    );
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
    answer(&mut m, "b", tasks["b"], 1, model(&[1.0; 4], 1.0), 10, t0);
    let record = committed(&actions(&mut m, t0)).unwrap();
    assert_eq!(record.refused, vec![(id("c"), "out of memory".to_string())]);
}

/// Every check: c misbehaves one way, is told why, and the round commits a and b's mean.
#[test]
fn each_check_refuses_the_misbehaving_centre_and_the_round_completes_with_the_honest_mean() {
    type Misbehave = fn(&mut Coordinator, &BTreeMap<String, TaskId>, Instant) -> (String, TaskId);
    type Expect = fn(&UpdateRefusal) -> bool;
    let honest = model(&[1.0; 4], 1.0);
    let cases: Vec<(&str, Misbehave, Expect)> = vec![
        (
            "missing tensor",
            |m, t, now| {
                let w =
                    Weights::from_tensors(model(&[1.0; 4], 1.0).tensors()[..1].to_vec()).unwrap();
                answer(m, "c", t["c"], 1, w, 10, now);
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::Missing(n) if n == "bn.running_var"),
        ),
        (
            "extra tensor",
            |m, t, now| {
                let mut v = model(&[1.0; 4], 1.0).tensors().to_vec();
                v.push(Tensor::from_f32("spy", vec![1], TensorRole::Parameter, &[0.0]).unwrap());
                answer(
                    m,
                    "c",
                    t["c"],
                    1,
                    Weights::from_tensors(v).unwrap(),
                    10,
                    now,
                );
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::Unexpected(n) if n == "spy"),
        ),
        (
            "shape",
            |m, t, now| {
                let w = Weights::from_tensors(vec![
                    Tensor::from_f32("conv.weight", vec![4], TensorRole::Parameter, &[1.0; 4])
                        .unwrap(),
                    model(&[1.0; 4], 1.0).tensors()[1].clone(),
                ])
                .unwrap();
                answer(m, "c", t["c"], 1, w, 10, now);
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::Shape { .. }),
        ),
        (
            "dtype",
            |m, t, now| {
                let w = Weights::from_tensors(vec![
                    Tensor::from_f32_as(
                        "conv.weight",
                        vec![2, 2],
                        TensorRole::Parameter,
                        &[1.0; 4],
                        DType::BF16,
                    )
                    .unwrap(),
                    model(&[1.0; 4], 1.0).tensors()[1].clone(),
                ])
                .unwrap();
                answer(m, "c", t["c"], 1, w, 10, now);
                ("c".into(), t["c"])
            },
            |r| {
                matches!(
                    r,
                    UpdateRefusal::DType {
                        got: DType::BF16,
                        ..
                    }
                )
            },
        ),
        (
            "role",
            |m, t, now| {
                let w = Weights::from_tensors(vec![
                    model(&[1.0; 4], 1.0).tensors()[0].clone(),
                    Tensor::from_f32("bn.running_var", vec![1], TensorRole::Parameter, &[1.0])
                        .unwrap(),
                ])
                .unwrap();
                answer(m, "c", t["c"], 1, w, 10, now);
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::Role { .. }),
        ),
        (
            "non-finite",
            |m, t, now| {
                answer(
                    m,
                    "c",
                    t["c"],
                    1,
                    model(&[1.0, f32::NAN, 1.0, 1.0], 1.0),
                    10,
                    now,
                );
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::NonFinite { index: 1, .. }),
        ),
        (
            "norm bound",
            |m, t, now| {
                answer(m, "c", t["c"], 1, model(&[100.0; 4], 1.0), 10, now);
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::Norm { .. }),
        ),
        (
            "wrong round",
            |m, t, now| {
                answer(m, "c", t["c"], 7, model(&[1.0; 4], 1.0), 10, now);
                ("c".into(), t["c"])
            },
            |r| {
                matches!(
                    r,
                    UpdateRefusal::WrongRound {
                        got: 7,
                        expected: 1
                    }
                )
            },
        ),
        (
            "no examples",
            |m, t, now| {
                answer(m, "c", t["c"], 1, model(&[1.0; 4], 1.0), 0, now);
                ("c".into(), t["c"])
            },
            |r| matches!(r, UpdateRefusal::NoExamples),
        ),
        (
            "someone else's task",
            |m, t, now| {
                answer(m, "c", t["a"], 1, model(&[50.0; 4], 1.0), 10, now);
                ("c".into(), t["a"])
            },
            |r| matches!(r, UpdateRefusal::NotYours { owner } if owner == "a"),
        ),
        (
            "unasked",
            |m, _, now| {
                let task = m.unsolicited_task();
                answer(m, "c", task, 1, model(&[50.0; 4], 1.0), 10, now);
                ("c".into(), task)
            },
            |r| matches!(r, UpdateRefusal::NoTask),
        ),
        (
            "validation centre",
            |m, _, now| {
                let task = m.unsolicited_task();
                answer(m, "x", task, 1, model(&[50.0; 4], 1.0), 10, now);
                ("x".into(), task)
            },
            |r| matches!(r, UpdateRefusal::NotTraining),
        ),
    ];
    for (what, misbehave, expected) in cases {
        let t0 = Instant::now();
        let mut m = machine(settings(2));
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m, t0));
        let (who, task) = misbehave(&mut m, &tasks, t0);
        let acts = actions(&mut m, t0);
        let refusal = acts
            .iter()
            .find_map(|a| match a {
                Action::Refuse {
                    center,
                    task: t,
                    refusal,
                } if center.as_str() == who && *t == task => Some(refusal),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{what}: no refusal in {acts:?}"));
        assert!(expected(refusal), "{what}: {refusal}");
        answer(&mut m, "a", tasks["a"], 1, honest.clone(), 10, t0);
        answer(&mut m, "b", tasks["b"], 1, model(&[3.0; 4], 1.0), 30, t0);
        m.handle_timeout(t0 + MINUTE);
        let acts = actions(&mut m, t0);
        let record = committed(&acts).unwrap_or_else(|| panic!("{what}: {acts:?}"));
        assert_eq!(conv(&record.weights), vec![2.5; 4], "{what}");
        assert_eq!(record.contributions.len(), 2, "{what}");
    }
}

#[test]
fn only_the_first_answer_of_a_centre_counts() {
    let t0 = Instant::now();
    let mut m = machine(settings(3));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    answer(&mut m, "c", tasks["c"], 1, model(&[2.0; 4], 1.0), 10, t0);
    answer(&mut m, "c", tasks["c"], 1, model(&[90.0; 4], 1.0), 10, t0);
    let acts = actions(&mut m, t0);
    assert!(
        matches!(
            acts[..],
            [
                Action::Accept { .. },
                Action::Refuse {
                    refusal: UpdateRefusal::Duplicate { round: 1 },
                    ..
                }
            ]
        ),
        "{acts:?}"
    );
    answer(&mut m, "a", tasks["a"], 1, model(&[2.0; 4], 1.0), 10, t0);
    answer(&mut m, "b", tasks["b"], 1, model(&[2.0; 4], 1.0), 10, t0);
    let acts = actions(&mut m, t0);
    assert_eq!(conv(&committed(&acts).unwrap().weights), vec![2.0; 4]);
}

#[test]
fn settings_that_cannot_work_are_refused() {
    let new = |s: RoundSettings, names: &[&str]| {
        let init = clinical_weights(&[0.0], None);
        Coordinator::new(s, roles(), init, names).err()
    };
    assert_eq!(
        new(settings(4), &[]),
        Some(SetupError::Quorum {
            quorum: 4,
            training: 3
        })
    );
    assert_eq!(new(settings(0), &[]), Some(SetupError::ZeroQuorum));
    assert_eq!(
        new(
            RoundSettings {
                model: ModelKind::Clinical,
                ..settings(1)
            },
            &["intercept"]
        ),
        Some(SetupError::ClinicalNeedsNewton("fedavg"))
    );
    assert_eq!(
        new(
            RoundSettings {
                strategy: Strategy::Newton,
                ..settings(1)
            },
            &[]
        ),
        Some(SetupError::NewtonNeedsClinical(ModelKind::Mri))
    );
    assert_eq!(
        new(
            RoundSettings {
                model: ModelKind::Clinical,
                strategy: Strategy::Newton,
                ..settings(1)
            },
            &["intercept", "age"]
        ),
        Some(SetupError::Coefficients(2))
    );
}

/// Runs a federated Newton machine with these centres' data to its end: the outcome and each committed round.
fn drive_newton(
    mut m: Coordinator,
    centres: &[(Vec<f64>, Vec<bool>)],
) -> (Outcome, Vec<CommittedRound>) {
    let t0 = Instant::now();
    connect_all(&mut m, t0);
    let mut history = Vec::new();
    loop {
        let acts = actions(&mut m, t0);
        history.extend(committed(&acts));
        if let Some(Action::Finish(o)) = acts.iter().find(|a| matches!(a, Action::Finish(_))) {
            return (o.clone(), history);
        }
        let Some(Action::SendFit { task, to }) = acts
            .iter()
            .rev()
            .find(|a| matches!(a, Action::SendFit { .. }))
        else {
            panic!("{acts:?}")
        };
        assert_eq!(task.objective, LocalObjective::NewtonStep);
        let beta = task.weights.require(COEFFICIENTS).unwrap().to_f64_vec();
        for ((center, tid), (x, y)) in to.iter().zip(centres) {
            let s = logistic_stats(x, y, None, &beta).unwrap();
            answer(
                &mut m,
                center.as_str(),
                *tid,
                task.round,
                newton_weights(&s).unwrap(),
                s.n,
                t0,
            );
        }
    }
}

fn eval_report(round: u32, pos: Vec<u64>, neg: Vec<u64>) -> EvalReport {
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
fn evaluations(acts: &[Action]) -> Vec<(String, TaskId, Option<Fold>)> {
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
        evaluation: EvaluationSettings { bins: 4, every },
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
    assert_eq!(e.centres.len(), 3);
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
fn evaluation_every_round_and_a_silent_centre_at_the_deadline() {
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

/// Three centres' patients; the federated Newton fit must be the pooled fit.
#[test]
fn federated_newton_reaches_the_pooled_fit() {
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut centres: Vec<(Vec<f64>, Vec<bool>)> = Vec::new();
    for n in [40, 70, 25] {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let a = next() * 2.0 - 1.0;
            let b = if next() < 0.4 { 1.0 } else { 0.0 };
            let eta = -0.5 + 1.2 * a + 0.9 * b;
            x.extend([1.0, a, b]);
            y.push(next() < 1.0 / (1.0 + (-eta).exp()));
        }
        centres.push((x, y));
    }
    let names = ["intercept", "a", "b"];
    let pooled_x: Vec<f64> = centres.iter().flat_map(|c| c.0.clone()).collect();
    let pooled_y: Vec<bool> = centres.iter().flat_map(|c| c.1.clone()).collect();
    let pooled = fit_logistic(&names, &pooled_x, &pooled_y, None).unwrap();

    let settings = RoundSettings {
        model: ModelKind::Clinical,
        strategy: Strategy::Newton,
        rounds: 50,
        ..settings(3)
    };
    let m = Coordinator::new(
        settings.clone(),
        roles(),
        clinical_weights(&[0.0; 3], None),
        &names,
    )
    .unwrap();
    let (outcome, history) = drive_newton(m, &centres);
    let rounds = history.len() as u32;
    assert!(rounds >= 4, "{rounds}");
    // Stopped after any committed round and resumed from its record, the run ends exactly the same.
    for k in 1..=rounds {
        let last = &history[k as usize - 1];
        let sums: Vec<LogisticStats> = history[..k as usize]
            .iter()
            .map(|c| c.newton.clone().unwrap())
            .collect();
        let resumed = Coordinator::resume(
            settings.clone(),
            roles(),
            clinical_weights(&[0.0; 3], None),
            &names,
            Committed {
                round: k,
                global: (*last.weights).clone(),
                newton_history: sums.clone(),
                evaluated: true,
            },
        )
        .unwrap();
        let (again, rest) = drive_newton(resumed, &centres);
        assert_eq!(again, outcome, "resumed after round {k}");
        assert_eq!(rest.len() as u32, rounds - k);
    }
    // A checkpoint that is not where the replayed steps lead is refused.
    let sums: Vec<LogisticStats> = history[..2]
        .iter()
        .map(|c| c.newton.clone().unwrap())
        .collect();
    let err = Coordinator::resume(
        settings.clone(),
        roles(),
        clinical_weights(&[0.0; 3], None),
        &names,
        Committed {
            round: 2,
            global: (*history[0].weights).clone(),
            newton_history: sums.clone(),
            evaluated: true,
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, SetupError::Resume(_)), "{err}");
    let Outcome::Completed {
        fit: Some(fit),
        weights,
        rounds: r,
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(r, rounds);
    assert_eq!(fit.iterations, pooled.iterations);
    for (a, b) in fit.coefficients.iter().zip(&pooled.coefficients) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    assert_eq!(
        weights.require(COEFFICIENTS).unwrap().to_f64_vec(),
        fit.coefficients
    );
    assert_eq!(
        weights.require(COVARIANCE).unwrap().to_f64_vec(),
        fit.covariance
    );
}

#[test]
fn federated_newton_waits_for_every_training_centre() {
    let names = ["intercept"];
    let settings = RoundSettings {
        model: ModelKind::Clinical,
        strategy: Strategy::Newton,
        retries: 0,
        ..settings(2)
    };
    let mut m =
        Coordinator::new(settings, roles(), clinical_weights(&[0.0], None), &names).unwrap();
    let t0 = Instant::now();
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    for c in ["a", "b"] {
        let s = logistic_stats(&[1.0, 1.0], &[true, false], None, &[0.0]).unwrap();
        answer(&mut m, c, tasks[c], 1, newton_weights(&s).unwrap(), 2, t0);
    }
    m.handle_timeout(t0 + MINUTE);
    let acts = actions(&mut m, t0);
    assert!(
        matches!(acts.last(), Some(Action::Finish(Outcome::Failed { reason, .. })) if reason.contains("2 of the 3 answers needed")),
        "{acts:?}"
    );
}

#[test]
fn with_a_quorum_reached_early_the_round_waits_the_grace_then_starts_without_the_absent() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    m.handle(
        Input::Connected {
            center: id("a"),
            connection: 1,
        },
        t0,
    );
    assert_eq!(m.poll_timeout(), None, "below quorum: nothing to time");
    let t1 = t0 + Duration::from_secs(3);
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 2,
        },
        t1,
    );
    assert!(actions(&mut m, t1).is_empty());
    assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(10)));
    m.handle_timeout(t1 + Duration::from_secs(9));
    assert!(actions(&mut m, t1).is_empty());
    m.handle_timeout(t1 + Duration::from_secs(10));
    let tasks = sent(&actions(&mut m, t1));
    assert_eq!(tasks.keys().collect::<Vec<_>>(), ["a", "b"]);
    // c arrives late: it waits for round 2.
    m.handle(
        Input::Connected {
            center: id("c"),
            connection: 3,
        },
        t1 + Duration::from_secs(11),
    );
    assert!(actions(&mut m, t1).is_empty());

    // Everyone connected at once: no grace.
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    assert_eq!(sent(&actions(&mut m, t0)).len(), 3);

    // Quorum lost during the grace: back to waiting.
    let mut m = machine(settings(2));
    m.handle(
        Input::Connected {
            center: id("a"),
            connection: 1,
        },
        t0,
    );
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 2,
        },
        t0,
    );
    m.handle(
        Input::Disconnected {
            center: id("b"),
            connection: 2,
        },
        t0,
    );
    assert_eq!(m.poll_timeout(), None);
    m.handle_timeout(t0 + MINUTE);
    assert!(actions(&mut m, t0).is_empty());
}

mod durability;
mod placement;
