//! Rounds: when they start, when they close, what they commit, and who was silent.

use super::*;

#[test]
fn a_round_starts_at_quorum_and_commits_as_soon_as_every_center_has_answered() {
    let t0 = Instant::now();
    let mut m = machine(settings(3));
    m.handle(
        Input::Connected {
            center: id("a"),
            connection: 1,
            declared: DECLARED,
        },
        t0,
    );
    m.handle(
        Input::Connected {
            center: id("x"),
            connection: 2,
            declared: DECLARED,
        },
        t0,
    );
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 3,
            declared: DECLARED,
        },
        t0,
    );
    assert!(actions(&mut m, t0).is_empty(), "two of three: no round yet");
    assert_eq!(m.poll_timeout(), None);
    m.handle(
        Input::Connected {
            center: id("c"),
            connection: 4,
            declared: DECLARED,
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
fn a_center_that_never_answers_is_dropped_at_the_deadline_and_the_quorum_commits() {
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
fn a_center_that_disconnects_mid_round_is_not_waited_for_and_a_stale_disconnect_is_ignored() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    // b reconnects (connection 9); the old connection's end arrives afterwards and changes nothing.
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 9,
            declared: DECLARED,
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
fn fedprox_sends_mu_and_a_failed_center_is_recorded() {
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

#[test]
fn with_a_quorum_reached_early_the_round_waits_the_grace_then_starts_without_the_absent() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    m.handle(
        Input::Connected {
            center: id("a"),
            connection: 1,
            declared: DECLARED,
        },
        t0,
    );
    assert_eq!(m.poll_timeout(), None, "below quorum: nothing to time");
    let t1 = t0 + Duration::from_secs(3);
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 2,
            declared: DECLARED,
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
            declared: DECLARED,
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
            declared: DECLARED,
        },
        t0,
    );
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 2,
            declared: DECLARED,
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

#[test]
fn a_run_that_loses_its_quorum_ends_after_a_deadline_per_try_instead_of_stalling() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    // b and c leave mid-round (an impostor took their place for a moment, or they crashed): the round closes
    // short of its quorum at once, and the next try waits for centres that do not come.
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
    for (c, connection) in [("b", 1), ("c", 3)] {
        m.handle(
            Input::Disconnected {
                center: id(c),
                connection,
            },
            t0,
        );
    }
    assert!(committed(&actions(&mut m, t0)).is_none());
    // The round's one retry is that wait: a deadline, then the run ends saying why.
    assert_eq!(m.poll_timeout(), Some(t0 + MINUTE), "waits one deadline");
    m.handle_timeout(t0 + MINUTE - Duration::from_secs(1));
    assert!(actions(&mut m, t0).is_empty());
    m.handle_timeout(t0 + MINUTE);
    let acts = actions(&mut m, t0 + MINUTE);
    let Some(Action::Finish(Outcome::Failed { rounds: 0, reason })) = acts.last() else {
        panic!("{acts:?}")
    };
    assert!(
        reason.contains("1 of the 2 training centres needed connected for 60 s")
            && reason.contains("tried 2 times"),
        "{reason}"
    );
}

#[test]
fn a_center_that_comes_back_within_the_deadline_keeps_the_run_going() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
    for (c, connection) in [("b", 1), ("c", 3)] {
        m.handle(
            Input::Disconnected {
                center: id(c),
                connection,
            },
            t0,
        );
    }
    actions(&mut m, t0);
    m.handle(
        Input::Connected {
            center: id("b"),
            connection: 7,
            declared: DECLARED,
        },
        t0 + MINUTE / 2,
    );
    // The quorum is back: the grace for c, then the round again; the short-of-quorum clock is gone.
    assert_eq!(
        m.poll_timeout(),
        Some(t0 + MINUTE / 2 + Duration::from_secs(10))
    );
    m.handle_timeout(t0 + MINUTE / 2 + Duration::from_secs(10));
    let retry = sent(&actions(&mut m, t0 + MINUTE));
    assert_eq!(retry.keys().collect::<Vec<_>>(), ["a", "b"]);
}
