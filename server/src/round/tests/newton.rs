//! Federated Newton: the pooled fit, reached by summed statistics.

use super::*;

/// Runs a federated Newton machine with these centres' data to its end: the outcome and each committed round.
fn drive_newton(
    m: Coordinator,
    centers: &[(Vec<f64>, Vec<bool>)],
) -> (Outcome, Vec<CommittedRound>) {
    drive_newton_answering(m, centers, false)
}

/// [`drive_newton`], the centres answering in reverse order when `reversed`.
fn drive_newton_answering(
    mut m: Coordinator,
    centers: &[(Vec<f64>, Vec<bool>)],
    reversed: bool,
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
        let mut answers: Vec<_> = to.iter().zip(centers).collect();
        if reversed {
            answers.reverse();
        }
        for ((center, tid), (x, y)) in answers {
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

/// Three centres' patients, x = [1, a, b] per patient.
fn three_centres() -> Vec<(Vec<f64>, Vec<bool>)> {
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut centers: Vec<(Vec<f64>, Vec<bool>)> = Vec::new();
    for n in [40, 70, 25] {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let a = next() * 2.0 - 1.0;
            let b = if next() < 0.4 { 1.0 } else { 0.0 };
            let eta = -0.5 + 1.2 * a + 0.9 * b;
            x.extend([1.0, a, b]);
            y.push(next() < 1.0 / (1.0 + (-eta).exp()));
        }
        centers.push((x, y));
    }
    centers
}

/// The federated Newton fit must be the pooled fit.
#[test]
fn federated_newton_reaches_the_pooled_fit() {
    let centers = three_centres();
    let names = ["intercept", "a", "b"];
    let pooled_x: Vec<f64> = centers.iter().flat_map(|c| c.0.clone()).collect();
    let pooled_y: Vec<bool> = centers.iter().flat_map(|c| c.1.clone()).collect();
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
    let (outcome, history) = drive_newton(m, &centers);
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
        let (again, rest) = drive_newton(resumed, &centers);
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
fn federated_newton_waits_for_every_training_center() {
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
fn every_round_of_federated_newton_is_the_same_to_the_bit_whatever_order_the_centres_answer_in() {
    let names = ["intercept", "a", "b"];
    let settings = RoundSettings {
        model: ModelKind::Clinical,
        strategy: Strategy::Newton,
        rounds: 50,
        ..settings(3)
    };
    let run = |reversed| {
        let m = Coordinator::new(
            settings.clone(),
            roles(),
            clinical_weights(&[0.0; 3], None),
            &names,
        )
        .unwrap();
        drive_newton_answering(m, &three_centres(), reversed)
    };
    let (outcome, history) = run(false);
    let (again, reversed) = run(true);
    assert_eq!(again, outcome);
    assert_eq!(history.len(), reversed.len());
    for (a, b) in history.iter().zip(&reversed) {
        assert_eq!(a.weights, b.weights, "round {}", a.round);
        assert_eq!(a.newton, b.newton, "round {}", a.round);
    }
}

#[test]
fn statistics_no_patients_can_have_made_are_refused() {
    let names = ["intercept"];
    let honest = logistic_stats(&[1.0, 1.0], &[true, false], None, &[0.0]).unwrap();
    for (bad, what) in [
        (
            LogisticStats {
                gradient: vec![1e300],
                ..honest.clone()
            },
            "gradient",
        ),
        (
            LogisticStats {
                hessian: vec![-1.0],
                ..honest.clone()
            },
            "Hessian",
        ),
        (
            LogisticStats {
                log_likelihood: 5.0,
                ..honest.clone()
            },
            "log-likelihood",
        ),
    ] {
        let settings = RoundSettings {
            model: ModelKind::Clinical,
            strategy: Strategy::Newton,
            ..settings(3)
        };
        let mut m =
            Coordinator::new(settings, roles(), clinical_weights(&[0.0], None), &names).unwrap();
        let t0 = Instant::now();
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m, t0));
        answer(
            &mut m,
            "a",
            tasks["a"],
            1,
            newton_weights(&honest).unwrap(),
            2,
            t0,
        );
        answer(
            &mut m,
            "c",
            tasks["c"],
            1,
            newton_weights(&bad).unwrap(),
            2,
            t0,
        );
        let acts = actions(&mut m, t0);
        assert!(
            acts.iter().any(|a| matches!(a, Action::Refuse {
                refusal: UpdateRefusal::NewtonStatistics(why), ..
            } if why.contains(what))),
            "{what}: {acts:?}"
        );
        assert!(
            matches!(&acts[0], Action::Accept { .. }),
            "the honest centre's statistics pass: {acts:?}"
        );
    }
}
