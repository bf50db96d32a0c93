//! Property tests of the frame codec: what is sent is what arrives, and no input panics the decoder.

use bytes::{Bytes, BytesMut};
use fedslm_protocol::codec::{self, FrameDecoder, HEADER_LEN};
use fedslm_protocol::*;
use proptest::prelude::*;

fn center() -> impl Strategy<Value = CenterId> {
    "[a-z0-9][a-z0-9-]{0,30}".prop_map(|s| CenterId::new(s).unwrap())
}

fn finite() -> impl Strategy<Value = f64> {
    -1e12f64..1e12
}

fn tensor(index: usize) -> impl Strategy<Value = Tensor> {
    (
        "[a-zA-Z0-9_.]{0,24}",
        prop::collection::vec(0usize..5, 0..4),
        prop::sample::select(DType::ALL.to_vec()),
        prop::sample::select(TensorRole::ALL.to_vec()),
        any::<u64>(),
    )
        .prop_map(move |(name, shape, dtype, role, seed)| {
            let n: usize = shape.iter().product::<usize>() * dtype.size();
            let data: Vec<u8> = (0..n)
                .map(|i| (seed.rotate_left(i as u32 % 64) ^ i as u64) as u8)
                .collect();
            Tensor::from_raw(
                format!("t{index}.{name}"),
                shape,
                dtype,
                role,
                Bytes::from(data),
            )
            .unwrap()
        })
}

fn weights() -> impl Strategy<Value = Weights> {
    (0usize..6)
        .prop_flat_map(|n| (0..n).map(tensor).collect::<Vec<_>>())
        .prop_map(|ts| Weights::from_tensors(ts).unwrap())
}

