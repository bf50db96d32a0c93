//! DP-SGD (Abadi et al. 2016) at a site: patient-level differential privacy of a network's local training.
//!
//! Each step samples every patient with probability `sample_rate` (Poisson sampling, drawn from the secure
//! generator, so that whoever knows the run's seed cannot tell who was in a step), computes each sampled
//! patient's gradient alone, scales it to L2 norm at most `clip`, sums them, adds N(0, (σ·clip)²) to every
//! coordinate, and divides by the expected batch size (`sample_rate` × patients). An epoch is
//! `ceil(1 / sample_rate)` steps. The optimiser, weight decay and FedProx's proximal gradient act on that
//! noisy mean: they depend on no patient, so they are post-processing.
//!
//! Batch norm: in DP mode its statistics are frozen, as Opacus recommends where it does not replace the
//! layers: each patient is normalised with the running statistics the task's weights carry, and the running
//! statistics are not updated from the site's images, so nothing outside the accounted gradients depends on
//! a patient. Why not per-batch statistics: they mix patients, so one patient's gradient would depend on the
//! others in its batch and clipping would no longer bound what a patient changes. The batch-norm scale and
//! shift are trained like every other weight, under the same clipping and noise. A run that trains under DP
//! from the start keeps the initial statistics (mean 0, variance 1), which makes batch norm a learnt affine
//! map; evaluation uses the same statistics, so training and inference agree.
//!
//! The augmentation of each patient's image may use the run's seeded generator: it is a function of that
//! patient alone and its randomness protects nothing.

use candle_core::Tensor;
use fedslm_cohort::{Rng, Sample};
use fedslm_metrics::dp::{clip_factor, SecureNoise};
use fedslm_protocol::DpSgd;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::network::Network;
use crate::train::{EpochReport, TrainConfig, Trainer};

/// DP-SGD's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpTraining {
    /// Each patient's gradient is scaled to at most this L2 norm.
    pub clip: f64,
    /// The noise's standard deviation, in units of `clip`.
    pub noise_multiplier: f64,
    /// Each patient's chance of being in a step.
    pub sample_rate: f64,
}

impl From<DpSgd> for DpTraining {
    fn from(dp: DpSgd) -> DpTraining {
        DpTraining {
            clip: dp.clip,
            noise_multiplier: dp.noise_multiplier,
            sample_rate: dp.sample_rate,
        }
    }
}

