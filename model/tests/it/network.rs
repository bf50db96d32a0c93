//! The image networks' state: seeded initialisation, bit-exact weights round trips (batch-norm statistics
//! included), model files, frozen statistics in evaluation, reproducible training, the loss, FedProx, and
//! clear refusals of weights that do not fit.

use candle_core::{Device, Tensor};
use fedslm_cohort::{Rng, Sample};
use fedslm_model::network::role_of;
use fedslm_model::train::bce_with_logits;
use fedslm_model::{
    save, Augmentation, ModelError, ModelKind, NetConfig, Network, Optimizer, Standardisation,
    TrainConfig,
};
use fedslm_protocol::{TensorRole, Weights};

const SIZE: usize = 16;

pub(crate) fn config(kind: ModelKind) -> NetConfig {
    NetConfig {
        width: 4,
        ..NetConfig::compact(3, SIZE, if kind == ModelKind::Mri { 0 } else { 5 })
    }
}

/// Patients whose label shows as a bright centre in the first channel and as the first clinical factor.
pub(crate) fn samples(n: usize, seed: u64) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let label = i % 2 == 0;
            let image = (0..3 * SIZE * SIZE)
                .map(|j| {
                    let (x, y) = ((j % SIZE) as f64, ((j / SIZE) % SIZE) as f64);
                    let center = (x - 7.5).abs() < 4.0 && (y - 7.5).abs() < 4.0 && j < SIZE * SIZE;
                    (rng.normal() + if center && label { 3.0 } else { 0.0 }) as f32
                })
                .collect();
            Sample {
                patient_id: format!("P{i:03}"),
                center: "test".into(),
                image,
                channels: 3,
                size: SIZE,
                clinical: vec![f32::from(label), 0.0, 1.0, f32::from(i % 3 == 0), 0.0],
                label: Some(label),
            }
        })
        .collect()
}

fn quick(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 8,
        augmentation: None,
        ..TrainConfig::default()
    }
}

fn bytes(w: &Weights) -> Vec<(String, Vec<u8>, Vec<usize>, TensorRole)> {
    w.tensors()
        .iter()
        .map(|t| {
            (
                t.name().to_string(),
                t.bytes().to_vec(),
                t.shape().to_vec(),
                t.role(),
            )
        })
        .collect()
}

#[test]
fn names_follow_torchvision_and_roles_follow_names() {
    let net = Network::new(ModelKind::Combined, config(ModelKind::Combined), 1).unwrap();
    let w = net.to_weights().unwrap();
    let names: Vec<&str> = w.tensors().iter().map(|t| t.name()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "names sorted");
    for expected in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.0.bn2.bias",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    assert_eq!(w.require("fc.weight").unwrap().shape(), &[1, 8 * 4 + 5]);
    assert_eq!(
        role_of("layer2.0.downsample.1.running_mean"),
        TensorRole::BatchNormStatistic
    );
    assert_eq!(
        role_of("layer2.0.downsample.1.weight"),
        TensorRole::BatchNormParameter
    );
    assert_eq!(
        role_of("layer2.0.downsample.0.weight"),
        TensorRole::Parameter
    );
    assert_eq!(role_of("bn1.bias"), TensorRole::BatchNormParameter);
    assert_eq!(role_of("fc.bias"), TensorRole::Parameter);
    for t in w.tensors() {
        assert_eq!(t.role(), role_of(t.name()));
    }
    // Batch norm starts at the identity; convolutions are He-normal.
    assert!(w
        .require("layer1.0.bn1.running_var")
        .unwrap()
        .to_f32_vec()
        .iter()
        .all(|&v| v == 1.0));
    let conv = w.require("layer3.0.conv1.weight").unwrap().to_f32_vec();
    let sd = (conv.iter().map(|v| v * v).sum::<f32>() / conv.len() as f32).sqrt();
    let he = (2.0f32 / (8.0 * 9.0)).sqrt();
    assert!((sd / he - 1.0).abs() < 0.15, "sd {sd} vs {he}");
}

