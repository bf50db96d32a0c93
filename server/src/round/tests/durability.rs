//! Nothing is announced before it is durable: the machine hears of every commit's fate through an input.

use super::evaluation::{eval_report, evaluations};
use super::*;

/// The raw actions queued now, with no store answering.
fn queued(m: &mut Coordinator) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

/// A machine whose first round has closed with every answer in: its last action is the commit.
fn round_closed(settings: RoundSettings, t0: Instant) -> Coordinator {
    round_closed_with_tasks(settings, t0).0
}

fn round_closed_with_tasks(
    settings: RoundSettings,
    t0: Instant,
) -> (Coordinator, BTreeMap<String, TaskId>) {
    let mut m = machine(settings);
    connect_all(&mut m, t0);
    let tasks = sent(&queued(&mut m));
    for c in ["a", "b", "c"] {
        answer(&mut m, c, tasks[c], 1, model(&[1.0; 4], 1.0), 10, t0);
    }
    let acts = queued(&mut m);
    assert!(
        matches!(acts.last(), Some(Action::CommitRound { record, .. }) if record.round == 1),
        "{acts:?}"
    );
    (m, tasks)
}

#[test]
fn a_closed_round_is_neither_announced_nor_followed_until_the_store_says_it_is_durable() {
    let t0 = Instant::now();
    let (mut m, tasks) = round_closed_with_tasks(settings(3), t0);
    // A second answer to the closed round, while it is being stored, is late for that round.
    answer(&mut m, "a", tasks["a"], 1, model(&[2.0; 4], 1.0), 10, t0);
    assert!(matches!(
        &queued(&mut m)[..],
        [Action::Refuse {
            refusal: UpdateRefusal::Late { round: 1 },
            ..
        }]
    ));
    // However long the store takes and whatever else happens, nothing more comes.
    m.handle_timeout(t0 + 10 * MINUTE);
    m.handle(
        Input::Connected {
            center: id("c"),
            connection: 9,
            declared: DECLARED,
        },
        t0 + 10 * MINUTE,
    );
    assert!(queued(&mut m).is_empty());
    assert_eq!(m.committed(), 0, "not committed until it is stored");
    assert_eq!(m.poll_timeout(), None);
    // The store's word on another round is not this round's.
    m.handle(Input::RoundStored { round: 2 }, t0);
    assert!(queued(&mut m).is_empty());

    m.handle(Input::RoundStored { round: 1 }, t0 + 10 * MINUTE);
    let acts = queued(&mut m);
    assert!(
        matches!(&acts[..], [Action::AnnounceRound(r), Action::SendFit { task, .. }]
            if r.round == 1 && task.round == 2),
        "the announcement first, then the next round: {acts:?}"
    );
    assert_eq!(m.committed(), 1);
}

#[test]
fn a_failed_commit_fails_the_run_naming_the_store_and_announces_nothing() {
    let t0 = Instant::now();
    let mut m = round_closed(settings(3), t0);
    m.handle(
        Input::StoreFailed {
            reason: "cannot commit round 1: no space left on device".into(),
        },
        t0,
    );
    let acts = queued(&mut m);
    assert!(
        matches!(&acts[..], [Action::Finish(Outcome::Failed { rounds: 0, reason })]
            if reason.contains("no space left")),
        "{acts:?}"
    );
    assert!(m.is_finished());
    assert_eq!(m.committed(), 0);
}

/// A one-round run whose round is stored and whose every centre reported its evaluation: the last action is
/// the evaluation's store.
fn evaluation_closed(t0: Instant) -> Coordinator {
    let mut m = round_closed(
        RoundSettings {
            rounds: 1,
            evaluation: EvaluationSettings {
                bins: 4,
                every: 0,
                adapt_batch_norm: false,
            },
            ..settings(3)
        },
        t0,
    );
    m.handle(Input::RoundStored { round: 1 }, t0);
    let acts = queued(&mut m);
    assert!(matches!(acts[0], Action::AnnounceRound(_)), "{acts:?}");
    for (c, task, _) in evaluations(&acts) {
        m.handle(
            Input::EvalAnswered {
                center: id(&c),
                task,
                report: eval_report(1, vec![0, 0, 1, 1], vec![1, 1, 0, 0]),
            },
            t0,
        );
    }
    let acts = queued(&mut m);
    assert!(
        matches!(acts.last(), Some(Action::StoreEvaluation(e)) if e.round == 1),
        "{acts:?}"
    );
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::AnnounceEvaluation(_) | Action::Finish(_))));
    m
}

#[test]
fn an_evaluation_is_announced_and_the_run_finished_only_once_the_evaluation_is_stored() {
    let t0 = Instant::now();
    let mut m = evaluation_closed(t0);
    m.handle(Input::EvaluationStored { round: 1 }, t0);
    let acts = queued(&mut m);
    assert!(
        matches!(
            &acts[..],
            [
                Action::AnnounceEvaluation(_),
                Action::Finish(Outcome::Completed { rounds: 1, .. })
            ]
        ),
        "{acts:?}"
    );
}

#[test]
fn an_evaluation_the_store_cannot_keep_fails_the_run_instead_of_being_announced() {
    let t0 = Instant::now();
    let mut m = evaluation_closed(t0);
    m.handle(
        Input::StoreFailed {
            reason: "cannot store round 1's evaluation: read-only file system".into(),
        },
        t0,
    );
    assert!(matches!(
        &queued(&mut m)[..],
        [Action::Finish(Outcome::Failed { rounds: 1, reason })] if reason.contains("read-only")
    ));
}