impl DpTraining {
    /// The same parameters as a task carries them: their checks and their steps are the wire contract's,
    /// which the site's accountant counts.
    fn task(&self) -> DpSgd {
        DpSgd {
            noise_multiplier: self.noise_multiplier,
            clip: self.clip,
            sample_rate: self.sample_rate,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        self.task()
            .check()
            .map_err(|e| format!("differential privacy: {e}"))
    }

    /// Steps per epoch: `ceil(1 / sample_rate)`, as the accountant counts them.
    pub fn steps_per_epoch(&self) -> usize {
        self.task().steps(1) as usize
    }
}

/// One step's clipped gradients, summed, as flat f32 buffers in the order of the trainer's variables.
pub struct ClippedSum {
    pub sums: Vec<Vec<f32>>,
    /// Each patient's gradient norm before clipping.
    pub norms: Vec<f64>,
    /// The patients' cross-entropies, summed (for the site's own log).
    pub loss_sum: f64,
}

impl<'a> Trainer<'a> {
    /// The sum over `batch` of each patient's gradient of the cross-entropy (batch norm on its running
    /// statistics, no proximal term), each scaled to L2 norm at most `clip`.
    pub fn clipped_sum(
        &self,
        batch: &[&Sample],
        rng: &mut Rng,
        clip: f64,
    ) -> Result<ClippedSum, ModelError> {
        let mut sums: Vec<Vec<f32>> = self
            .trainable
            .iter()
            .map(|v| vec![0.0f32; v.as_tensor().elem_count()])
            .collect();
        let mut norms = Vec::with_capacity(batch.len());
        let mut loss_sum = 0.0;
        for sample in batch {
            let forward = self.forward_with(&[sample], rng, false, false)?;
            loss_sum += forward.cross_entropy;
            let grads = forward.loss.backward()?;
            let mut flat: Vec<Option<Vec<f32>>> = Vec::with_capacity(self.trainable.len());
            let mut sq = 0.0f64;
            for v in &self.trainable {
                let g = match grads.get(v.as_tensor()) {
                    Some(g) => Some(g.flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                };
                if let Some(g) = &g {
                    sq += g.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>();
                }
                flat.push(g);
            }
            let norm = sq.sqrt();
            let f = clip_factor(norm, clip) as f32;
            for (sum, g) in sums.iter_mut().zip(&flat) {
                if let Some(g) = g {
                    for (s, x) in sum.iter_mut().zip(g) {
                        *s += f * x;
                    }
                }
            }
            norms.push(norm);
        }
        Ok(ClippedSum {
            sums,
            norms,
            loss_sum,
        })
    }

    /// Noises a step's clipped sum, makes it the mean over `expected` patients, adds the proximal term's
    /// gradient, and takes an optimiser step at `lr`.
    pub fn private_step(
        &mut self,
        mut clipped: ClippedSum,
        dp: &DpTraining,
        expected: f64,
        noise: &mut SecureNoise,
        lr: f64,
    ) -> Result<(), ModelError> {
        let std = dp.noise_multiplier * dp.clip;
        // Any GradStore will do as the carrier: every trainable variable's entry is replaced below.
        let mut grads = self.trainable[0].as_tensor().sum_all()?.backward()?;
        for (i, (var, sum)) in self.trainable.iter().zip(&mut clipped.sums).enumerate() {
            noise.add_to(sum, std);
            let mean = Tensor::from_slice(sum.as_slice(), var.as_tensor().shape(), var.device())?;
            let mut g = (mean / expected)?;
            if let Some((mu, start)) = &self.anchor {
                g = (g + ((var.as_tensor() - &start[i])? * *mu)?)?;
            }
            grads.insert(var.as_tensor(), g);
        }
        self.update(&grads, lr)
    }
}

impl Network {
    /// Local training by DP-SGD (see the module's notes); `cfg.batch_size` is not used: a step's expected
    /// batch is `dp.sample_rate` times the patients.
    pub(crate) fn fit_private(
        &self,
        samples: &[&Sample],
        cfg: &TrainConfig,
        dp: &DpTraining,
        mut progress: impl FnMut(&EpochReport),
    ) -> Result<Vec<EpochReport>, ModelError> {
        let mut trainer = Trainer::new(self, cfg)?;
        let mut noise = SecureNoise::from_os().map_err(|e| ModelError::Training(e.to_string()))?;
        let steps_per_epoch = dp.steps_per_epoch();
        let total_steps = (cfg.epochs * steps_per_epoch).max(1);
        let expected = dp.sample_rate * samples.len() as f64;
        let root = Rng::new(cfg.seed);
        let mut reports = Vec::with_capacity(cfg.epochs);
        let mut step = 0;
        for epoch in 0..cfg.epochs {
            let mut rng = root.fork(epoch as u64 + 1);
            let mut lr = cfg.learning_rate;
            let (mut loss_sum, mut seen) = (0.0, 0usize);
            for _ in 0..steps_per_epoch {
                let batch: Vec<&Sample> = samples
                    .iter()
                    .copied()
                    .filter(|_| noise.uniform() < dp.sample_rate)
                    .collect();
                lr = cfg.learning_rate
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * step as f64 / total_steps as f64).cos());
                let clipped = trainer.clipped_sum(&batch, &mut rng, dp.clip)?;
                // The site's own log only: the loss is not released under DP.
                loss_sum += clipped.loss_sum;
                seen += batch.len();
                trainer.private_step(clipped, dp, expected, &mut noise, lr)?;
                step += 1;
            }
            let loss = loss_sum / seen.max(1) as f64;
            if !loss.is_finite() {
                return Err(ModelError::Training(format!(
                    "the loss became {loss} at epoch {} (learning rate {lr:.2e} too high?)",
                    epoch + 1
                )));
            }
            let report = EpochReport {
                epoch: epoch + 1,
                loss,
                learning_rate: lr,
            };
            progress(&report);
            reports.push(report);
        }
        Ok(reports)
    }
}