#[test]
fn initialisation_is_seeded() {
    let c = config(ModelKind::Mri);
    let a = Network::new(ModelKind::Mri, c, 5)
        .unwrap()
        .to_weights()
        .unwrap();
    let b = Network::new(ModelKind::Mri, c, 5)
        .unwrap()
        .to_weights()
        .unwrap();
    let other = Network::new(ModelKind::Mri, c, 6)
        .unwrap()
        .to_weights()
        .unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&other));
}

#[test]
fn weights_round_trip_bit_exactly_with_batch_norm_statistics() {
    let kind = ModelKind::Combined;
    let data = samples(32, 1);
    let refs: Vec<&Sample> = data.iter().collect();
    let trained = Network::new(kind, config(kind), 1).unwrap();
    trained.fit(&refs, &quick(2), |_| {}).unwrap();
    let w = trained.to_weights().unwrap();
    // Training moved the running statistics away from their start.
    let var = w.require("layer1.0.bn1.running_var").unwrap().to_f32_vec();
    assert!(var.iter().any(|&v| v != 1.0), "{var:?}");

    let fresh = Network::new(kind, config(kind), 99).unwrap();
    assert_ne!(bytes(&fresh.to_weights().unwrap()), bytes(&w));
    fresh.load_weights(&w).unwrap();
    assert_eq!(bytes(&fresh.to_weights().unwrap()), bytes(&w));
    assert_eq!(
        fresh.predict(&refs).unwrap(),
        trained.predict(&refs).unwrap()
    );

    // Through the wire codec too.
    let limits = fedslm_protocol::Limits::default();
    let encoded = fedslm_protocol::codec::encode(
        &fedslm_protocol::Message::FitResult(fedslm_protocol::FitResult {
            round: 1,
            weights: w.clone(),
            examples: 32,
            train_loss: 0.5,
        }),
        &limits,
    )
    .unwrap();
    let (decoded, _) = fedslm_protocol::codec::decode(&encoded, &limits).unwrap();
    let fedslm_protocol::Message::FitResult(back) = decoded else {
        panic!("not a FitResult")
    };
    assert_eq!(bytes(&back.weights), bytes(&w));
}

#[test]
fn a_model_file_loads_back_and_predicts_identically() {
    let kind = ModelKind::Combined;
    let data = samples(24, 2);
    let refs: Vec<&Sample> = data.iter().collect();
    let mut net = Network::new(kind, config(kind), 3).unwrap();
    net.standardisation = Standardisation::fit(&refs, 5);
    net.fit(&refs, &quick(1), |_| {}).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("combined.safetensors");
    save(
        &path,
        &net.to_weights().unwrap(),
        &net.card(Default::default(), Default::default()),
    )
    .unwrap();
    let (back, card) = Network::load(&path).unwrap();
    assert_eq!(card.model, "combined");
    assert_eq!(card.network, Some(config(kind)));
    assert_eq!(back.standardisation, net.standardisation);
    assert_eq!(back.predict(&refs).unwrap(), net.predict(&refs).unwrap());
}

#[test]
fn evaluation_freezes_batch_norm_and_training_is_reproducible() {
    let kind = ModelKind::Mri;
    let data = samples(40, 3);
    let refs: Vec<&Sample> = data.iter().collect();
    let cfg = TrainConfig {
        augmentation: Some(Augmentation::default()),
        ..quick(3)
    };
    let a = Network::new(kind, config(kind), 4).unwrap();
    let b = Network::new(kind, config(kind), 4).unwrap();
    let la = a.fit(&refs, &cfg, |_| {}).unwrap();
    let lb = b.fit(&refs, &cfg, |_| {}).unwrap();
    assert_eq!(la, lb);
    assert_eq!(
        bytes(&a.to_weights().unwrap()),
        bytes(&b.to_weights().unwrap())
    );
    let before = bytes(&a.to_weights().unwrap());
    let p1 = a.predict(&refs).unwrap();
    let p2 = a.predict(&refs[..7]).unwrap();
    assert_eq!(
        bytes(&a.to_weights().unwrap()),
        before,
        "prediction changed the state"
    );
    // A patient's score does not depend on its batch (up to the summation order of the batch's matrix
    // products).
    for (x, y) in p1[..7].iter().zip(&p2) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    let other_seed = TrainConfig { seed: 8, ..cfg };
    let c = Network::new(kind, config(kind), 4).unwrap();
    c.fit(&refs, &other_seed, |_| {}).unwrap();
    assert_ne!(bytes(&c.to_weights().unwrap()), before);
}

