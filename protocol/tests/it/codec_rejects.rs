//! Each check of the decoder, shown to refuse what it must with an error that says what was wrong.

use bincode::Encode;
use fedslm_protocol::codec::{self, HEADER_LEN};
use fedslm_protocol::*;

fn frame(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let mut f = b"FSLM".to_vec();
    f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    f.push(kind.code());
    f.push(0);
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn payload(value: impl Encode) -> Vec<u8> {
    bincode::encode_to_vec(value, bincode::config::standard()).unwrap()
}

/// A FitResult payload with one tensor written field by field, so that fields can disagree.
fn fit_result_with(name: &str, shape: Vec<u64>, dtype: u8, role: u8, data: Vec<u8>) -> Vec<u8> {
    payload((
        7u32,
        vec![(name.to_string(), shape, dtype, role, data)],
        10u64,
        0.5f64,
    ))
}

fn err(bytes: &[u8]) -> String {
    codec::decode(bytes, &Limits::default())
        .unwrap_err()
        .to_string()
}

fn sample_weights(n: usize) -> Weights {
    Weights::from_tensors(
        (0..n)
            .map(|i| {
                Tensor::from_f32(
                    format!("layer{i}.weight"),
                    vec![2, 3],
                    TensorRole::Parameter,
                    &[1.0; 6],
                )
                .unwrap()
            })
            .collect(),
    )
    .unwrap()
}

fn fit_result(weights: Weights) -> Message {
    Message::FitResult(FitResult {
        round: 1,
        weights,
        examples: 5,
        train_loss: 0.1,
    })
}

#[test]
fn a_hand_written_tensor_payload_is_read_as_the_encoder_writes_it() {
    let data: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f = frame(
        MessageKind::FitResult,
        &fit_result_with("w", vec![2], 0, 1, data),
    );
    let (msg, _) = codec::decode(&f, &Limits::default()).unwrap();
    let Message::FitResult(r) = msg else {
        panic!("{msg:?}")
    };
    let t = r.weights.require("w").unwrap();
    assert_eq!(t.to_f32_vec(), vec![1.5, -2.0]);
    assert_eq!(t.role(), TensorRole::BatchNormParameter);
}

#[test]
fn header_checks() {
    let good = codec::encode(
        &Message::error(ErrorCode::Internal, "x"),
        &Limits::default(),
    )
    .unwrap();
    assert!(codec::decode(&good, &Limits::default()).is_ok());

    let mut f = good.clone();
    f[0] = b'X';
    assert!(err(&f).contains("magic"), "{}", err(&f));

    let mut f = good.clone();
    f[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(
        err(&f),
        "protocol version 1 is not supported; this side speaks version 5"
    );

    let mut f = good.clone();
    f[6] = 99;
    assert_eq!(err(&f), "unknown message kind 99");

    let mut f = good.clone();
    f[7] = 1;
    assert!(err(&f).contains("reserved header flags"));

    let mut f = good.clone();
    f[8..16].copy_from_slice(&(64u64 * 1024 + 1).to_le_bytes());
    assert_eq!(
        err(&f),
        "Error frame declares 65537 payload bytes; the limit for Error is 65536"
    );

    let mut f = good.clone();
    f.push(0);
    f[8..16].copy_from_slice(&((good.len() - HEADER_LEN + 1) as u64).to_le_bytes());
    assert_eq!(err(&f), "Error payload has 1 bytes after the message");
}

#[test]
fn tensor_data_must_match_its_shape_and_dtype() {
    let ok = fit_result_with("w", vec![2, 2], 0, 0, vec![0; 16]);
    assert!(codec::decode(&frame(MessageKind::FitResult, &ok), &Limits::default()).is_ok());
    let short = fit_result_with("w", vec![2, 2], 0, 0, vec![0; 15]);
    let e = err(&frame(MessageKind::FitResult, &short));
    assert!(e.contains("needs 16 bytes, but 15 were given"), "{e}");
    let f64_shape = fit_result_with("w", vec![2, 2], 1, 0, vec![0; 16]);
    assert!(err(&frame(MessageKind::FitResult, &f64_shape)).contains("needs 32 bytes"));
    let overflow = fit_result_with("w", vec![u64::MAX / 2, 4], 0, 0, vec![]);
    assert!(err(&frame(MessageKind::FitResult, &overflow)).contains("more elements"));
}

#[test]
fn unknown_codes_and_names_are_refused() {
    assert!(err(&frame(
        MessageKind::FitResult,
        &fit_result_with("w", vec![1], 9, 0, vec![0; 4])
    ))
    .contains("unknown dtype code 9"));
    assert!(err(&frame(
        MessageKind::FitResult,
        &fit_result_with("w", vec![1], 0, 7, vec![0; 4])
    ))
    .contains("unknown role code 7"));
    assert!(err(&frame(
        MessageKind::FitResult,
        &fit_result_with("", vec![1], 0, 0, vec![0; 4])
    ))
    .contains("name is empty"));
    let dup = payload((
        1u32,
        vec![("w".to_string(), vec![0u64], 0u8, 0u8, Vec::<u8>::new()); 2],
        1u64,
        0f64,
    ));
    assert!(err(&frame(MessageKind::FitResult, &dup)).contains("\"w\" appears more than once"));
    let bad_center = payload((
        1u16,
        "v".to_string(),
        "Center-A".to_string(),
        [0u8; 32],
        (0u64, 0u64, 0u64),
    ));
    assert!(err(&frame(MessageKind::Hello, &bad_center)).contains("contains 'C'"));
}

#[test]
fn counts_and_lengths_are_checked_against_limits() {
    let roomy = Limits {
        max_tensors: 100,
        max_rank: 20,
        max_name_len: 1000,
        ..Limits::default()
    };
    let strict = Limits {
        max_tensors: 3,
        max_rank: 2,
        max_name_len: 12,
        ..Limits::default()
    };

    let f = codec::encode(&fit_result(sample_weights(4)), &roomy).unwrap();
    assert!(codec::decode(&f, &roomy).is_ok());
    let e = codec::decode(&f, &strict).unwrap_err().to_string();
    assert_eq!(
        e,
        "malformed FitResult payload: tensor count claims 4; the limit is 3"
    );

    let long_name = Weights::from_tensors(vec![Tensor::from_f32(
        "a.very.long.tensor.name",
        vec![1],
        TensorRole::Parameter,
        &[0.0],
    )
    .unwrap()])
    .unwrap();
    let f = codec::encode(&fit_result(long_name), &roomy).unwrap();
    assert!(codec::decode(&f, &strict)
        .unwrap_err()
        .to_string()
        .contains("tensor name claims 23; the limit is 12"));

    let deep = Weights::from_tensors(vec![Tensor::from_f32(
        "w",
        vec![1, 1, 1],
        TensorRole::Parameter,
        &[0.0],
    )
    .unwrap()])
    .unwrap();
    let f = codec::encode(&fit_result(deep), &roomy).unwrap();
    assert!(codec::decode(&f, &strict)
        .unwrap_err()
        .to_string()
        .contains("tensor rank claims 3; the limit is 2"));

    // The data budget covers all tensors of a message together.
    let small = Limits {
        max_weights_bytes: 24 * 3,
        ..Limits::default()
    };
    let f = codec::encode(&fit_result(sample_weights(3)), &Limits::default()).unwrap();
    assert!(codec::decode(&f, &small).is_ok());
    let f = codec::encode(&fit_result(sample_weights(4)), &Limits::default()).unwrap();
    let e = codec::decode(&f, &small).unwrap_err().to_string();
    assert!(
        e.contains("tensor \"layer3.weight\" data claims 24; the limit is 0"),
        "{e}"
    );

    let e = codec::encode(&fit_result(sample_weights(4)), &strict)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "cannot send FitResult: 4 tensors; the limit is 3");
}

#[test]
fn lengths_that_outrun_the_payload_are_refused_before_allocation() {
    // A text claiming 4000 bytes in a payload of a few (within max_text_len, so only the bytes check stops it).
    let p = payload((ErrorCode::Internal, 4000u64));
    assert!(err(&frame(MessageKind::Error, &p))
        .contains("message claims 4000 bytes, more than the payload holds"));
    // Tensor data claiming 400 MB in a payload of a few bytes.
    let mut p = payload((1u32, 1u64, "w".to_string(), vec![100_000_000u64], 0u8, 0u8));
    p.extend(payload(400_000_000u64));
    assert!(err(&frame(MessageKind::FitResult, &p))
        .contains("data claims 400000000 bytes, more than the payload holds"));
    // A histogram claiming a million bins.
    let p = payload((1u32, 1u64, 1u64, 0f64, 1_000_000u64));
    assert!(
        err(&frame(MessageKind::EvalReport, &p)).contains("histogram bins claims 1000000 bytes")
    );
}

#[test]
fn a_fold_outside_its_count_is_refused() {
    for (index, count) in [(3u32, 3u32), (0, 1), (0, MAX_FOLDS + 1)] {
        let task = Message::EvaluateTask(EvaluateTask {
            round: 1,
            model: ModelKind::Mri,
            weights: sample_weights(1),
            fold: Some(Fold {
                index,
                count,
                seed: 9,
            }),
            histogram_bins: 100,
            histogram_noise: None,
            adapt_batch_norm: false,
        });
        // Encoding does not check; the peer's decoder must.
        let bytes = codec::encode(&task, &Limits::default()).unwrap();
        let e = err(&bytes);
        assert!(e.contains(&format!("fold {index} of {count}")), "{e}");
    }
    let ok = Message::EvaluateTask(EvaluateTask {
        round: 1,
        model: ModelKind::Mri,
        weights: sample_weights(1),
        fold: Fold::new(2, 3, 9),
        histogram_bins: 100,
        histogram_noise: None,
        adapt_batch_norm: false,
    });
    let bytes = codec::encode(&ok, &Limits::default()).unwrap();
    assert_eq!(codec::decode(&bytes, &Limits::default()).unwrap().0, ok);
}

#[test]
fn differential_privacy_parameters_that_cannot_be_used_are_refused() {
    let fit = |dp: DpSgd| {
        Message::FitTask(FitTask {
            round: 1,
            model: ModelKind::Mri,
            weights: sample_weights(1),
            local_epochs: 1,
            learning_rate: 0.01,
            batch_size: 8,
            fold: None,
            seed: 1,
            objective: LocalObjective::Plain,
            keep_batch_norm_local: false,
            dp: Some(dp),
        })
    };
    let good = DpSgd {
        noise_multiplier: 1.1,
        clip: 1.0,
        sample_rate: 0.25,
    };
    for (bad, says) in [
        (
            DpSgd {
                noise_multiplier: 0.0,
                ..good
            },
            "noise multiplier 0",
        ),
        (
            DpSgd {
                clip: f64::NAN,
                ..good
            },
            "clipping norm NaN",
        ),
        (
            DpSgd {
                sample_rate: 1.5,
                ..good
            },
            "sampling rate 1.5",
        ),
        // An epoch of 10^300 steps, or noise that would overflow a count: refused before any work.
        (
            DpSgd {
                sample_rate: 1e-300,
                ..good
            },
            "sampling rate 1e-300",
        ),
        (
            DpSgd {
                noise_multiplier: 1e300,
                ..good
            },
            "noise multiplier 1e300",
        ),
    ] {
        let bytes = codec::encode(&fit(bad), &Limits::default()).unwrap();
        let e = err(&bytes);
        assert!(e.contains(says), "{e}");
    }
    let bytes = codec::encode(&fit(good), &Limits::default()).unwrap();
    assert_eq!(
        codec::decode(&bytes, &Limits::default()).unwrap().0,
        fit(good)
    );
    let eval = Message::EvaluateTask(EvaluateTask {
        round: 1,
        model: ModelKind::Mri,
        weights: sample_weights(1),
        fold: None,
        histogram_bins: 10,
        histogram_noise: Some(-1.0),
        adapt_batch_norm: false,
    });
    let e = err(&codec::encode(&eval, &Limits::default()).unwrap());
    assert!(e.contains("histogram noise -1"), "{e}");
}

#[test]
fn histogram_classes_must_have_the_same_bins() {
    let p = payload((1u32, 3u64, 1u64, 0.2f64, vec![1u64, 0], vec![1u64]));
    assert!(
        err(&frame(MessageKind::EvalReport, &p)).contains("differ in bins: 2 positive, 1 negative")
    );
}

#[test]
fn the_hello_example_in_protocol_md_is_what_goes_on_the_wire() {
    let hello = Message::Hello(Hello {
        protocol_version: 5,
        software_version: "0.1.0".into(),
        center: CenterId::new("center-a").unwrap(),
        settings_hash: [0; 32],
        policy_hash: [0xab; 32],
        requires_dp: true,
        counts: SampleCounts {
            patients: 60,
            positives: 14,
            with_images: 60,
        },
    });
    let mut want = vec![
        0x46, 0x53, 0x4c, 0x4d, 0x05, 0x00, 0x01, 0x00, 0x54, 0, 0, 0, 0, 0, 0, 0, 0x05,
    ];
    want.extend([0x05, 0x30, 0x2e, 0x31, 0x2e, 0x30]);
    want.extend([0x08, 0x63, 0x65, 0x6e, 0x74, 0x65, 0x72, 0x2d, 0x61]);
    want.extend([0u8; 32]);
    want.extend([0xabu8; 32]);
    want.push(0x01);
    want.extend([0x3c, 0x0e, 0x3c]);
    assert_eq!(codec::encode(&hello, &Limits::default()).unwrap(), want);
}

#[test]
fn a_placement_task_names_one_to_a_hundred_runs_a_side_and_bounds_its_histograms() {
    let h = ScoreHistogram {
        positive: vec![1, 0],
        negative: vec![0, 1],
    };
    let task = |a_runs: Vec<String>| {
        Message::PlacementTask(PlacementTask {
            a_runs,
            b_runs: vec!["b".into()],
            pooled_a: h.clone(),
            pooled_b: h.clone(),
        })
    };
    for runs in [vec![], vec!["a".to_string(); MAX_PLACEMENT_RUNS + 1]] {
        let e = codec::encode(&task(runs.clone()), &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("runs on one side"), "{e}");
    }
    // The decoder refuses what a peer's encoder would not have sent.
    let p = payload((
        0u64,
        vec!["b".to_string()],
        vec![1u64],
        vec![1u64],
        vec![1u64],
        vec![1u64],
    ));
    assert!(err(&frame(MessageKind::PlacementTask, &p)).contains("a_runs: none"));
    let p = payload((
        vec!["a".to_string()],
        vec!["b".to_string()],
        vec![1u64, 0],
        vec![1u64],
    ));
    assert!(err(&frame(MessageKind::PlacementTask, &p)).contains("differ in bins"));
    let p = payload((vec!["a".to_string()], vec!["b".to_string()], 1_000_000u64));
    assert!(err(&frame(MessageKind::PlacementTask, &p)).contains("histogram bins claims 1000000"));
}