fn message() -> impl Strategy<Value = Message> {
    let objective = prop_oneof![
        Just(LocalObjective::Plain),
        finite().prop_map(|mu| LocalObjective::Proximal { mu }),
        Just(LocalObjective::NewtonStep),
        Just(LocalObjective::Landmarks),
    ];
    let model = prop::sample::select(vec![
        ModelKind::Clinical,
        ModelKind::Mri,
        ModelKind::Combined,
    ]);
    let role = prop::sample::select(vec![Role::Train, Role::Validate]);
    let code = prop::sample::select(vec![
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotEnrolled,
        ErrorCode::IdentityMismatch,
        ErrorCode::SettingsMismatch,
        ErrorCode::Malformed,
        ErrorCode::Unexpected,
        ErrorCode::Superseded,
        ErrorCode::UpdateRefused,
        ErrorCode::Internal,
    ]);
    prop_oneof![
        (
            any::<u16>(),
            ".{0,40}",
            center(),
            any::<([u8; 32], [u8; 32], bool)>(),
            any::<(u64, u64, u64)>()
        )
            .prop_map(
                |(v, sw, c, (h, policy, dp), (p, q, r))| Message::Hello(Hello {
                    protocol_version: v,
                    software_version: sw,
                    center: c,
                    settings_hash: h,
                    policy_hash: policy,
                    requires_dp: dp,
                    counts: SampleCounts {
                        patients: p,
                        positives: q,
                        with_images: r
                    },
                })
            ),
        (".{0,40}", center(), role, any::<u32>()).prop_map(|(run_id, center, role, rounds)| {
            Message::Welcome(Welcome {
                run_id,
                center,
                role,
                rounds,
            })
        }),
        (
            any::<u32>(),
            model.clone(),
            weights(),
            any::<u32>(),
            (finite(), any::<u32>()),
            proptest::option::of(
                (0u32..10, 10u32..=MAX_FOLDS, any::<u64>())
                    .prop_map(|(i, n, seed)| Fold::new(i, n, seed).unwrap())
            ),
            any::<u64>(),
            objective,
            (
                any::<bool>(),
                proptest::option::of((0.1f64..10.0, 0.01f64..10.0, 0.001f64..=1.0).prop_map(
                    |(noise_multiplier, clip, sample_rate)| DpSgd {
                        noise_multiplier,
                        clip,
                        sample_rate
                    }
                ))
            )
        )
            .prop_map(
                |(round, model, weights, e, (lr, batch_size), fold, seed, objective, (bn, dp))| {
                    Message::FitTask(FitTask {
                        round,
                        model,
                        weights,
                        local_epochs: e,
                        learning_rate: lr,
                        batch_size,
                        fold,
                        seed,
                        objective,
                        keep_batch_norm_local: bn,
                        dp,
                    })
                }
            ),
        (any::<u32>(), weights(), any::<u64>(), finite()).prop_map(
            |(round, weights, examples, l)| {
                Message::FitResult(FitResult {
                    round,
                    weights,
                    examples,
                    train_loss: l,
                })
            }
        ),
        (
            any::<u32>(),
            model,
            weights(),
            proptest::option::of(
                (0u32..10, 10u32..=MAX_FOLDS, any::<u64>())
                    .prop_map(|(i, n, seed)| Fold::new(i, n, seed).unwrap())
            ),
            (
                any::<u32>(),
                proptest::option::of(0.01f64..100.0),
                any::<bool>()
            )
        )
            .prop_map(|(round, model, weights, fold, (bins, noise, adapt))| {
                Message::EvaluateTask(EvaluateTask {
                    round,
                    model,
                    weights,
                    fold,
                    histogram_bins: bins,
                    histogram_noise: noise,
                    adapt_batch_norm: adapt,
                })
            }),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            finite(),
            prop::collection::vec(any::<(u64, u64)>(), 0..50)
        )
            .prop_map(|(round, examples, positives, loss, bins)| {
                Message::EvalReport(EvalReport {
                    round,
                    examples,
                    positives,
                    loss,
                    histogram: ScoreHistogram {
                        positive: bins.iter().map(|b| b.0).collect(),
                        negative: bins.iter().map(|b| b.1).collect(),
                    },
                })
            }),
        (".{0,40}", any::<u32>(), ".{0,80}").prop_map(|(run_id, rounds_completed, reason)| {
            Message::Finish(Finish {
                run_id,
                rounds_completed,
                reason,
            })
        }),
        (code, ".{0,200}")
            .prop_map(|(code, message)| Message::Error(ErrorMessage { code, message })),
        (
            prop::collection::vec(".{0,30}", 1..6),
            prop::collection::vec(".{0,30}", 1..6),
            prop::collection::vec(any::<(u64, u64, u64, u64)>(), 0..40)
        )
            .prop_map(
                |(a_runs, b_runs, bins)| Message::PlacementTask(PlacementTask {
                    a_runs,
                    b_runs,
                    pooled_a: ScoreHistogram {
                        positive: bins.iter().map(|b| b.0).collect(),
                        negative: bins.iter().map(|b| b.1).collect(),
                    },
                    pooled_b: ScoreHistogram {
                        positive: bins.iter().map(|b| b.2).collect(),
                        negative: bins.iter().map(|b| b.3).collect(),
                    },
                })
            ),
        (
            any::<(u64, u64)>(),
            prop::array::uniform5(finite()),
            prop::array::uniform5(finite())
        )
            .prop_map(|((n_positive, n_negative), positive, negative)| {
                Message::PlacementReport(PlacementReport {
                    n_positive,
                    n_negative,
                    positive,
                    negative,
                })
            }),
        (any::<u16>(), center()).prop_map(|(v, center)| Message::StatusRequest(StatusRequest {
            protocol_version: v,
            center,
        })),
        (
            (".{0,40}", ".{0,10}", any::<(u32, u32)>()),
            prop::collection::vec(
                (
                    any::<u32>(),
                    prop::sample::select(vec![
                        RoundOutcome::Contributed,
                        RoundOutcome::Refused,
                        RoundOutcome::Silent,
                        RoundOutcome::NotAsked,
                    ]),
                    any::<u64>(),
                    finite(),
                    ".{0,40}"
                ),
                0..20
            ),
            proptest::option::of((
                any::<u32>(),
                proptest::option::of(finite()),
                proptest::option::of(finite())
            ))
        )
            .prop_map(|((run_id, state, (planned, committed)), rounds, ev)| {
                Message::StatusReport(StatusReport {
                    run_id,
                    state,
                    rounds_planned: planned,
                    rounds_committed: committed,
                    rounds: rounds
                        .into_iter()
                        .map(|(round, outcome, examples, train_loss, reason)| RoundPart {
                            round,
                            outcome,
                            examples,
                            train_loss,
                            reason,
                        })
                        .collect(),
                    evaluation: ev.map(|(round, internal_auc, external_auc)| StatusEvaluation {
                        round,
                        internal_auc,
                        external_auc,
                    }),
                })
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let limits = Limits::default();
        let frame = codec::encode(&msg, &limits).unwrap();
        let (back, used) = codec::decode(&frame, &limits).unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(&back, &msg);
        // The frame in chunks is the same bytes.
        let chunks = codec::encode_frame(&msg, &limits).unwrap();
        prop_assert_eq!(chunks.len(), frame.len());
        prop_assert_eq!(chunks.to_vec(), frame);
    }

    #[test]
    fn frames_arrive_whole_whatever_the_split(msgs in prop::collection::vec(message(), 1..4), cut in any::<prop::sample::Index>()) {
        let limits = Limits::default();
        let mut stream = Vec::new();
        for m in &msgs {
            codec::encode_into(m, &limits, &mut stream).unwrap();
        }
        let cut = cut.index(stream.len() + 1);
        let mut dec = FrameDecoder::new(limits, ByteBudget::default());
        let mut buf = BytesMut::from(&stream[..cut]);
        let mut got = Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        buf.extend_from_slice(&stream[cut..]);
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
        prop_assert_eq!(got, msgs);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode(&bytes, &Limits::default());
    }

    #[test]
    fn arbitrary_payload_behind_a_valid_header_never_panics(
        kind in prop::sample::select(MessageKind::ALL.to_vec()),
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut frame = b"FSLM".to_vec();
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.push(kind.code());
        frame.push(0);
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(&payload);
        let _ = codec::decode(&frame, &Limits::default());
    }

    #[test]
    fn mutated_frames_never_panic(
        msg in message(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let limits = Limits::default();
        let mut frame = codec::encode(&msg, &limits).unwrap();
        for (at, byte) in edits {
            let i = at.index(frame.len());
            frame[i] = byte;
        }
        let _ = codec::decode(&frame, &limits);
        let _ = codec::decode(&frame[..cut.index(frame.len() + 1)], &limits);
        // The payload alone, past a header left intact.
        if frame.len() > HEADER_LEN {
            let mut fixed = codec::encode(&msg, &limits).unwrap();
            fixed.truncate(HEADER_LEN);
            fixed.extend_from_slice(&frame[HEADER_LEN..]);
            let _ = codec::decode(&fixed, &limits);
        }
    }
}

#[test]
fn a_frame_in_chunks_shares_the_large_tensors_and_is_the_frame_byte_for_byte() {
    let limits = Limits::default();
    let big: Vec<f32> = (0..300_000).map(|i| i as f32 * 0.25).collect();
    let weights = Weights::from_tensors(vec![
        Tensor::from_f32("conv.weight", vec![300_000], TensorRole::Parameter, &big).unwrap(),
        Tensor::from_f32(
            "bn.bias",
            vec![3],
            TensorRole::BatchNormParameter,
            &[1.0, 2.0, 3.0],
        )
        .unwrap(),
        Tensor::from_f32("fc.weight", vec![2000], TensorRole::Parameter, &big[..2000]).unwrap(),
    ])
    .unwrap();
    let msg = Message::FitResult(FitResult {
        round: 3,
        weights: weights.clone(),
        examples: 10,
        train_loss: 0.5,
    });
    let frame = codec::encode_frame(&msg, &limits).unwrap();
    assert_eq!(frame.to_vec(), codec::encode(&msg, &limits).unwrap());
    // The two large tensors' data are the chunks themselves, not copies; the small one is copied.
    let shared: Vec<&Bytes> = frame
        .chunks()
        .iter()
        .filter(|c| {
            weights
                .tensors()
                .iter()
                .any(|t| t.bytes().as_ptr() == c.as_ptr() && t.bytes().len() == c.len())
        })
        .collect();
    assert_eq!(
        shared.len(),
        2,
        "{:?}",
        frame.chunks().iter().map(|c| c.len()).collect::<Vec<_>>()
    );
    // A frame over its kind's limit is refused as the one-buffer encoder refuses it.
    let small = Limits {
        max_weights_bytes: 1000,
        max_tensors: 4,
        ..Limits::default()
    };
    assert!(codec::encode_frame(&msg, &small).is_err());
}