#[test]
fn both_optimisers_learn_a_visible_signal() {
    let data = samples(64, 4);
    let refs: Vec<&Sample> = data.iter().collect();
    let test = samples(64, 5);
    let test_refs: Vec<&Sample> = test.iter().collect();
    let labels: Vec<bool> = test.iter().map(|s| s.label == Some(true)).collect();
    for optimizer in [
        Optimizer::AdamW { weight_decay: 1e-2 },
        Optimizer::Sgd {
            momentum: 0.9,
            weight_decay: 1e-4,
        },
    ] {
        let net = Network::new(ModelKind::Mri, config(ModelKind::Mri), 5).unwrap();
        let cfg = TrainConfig {
            optimizer,
            learning_rate: if matches!(optimizer, Optimizer::Sgd { .. }) {
                0.05
            } else {
                5e-3
            },
            ..quick(20)
        };
        let reports = net.fit(&refs, &cfg, |_| {}).unwrap();
        assert!(
            reports.last().unwrap().loss < reports[0].loss,
            "{optimizer:?}: {reports:?}"
        );
        let scores = net.predict(&test_refs).unwrap();
        let auc = fedslm_metrics::auc_delong(&labels, &scores).unwrap().auc;
        assert!(auc > 0.9, "{optimizer:?}: held-out AUC {auc}");
    }
}

