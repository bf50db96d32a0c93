//! Every check an update must pass, and settings that cannot work.

use super::*;

/// Every check: c misbehaves one way, is told why, and the round commits a and b's mean.
#[test]
fn each_check_refuses_the_misbehaving_center_and_the_round_completes_with_the_honest_mean() {
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
            "extra tensor whose name forges a log line",
            |m, t, now| {
                let mut v = model(&[1.0; 4], 1.0).tensors().to_vec();
                v.push(
                    Tensor::from_f32(
                        "x\nINFO run completed",
                        vec![1],
                        TensorRole::Parameter,
                        &[0.0],
                    )
                    .unwrap(),
                );
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
            |r| matches!(r, UpdateRefusal::Unexpected(n) if n == "x\\nINFO run completed"),
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
            "more patients than its Hello declared",
            |m, t, now| {
                answer(m, "c", t["c"], 1, model(&[1.0; 4], 1.0), 1 << 62, now);
                ("c".into(), t["c"])
            },
            |r| {
                matches!(r, UpdateRefusal::MoreExamplesThanDeclared { claimed, declared }
                    if *claimed == 1 << 62 && *declared == DECLARED.with_images)
            },
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
fn only_the_first_answer_of_a_center_counts() {
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

#[test]
fn a_centre_claims_the_same_patients_every_round() {
    let t0 = Instant::now();
    let mut m = machine(settings(2));
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    for c in ["a", "b", "c"] {
        answer(&mut m, c, tasks[c], 1, model(&[1.0; 4], 1.0), 10, t0);
    }
    let tasks = sent(&actions(&mut m, t0));
    answer(&mut m, "c", tasks["c"], 2, model(&[1.0; 4], 1.0), 20, t0);
    let acts = actions(&mut m, t0);
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Refuse {
                refusal: UpdateRefusal::ExamplesChanged {
                    claimed: 20,
                    earlier: 10
                },
                ..
            }
        )),
        "{acts:?}"
    );
}

#[test]
fn by_default_an_update_scaled_far_beyond_the_global_model_is_refused() {
    let t0 = Instant::now();
    let defaults = RoundSettings {
        norm_bound: NormBound::DEFAULT,
        ..settings(2)
    };
    // A global model of norm 4: the default bound is 3 x 4 = 12.
    let mut m = Coordinator::new(defaults, roles(), model(&[2.0; 4], 1.0), &[]).unwrap();
    connect_all(&mut m, t0);
    let tasks = sent(&actions(&mut m, t0));
    answer(&mut m, "a", tasks["a"], 1, model(&[3.0; 4], 1.0), 10, t0);
    answer(&mut m, "b", tasks["b"], 1, model(&[5.0; 4], 1.0), 10, t0);
    // Every weight 2e30: the round would be non-finite for everyone after it.
    answer(&mut m, "c", tasks["c"], 1, model(&[2e30; 4], 1.0), 10, t0);
    let acts = actions(&mut m, t0);
    let refusal = acts.iter().find_map(|a| match a {
        Action::Refuse { refusal, .. } => Some(refusal.clone()),
        _ => None,
    });
    assert!(
        matches!(refusal, Some(UpdateRefusal::Norm { bound, .. }) if bound == 12.0),
        "{refusal:?}"
    );
    let c = committed(&acts).expect("a and b commit");
    assert_eq!(conv(&c.weights), vec![4.0; 4]);
}
