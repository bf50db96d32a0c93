//! The paired tests' second pass as a phase of the machine.

use fedslm_protocol::{PlacementReport, PlacementTask, ScoreHistogram};

use super::*;

fn task(run: &str) -> PlacementTask {
    let h = ScoreHistogram {
        positive: vec![1, 0],
        negative: vec![0, 1],
    };
    PlacementTask {
        a_runs: vec![run.into()],
        b_runs: vec![run.into()],
        pooled_a: h.clone(),
        pooled_b: h,
    }
}

fn report(n: u64) -> PlacementReport {
    PlacementReport {
        n_positive: n,
        n_negative: n,
        positive: [0.5; 5],
        negative: [0.5; 5],
    }
}

fn placements(acts: &[Action]) -> Vec<(String, TaskId)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SendPlacement { to, .. } => Some(to.clone()),
            _ => None,
        })
        .flatten()
        .map(|(c, t)| (c.to_string(), t))
        .collect()
}

#[test]
fn the_tasks_wait_for_every_center_named_and_the_answers_come_back_in_the_tasks_order() {
    let t0 = Instant::now();
    let tasks = vec![
        (id("b"), task("r1")),
        (id("a"), task("r1")),
        (id("x"), task("r2")),
    ];
    let mut m = Coordinator::placements(roles(), tasks, MINUTE, None, t0);
    for (n, c) in ["a", "b"].into_iter().enumerate() {
        m.handle(
            Input::Connected {
                center: id(c),
                connection: n as u64,
                declared: DECLARED,
            },
            t0,
        );
    }
    assert!(actions(&mut m, t0).is_empty(), "x is not connected yet");
    m.handle(
        Input::Connected {
            center: id("x"),
            connection: 7,
            declared: DECLARED,
        },
        t0,
    );
    let sent = placements(&actions(&mut m, t0));
    assert_eq!(
        sent.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["b", "a", "x"]
    );
    let of = |c: &str| sent.iter().find(|s| s.0 == c).unwrap().1;
    m.handle(
        Input::PlacementAnswered {
            center: id("x"),
            task: of("x"),
            report: report(3),
        },
        t0,
    );
    m.handle(
        Input::TaskFailed {
            center: id("a"),
            task: of("a"),
            reason: "no scores kept".into(),
        },
        t0,
    );
    // Another centre's task id is not this centre's to answer.
    m.handle(
        Input::PlacementAnswered {
            center: id("x"),
            task: of("b"),
            report: report(9),
        },
        t0,
    );
    let acts = actions(&mut m, t0);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Refuse {
            refusal: UpdateRefusal::NotYours { .. },
            ..
        }
    )));
    m.handle(
        Input::PlacementAnswered {
            center: id("b"),
            task: of("b"),
            report: report(1),
        },
        t0,
    );
    let acts = actions(&mut m, t0);
    let Some(Action::FinishPlacements(answers)) = acts.last() else {
        panic!("{acts:?}")
    };
    assert_eq!(answers[0], Ok(Some(report(1))));
    assert!(
        matches!(&answers[1], Err(e) if e.center == id("a") && e.to_string().contains("no scores kept"))
    );
    assert_eq!(answers[2], Ok(Some(report(3))));
}

#[test]
fn at_the_deadline_unanswered_and_unsent_tasks_fail_by_name() {
    let t0 = Instant::now();
    let tasks = vec![(id("a"), task("r1")), (id("c"), task("r1"))];
    let mut m = Coordinator::placements(roles(), tasks, MINUTE, None, t0);
    m.handle(
        Input::Connected {
            center: id("a"),
            connection: 1,
            declared: DECLARED,
        },
        t0,
    );
    assert!(actions(&mut m, t0).is_empty());
    assert_eq!(m.poll_timeout(), Some(t0 + MINUTE));
    m.handle_timeout(t0 + MINUTE);
    let acts = actions(&mut m, t0 + MINUTE);
    let Some(Action::FinishPlacements(answers)) = acts.last() else {
        panic!("{acts:?}")
    };
    let why: Vec<String> = answers
        .iter()
        .map(|a| a.as_ref().unwrap_err().to_string())
        .collect();
    assert_eq!(
        why,
        ["a: not sent: c did not connect in time", "c: not connected"]
    );
}