#[test]
fn the_proximal_term_holds_weights_near_the_start() {
    let data = samples(32, 6);
    let refs: Vec<&Sample> = data.iter().collect();
    let distance = |mu: Option<f64>| {
        let net = Network::new(ModelKind::Mri, config(ModelKind::Mri), 6).unwrap();
        let start = net.to_weights().unwrap();
        net.fit(
            &refs,
            &TrainConfig {
                proximal_mu: mu,
                optimizer: Optimizer::Sgd {
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                learning_rate: 0.02,
                ..quick(4)
            },
            |_| {},
        )
        .unwrap();
        let end = net.to_weights().unwrap();
        start
            .tensors()
            .iter()
            .filter(|t| t.role() != TensorRole::BatchNormStatistic)
            .map(|t| {
                let e = end.require(t.name()).unwrap().to_f32_vec();
                t.to_f32_vec()
                    .iter()
                    .zip(e)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let free = distance(None);
    // lr * mu = 0.8: strong, and still a contraction.
    let held = distance(Some(40.0));
    assert!(held < 0.35 * free, "mu=10 moved {held}, mu=0 moved {free}");
}

#[test]
fn the_loss_is_stable_and_weights_positives() {
    let cpu = Device::Cpu;
    let logits = Tensor::new(&[100.0f32, -100.0, 0.0, 2.0], &cpu).unwrap();
    let labels = Tensor::new(&[0.0f32, 1.0, 1.0, 0.0], &cpu).unwrap();
    let loss = bce_with_logits(&logits, &labels, 1.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // softplus(100) + softplus(100) + ln 2 + softplus(2), over 4.
    let want = (100.0 + 100.0 + 2f64.ln() + (1.0 + 2f64.exp()).ln()) / 4.0;
    assert!((f64::from(loss) - want).abs() < 1e-4, "{loss} vs {want}");
    let weighted = bce_with_logits(&logits, &labels, 3.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = (100.0 + 3.0 * 100.0 + 3.0 * 2f64.ln() + (1.0 + 2f64.exp()).ln()) / 4.0;
    assert!(
        (f64::from(weighted) - want).abs() < 1e-4,
        "{weighted} vs {want}"
    );
    // Gradients stay finite where candle's own loss overflows.
    let v = candle_core::Var::new(&[60.0f32, -60.0], &cpu).unwrap();
    let y = Tensor::new(&[1.0f32, 0.0], &cpu).unwrap();
    let g = bce_with_logits(v.as_tensor(), &y, 1.0)
        .unwrap()
        .backward()
        .unwrap();
    let grad: Vec<f32> = g.get(&v).unwrap().to_vec1().unwrap();
    assert!(
        grad.iter().all(|x| x.is_finite() && x.abs() < 1e-6),
        "{grad:?}"
    );
}

#[test]
fn weights_that_do_not_fit_are_refused_by_name() {
    let kind = ModelKind::Mri;
    let net = Network::new(kind, config(kind), 1).unwrap();
    let good = net.to_weights().unwrap();
    let without = Weights::from_tensors(
        good.tensors()
            .iter()
            .filter(|t| t.name() != "fc.bias")
            .cloned()
            .collect(),
    )
    .unwrap();
    let err = net.load_weights(&without).unwrap_err().to_string();
    assert!(err.contains("fc.bias is missing"), "{err}");

    let wider = Network::new(
        kind,
        NetConfig {
            width: 8,
            ..config(kind)
        },
        1,
    )
    .unwrap()
    .to_weights()
    .unwrap();
    let err = net.load_weights(&wider).unwrap_err().to_string();
    assert!(err.contains("has shape"), "{err}");

    let combined = Network::new(ModelKind::Combined, config(ModelKind::Combined), 1)
        .unwrap()
        .to_weights()
        .unwrap();
    assert!(net
        .load_weights(&combined)
        .unwrap_err()
        .to_string()
        .contains("fc.weight"));

    let mut tensors: Vec<_> = good.tensors().to_vec();
    let i = tensors.iter().position(|t| t.name() == "fc.bias").unwrap();
    tensors[i] =
        fedslm_protocol::Tensor::from_f32("fc.bias", vec![1], TensorRole::Parameter, &[f32::NAN])
            .unwrap();
    let err = net
        .load_weights(&Weights::from_tensors(tensors).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
    // The refused loads changed nothing.
    assert_eq!(bytes(&net.to_weights().unwrap()), bytes(&good));

    let wrong = samples(2, 1)
        .into_iter()
        .map(|mut s| {
            s.size = 8;
            s.image.truncate(3 * 64);
            s
        })
        .collect::<Vec<_>>();
    let err = net.predict(&wrong.iter().collect::<Vec<_>>()).unwrap_err();
    assert!(
        matches!(&err, ModelError::Input { patient, .. } if patient == "P000"),
        "{err}"
    );
    assert!(Network::new(
        ModelKind::Mri,
        NetConfig {
            depth: 12,
            ..config(kind)
        },
        1
    )
    .is_err());
    assert!(Network::new(ModelKind::Mri, config(ModelKind::Combined), 1).is_err());
}

#[test]
fn the_architecture_is_read_back_from_the_weights() {
    let cases = [
        config(ModelKind::Combined),
        config(ModelKind::Mri),
        NetConfig {
            width: 4,
            ..NetConfig::resnet18(9, 64, 5)
        },
        NetConfig {
            depth: 34,
            width: 2,
            ..NetConfig::compact(3, 32, 0)
        },
    ];
    for cfg in cases {
        let kind = if cfg.clinical_features == 0 {
            ModelKind::Mri
        } else {
            ModelKind::Combined
        };
        let w = Network::new(kind, cfg, 3).unwrap().to_weights().unwrap();
        assert_eq!(NetConfig::from_weights(&w, cfg.input_size), Ok(cfg));
    }
    let clinical = fedslm_model::clinical::to_weights(&[0.0; 2], &[0.0; 4]).unwrap();
    assert!(NetConfig::from_weights(&clinical, 32)
        .unwrap_err()
        .to_string()
        .contains("not a ResNet"));
}

#[test]
fn a_head_started_from_the_clinical_model_adds_its_linear_predictor() {
    let kind = ModelKind::Combined;
    let data = samples(24, 5);
    let refs: Vec<&Sample> = data.iter().collect();
    let logits = |net: &Network| -> Vec<f64> {
        net.predict(&refs)
            .unwrap()
            .into_iter()
            .map(|p| (p / (1.0 - p)).ln())
            .collect()
    };
    let beta = [-1.2, 0.8, -0.4, 0.3, 1.1, 0.6];
    for standardised in [false, true] {
        let mut plain = Network::new(kind, config(kind), 9).unwrap();
        let mut started = Network::new(kind, config(kind), 9).unwrap();
        if standardised {
            plain.standardisation = Standardisation::fit(&refs, 5);
            started.standardisation = plain.standardisation.clone();
        }
        // The same network with the clinical columns and the bias at zero: the image part alone.
        plain.start_head_from_clinical(&[0.0; 6]).unwrap();
        started.start_head_from_clinical(&beta).unwrap();
        for ((s, a), b) in data.iter().zip(logits(&started)).zip(logits(&plain)) {
            let clinical: f64 = beta[0]
                + beta[1..]
                    .iter()
                    .zip(&s.clinical)
                    .map(|(b, &x)| b * f64::from(x))
                    .sum::<f64>();
            assert!(
                (a - b - clinical).abs() < 1e-4,
                "{}: {a} - {b} != {clinical} (standardised: {standardised})",
                s.patient_id
            );
        }
    }
    let mri = Network::new(ModelKind::Mri, config(ModelKind::Mri), 9).unwrap();
    assert!(mri.start_head_from_clinical(&beta).is_err());
    let combined = Network::new(kind, config(kind), 9).unwrap();
    assert!(combined.start_head_from_clinical(&beta[..5]).is_err());
    assert!(combined
        .start_head_from_clinical(&[0.0, f64::NAN, 0.0, 0.0, 0.0, 0.0])
        .is_err());
}

#[test]
fn adabn_recomputes_only_the_batch_norm_statistics_from_unlabelled_images() {
    let net = Network::new(ModelKind::Mri, config(ModelKind::Mri), 3).unwrap();
    // A trained network, then images from another "scanner": scaled, shifted and without labels.
    let data = samples(16, 1);
    let refs: Vec<&Sample> = data.iter().collect();
    net.fit(&refs, &quick(2), |_| {}).unwrap();
    let before = net.to_weights().unwrap();
    let mut shifted = samples(20, 2);
    for s in &mut shifted {
        s.label = None;
        for v in &mut s.image {
            *v = 2.5 * *v + 1.0;
        }
    }
    let shifted_refs: Vec<&Sample> = shifted.iter().collect();
    assert_eq!(net.adapt_batch_norm(&shifted_refs).unwrap(), 20);
    let after = net.to_weights().unwrap();
    let mut recomputed = 0;
    for (a, b) in before.tensors().iter().zip(after.tensors()) {
        assert_eq!(a.name(), b.name());
        match role_of(a.name()) {
            TensorRole::BatchNormStatistic => recomputed += usize::from(a.bytes() != b.bytes()),
            _ => assert_eq!(a.bytes(), b.bytes(), "{} untouched", a.name()),
        }
    }
    assert!(recomputed >= 2, "the statistics were recomputed");
    // They are the images' own: scoring with them gives the loss of a training-mode pass (normalised by the
    // batch's own statistics) over the same images, up to the unbiased variance's n / (n - 1).
    let probs = net.predict(&shifted_refs).unwrap();
    let with_running: f64 = probs.iter().map(|p| -(1.0 - p).ln()).sum::<f64>() / probs.len() as f64;
    let cfg = quick(1);
    let trainer = fedslm_model::Trainer::new(&net, &cfg).unwrap();
    let with_batch = trainer
        .forward(&shifted_refs, &mut Rng::new(0))
        .unwrap()
        .cross_entropy;
    assert!(
        (with_running - with_batch).abs() < 2e-3 * with_batch.max(1.0),
        "{with_running} vs {with_batch}"
    );
    let e = net
        .adapt_batch_norm(&shifted_refs[..1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2"), "{e}");
}
