//! The landmark round: the consortium's intensity scale as the image-weighted mean of centres' landmarks.

use fedslm_protocol::landmarks::{landmark_weights, landmarks_of, SequenceLandmarks};

use super::*;

fn landmarks_settings() -> RoundSettings {
    RoundSettings {
        rounds: 1,
        strategy: Strategy::Landmarks,
        // Evaluation asked for: a landmark run still has no model to score.
        evaluation: EvaluationSettings {
            bins: 50,
            every: 1,
            adapt_batch_norm: false,
        },
        ..settings(3)
    }
}

/// A centre's landmarks: each sequence's 0 to 1 scale bent by `bend`.
fn bent(bend: f64) -> SequenceLandmarks {
    let mut l = [[0.0; 11]; 3];
    for (s, row) in l.iter_mut().enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = (i as f64 / 10.0).powf(bend + s as f64 * 0.1);
        }
    }
    l
}

/// A landmark run from its zeros, every centre connected.
fn connected_landmark_machine() -> (Coordinator, Instant) {
    let zeros = landmark_weights(&[[0.0; 11]; 3]).unwrap();
    let mut m = Coordinator::new(landmarks_settings(), roles(), zeros, &[]).unwrap();
    let t0 = Instant::now();
    connect_all(&mut m, t0);
    (m, t0)
}

#[test]
fn a_landmark_round_averages_the_centres_landmarks_by_their_images_and_nothing_is_evaluated() {
    let (mut m, t0) = connected_landmark_machine();
    let acts = actions(&mut m, t0);
    let Some(Action::SendFit { task, .. }) =
        acts.iter().find(|a| matches!(a, Action::SendFit { .. }))
    else {
        panic!("{acts:?}")
    };
    assert_eq!(task.objective, LocalObjective::Landmarks);
    assert_eq!(task.dp, None);
    let tasks = sent(&acts);
    let answers = [("a", 1.0, 10), ("b", 2.0, 30), ("c", 0.5, 60)];
    for (c, bend, images) in answers {
        let w = landmark_weights(&bent(bend)).unwrap();
        answer(&mut m, c, tasks[c], 1, w, images, t0);
    }
    let acts = actions(&mut m, t0);
    let round = committed(&acts).expect("the round commits");
    let mean = landmarks_of(&round.weights).unwrap();
    for (s, sequence) in mean.iter().enumerate() {
        for (i, got) in sequence.iter().enumerate() {
            let want = answers
                .iter()
                .map(|(_, bend, n)| bent(*bend)[s][i] * *n as f64)
                .sum::<f64>()
                / 100.0;
            assert!((got - want).abs() < 1e-12, "{s} {i}");
        }
        assert_eq!((sequence[0], sequence[10]), (0.0, 1.0));
    }
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::SendEvaluate { .. } | Action::StoreEvaluation(_))),
        "{acts:?}"
    );
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Finish(Outcome::Completed { .. }))),
        "{acts:?}"
    );
}

#[test]
fn a_landmark_run_starts_from_the_landmarks_alone_and_never_under_dp() {
    let e = Coordinator::new(landmarks_settings(), roles(), model(&[0.0; 4], 1.0), &[])
        .err()
        .expect("a network's weights are refused");
    assert!(e.to_string().contains("intensity.landmarks"), "{e}");
    let zeros = landmark_weights(&[[0.0; 11]; 3]).unwrap();
    let private = RoundSettings {
        dp: Some(DpSettings {
            noise_multiplier: 1.0,
            clip: 1.0,
            newton_clip: 1.0,
            sample_rate: 0.1,
        }),
        ..landmarks_settings()
    };
    let e = Coordinator::new(private, roles(), zeros, &[])
        .err()
        .expect("refused under DP");
    assert!(e.to_string().contains("differential privacy"), "{e}");
}

#[test]
fn landmarks_that_do_not_rise_from_0_to_1_are_refused_naming_the_sequence() {
    let (mut m, t0) = connected_landmark_machine();
    let tasks = sent(&actions(&mut m, t0));
    let mut falling = bent(1.0);
    falling[1].swap(3, 4);
    answer(
        &mut m,
        "a",
        tasks["a"],
        1,
        landmark_weights(&falling).unwrap(),
        10,
        t0,
    );
    let acts = actions(&mut m, t0);
    let refused = acts.iter().find_map(|a| match a {
        Action::Refuse { refusal, .. } => Some(refusal.to_string()),
        _ => None,
    });
    let reason = refused.unwrap_or_else(|| panic!("{acts:?}"));
    assert!(reason.contains("dwi"), "{reason}");
}
