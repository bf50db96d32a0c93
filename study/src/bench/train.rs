//! The training benchmark's measurement (`fedslm bench train`): a network's forward pass (with the loss),
//! backward pass, optimiser step, whole step and inference through the client's own training path
//! (`model::Trainer`, what `Network::fit` runs; `Network::predict`), as medians over timed steps.

use std::time::Instant;

use fedslm_cohort::{Rng, Sample};
use fedslm_model::{Kernels, ModelKind, NetConfig, Network, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

use crate::StudyError;

/// The phases timed, in the order of [`Timing::phase`].
pub const PHASES: [&str; 5] = [
    "forward",
    "backward",
    "optimiser",
    "train step",
    "inference",
];

/// One network's medians (milliseconds) from one process, and the process's peak memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub name: String,
    pub forward: f64,
    pub backward: f64,
    pub optimiser: f64,
    pub step: f64,
    pub inference: f64,
    pub peak_rss_mib: f64,
}

impl Timing {
    /// The median of phase `i` of [`PHASES`].
    pub fn phase(&self, i: usize) -> f64 {
        [
            self.forward,
            self.backward,
            self.optimiser,
            self.step,
            self.inference,
        ][i]
    }
}

/// A network the benchmark times.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchNet {
    pub name: &'static str,
    pub label: &'static str,
    pub config: NetConfig,
    /// Timed steps unless told otherwise.
    pub steps: usize,
}

/// `default` (the default run's combined network, 9 x 64 x 64), `small` (the same on 3 x 32 x 32) or
/// `resnet18` (the study's scale, 3 x 224 x 224, combined).
pub fn bench_net(name: &str) -> Result<BenchNet, StudyError> {
    let (name, label, config, steps) = match name {
        "default" => (
            "default",
            "default, 9 x 64 x 64",
            NetConfig::compact(9, 64, 5),
            20,
        ),
        "small" => (
            "small",
            "default, 3 x 32 x 32",
            NetConfig::compact(3, 32, 5),
            20,
        ),
        "resnet18" => (
            "resnet18",
            "ResNet-18, 3 x 224 x 224",
            NetConfig::resnet18(3, 224, 5),
            5,
        ),
        other => {
            return Err(StudyError::Refused(format!(
                "unknown network {other:?}: use default, small or resnet18"
            )))
        }
    };
    Ok(BenchNet {
        name,
        label,
        config,
        steps,
    })
}

/// `fedslm` (ours) or `candle` (candle's own ops).
pub fn kernel_set(name: &str) -> Result<Kernels, StudyError> {
    match name {
        "fedslm" => Ok(Kernels::Fedslm),
        "candle" => Ok(Kernels::Candle),
        other => Err(StudyError::Refused(format!(
            "unknown kernel set {other:?}: use fedslm or candle"
        ))),
    }
}

/// Random crops and clinical indicators, alternate labels (the PyTorch script draws the same kind).
pub(crate) fn samples(n: usize, config: &NetConfig, rng: &mut Rng) -> Vec<Sample> {
    let (c, s) = (config.in_channels, config.input_size);
    (0..n)
        .map(|i| Sample {
            patient_id: format!("P{i}"),
            center: "bench".into(),
            image: (0..c * s * s).map(|_| rng.normal() as f32).collect(),
            channels: c,
            size: s,
            clinical: (0..config.clinical_features)
                .map(|_| f32::from(rng.bernoulli(0.4)))
                .collect(),
            label: Some(i % 2 == 0),
        })
        .collect()
}

/// The training configuration a benchmark times: one epoch of batches of `batch`, augmentation off (PyTorch's
/// side has none, and it is not what the benchmarks compare).
pub(crate) fn bench_config(batch: usize) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: batch,
        augmentation: None,
        ..TrainConfig::default()
    }
}

/// The median (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `steps` training steps (after `warmup`) of `net` on batches of `batch`, with `kernels`; `rng`
/// draws the batch.
pub fn time_training(
    net: &BenchNet,
    kernels: Kernels,
    batch: usize,
    warmup: usize,
    steps: usize,
    rng: &mut Rng,
) -> Result<Timing, StudyError> {
    let mut network = Network::new(ModelKind::Combined, net.config, 1)?;
    network.set_kernels(kernels);
    let data = samples(batch, &net.config, rng);
    let batch_of: Vec<&Sample> = data.iter().collect();
    let cfg = bench_config(batch);
    let mut trainer = Trainer::new(&network, &cfg)?;
    let mut phases: [Vec<f64>; 5] = Default::default();
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let forward = trainer.forward(&batch_of, rng)?;
        let t1 = Instant::now();
        let grads = trainer.backward(&forward)?;
        let t2 = Instant::now();
        trainer.update(&grads, cfg.learning_rate)?;
        drop((grads, forward));
        let t3 = Instant::now();
        network.predict(&batch_of)?;
        let t4 = Instant::now();
        if i >= warmup {
            let ms = |a: Instant, b: Instant| 1e3 * (b - a).as_secs_f64();
            for (p, v) in
                phases
                    .iter_mut()
                    .zip([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t0, t3), ms(t3, t4)])
            {
                p.push(v);
            }
        }
    }
    let [forward, backward, optimiser, step, inference] = phases.map(median);
    Ok(Timing {
        name: net.name.into(),
        forward,
        backward,
        optimiser,
        step,
        inference,
        peak_rss_mib: crate::runs::peak_rss_mib(),
    })
}
