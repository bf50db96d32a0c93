//! DP-SGD: each patient's gradient within the clipping norm, the noise of the standard deviation asked for
//! (measured through a real optimiser step), and batch-norm statistics that private training leaves alone.

use fedslm_cohort::{Rng, Sample};
use fedslm_metrics::dp::SecureNoise;
use fedslm_model::dp::{ClippedSum, DpTraining};
use fedslm_model::{ModelKind, Network, Optimizer, TrainConfig, Trainer};
use fedslm_protocol::TensorRole;

use crate::network::{config, samples};

fn dp(clip: f64, noise_multiplier: f64) -> DpTraining {
    DpTraining {
        clip,
        noise_multiplier,
        sample_rate: 0.25,
    }
}

fn plain_sgd() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        augmentation: None,
        learning_rate: 1.0,
        optimizer: Optimizer::Sgd {
            momentum: 0.0,
            weight_decay: 0.0,
        },
        ..TrainConfig::default()
    }
}

fn norm(sum: &ClippedSum) -> f64 {
    sum.sums
        .iter()
        .flatten()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn every_patients_gradient_is_clipped_to_the_norm() {
    let net = Network::new(ModelKind::Combined, config(ModelKind::Combined), 3).unwrap();
    let data = samples(12, 5);
    let cfg = plain_sgd();
    let trainer = Trainer::new(&net, &cfg).unwrap();
    let mut rng = Rng::new(1);
    for s in &data {
        // Unclipped (a norm no gradient reaches): the sum is the patient's own gradient.
        let whole = trainer.clipped_sum(&[s], &mut rng, 1e9).unwrap();
        let raw = whole.norms[0];
        assert!(raw > 0.0 && (norm(&whole) - raw).abs() < 1e-4 * raw);
        // Clipped below it: the patient's contribution is exactly at the norm.
        let clip = raw / 10.0;
        let clipped = trainer.clipped_sum(&[s], &mut rng, clip).unwrap();
        let n = norm(&clipped);
        assert!(n <= clip * (1.0 + 1e-5), "{n} > {clip}");
        assert!(n >= clip * (1.0 - 1e-4), "{n} < {clip}");
    }
    // A batch's sum is within the batch's size times the norm.
    let batch: Vec<&Sample> = data.iter().collect();
    let sum = trainer.clipped_sum(&batch, &mut rng, 0.01).unwrap();
    assert!(norm(&sum) <= 0.01 * batch.len() as f64 * (1.0 + 1e-5));
}

#[test]
fn the_noise_of_a_private_step_has_the_standard_deviation_sigma_times_clip() {
    // Plain SGD with learning rate 1 and an empty batch: the step moves each weight by minus its noise.
    let net = Network::new(ModelKind::Mri, config(ModelKind::Mri), 3).unwrap();
    let cfg = plain_sgd();
    let mut trainer = Trainer::new(&net, &cfg).unwrap();
    let (clip, sigma) = (0.5, 1.3);
    let mut noise = SecureNoise::from_os().unwrap();
    let parameters = |net: &Network| -> Vec<f64> {
        net.to_weights()
            .unwrap()
            .tensors()
            .iter()
            .filter(|t| t.role() != TensorRole::BatchNormStatistic)
            .flat_map(|t| t.to_f64_vec())
            .collect()
    };
    let mut moves = Vec::new();
    while moves.len() < 100_000 {
        let before = parameters(&net);
        let empty = trainer.clipped_sum(&[], &mut Rng::new(0), clip).unwrap();
        trainer
            .private_step(empty, &dp(clip, sigma), 1.0, &mut noise, 1.0)
            .unwrap();
        moves.extend(parameters(&net).iter().zip(&before).map(|(a, b)| a - b));
    }
    let n = moves.len() as f64;
    let mean = moves.iter().sum::<f64>() / n;
    let sd = (moves.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(
        (sd / (sigma * clip) - 1.0).abs() < 0.05,
        "{sd} against {}",
        sigma * clip
    );
    assert!(mean.abs() < 0.01, "{mean}");
}

#[test]
fn private_training_learns_nothing_into_the_batch_norm_statistics_and_changes_the_weights() {
    let net = Network::new(ModelKind::Combined, config(ModelKind::Combined), 3).unwrap();
    let data = samples(16, 9);
    let refs: Vec<&Sample> = data.iter().collect();
    let before = net.to_weights().unwrap();
    let cfg = TrainConfig {
        epochs: 2,
        augmentation: None,
        dp: Some(dp(1.0, 1.0)),
        ..TrainConfig::default()
    };
    let reports = net.fit(&refs, &cfg, |_| {}).unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|r| r.loss.is_finite()));
    let after = net.to_weights().unwrap();
    for (a, b) in before.tensors().iter().zip(after.tensors()) {
        if a.role() == TensorRole::BatchNormStatistic {
            assert_eq!(a.bytes(), b.bytes(), "{} moved", a.name());
        }
    }
    assert_ne!(before, after);
}
