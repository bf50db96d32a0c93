//! Local training of an image network: mini-batches drawn from a seeded generator, augmentation on the training
//! side only, a numerically stable weighted binary cross-entropy, AdamW or SGD with momentum under a cosine
//! learning-rate schedule, and an optional FedProx proximal term.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use fedslm_cohort::{Rng, Sample};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::kernels::{FusedAdamW, Kernels};
use crate::network::Network;
use fedslm_cohort::augment::Augmentation;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Optimizer {
    AdamW { weight_decay: f64 },
    Sgd { momentum: f64, weight_decay: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate; a cosine schedule takes it towards zero over the run.
    pub learning_rate: f64,
    pub optimizer: Optimizer,
    /// Weight of the positive class's loss terms (PyTorch's `pos_weight`); `None` is 1.
    pub pos_weight: Option<f64>,
    /// `None` trains on the crops as they are.
    pub augmentation: Option<Augmentation>,
    /// FedProx: `mu / 2 * ||w - w_start||^2` added to the loss, `w_start` the weights at the start of `fit`.
    pub proximal_mu: Option<f64>,
    pub seed: u64,
    /// Patient-level differential privacy: train by DP-SGD (`crate::dp`) instead of shuffled mini-batches.
    #[serde(default)]
    pub dp: Option<crate::dp::DpTraining>,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            epochs: 30,
            batch_size: 16,
            learning_rate: 5e-3,
            optimizer: Optimizer::AdamW { weight_decay: 1e-2 },
            pos_weight: None,
            augmentation: Some(Augmentation::default()),
            proximal_mu: None,
            seed: 42,
            dp: None,
        }
    }
}

impl TrainConfig {
    pub fn check(&self) -> Result<(), ModelError> {
        let bad = |s: String| Err(ModelError::Training(s));
        if self.batch_size < 2 {
            return bad(format!(
                "batch size {} (batch norm needs at least 2)",
                self.batch_size
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("learning rate {}", self.learning_rate));
        }
        if let Some(w) = self.pos_weight {
            if !(w.is_finite() && w > 0.0) {
                return bad(format!("positive-class weight {w}"));
            }
        }
        if let Some(mu) = self.proximal_mu {
            if !(mu.is_finite() && mu >= 0.0) {
                return bad(format!("proximal mu {mu}"));
            }
        }
        if let Optimizer::Sgd { momentum, .. } = self.optimizer {
            if !(0.0..1.0).contains(&momentum) {
                return bad(format!("momentum {momentum}"));
            }
        }
        if let Some(dp) = &self.dp {
            dp.check().map_err(ModelError::Training)?;
        }
        Ok(())
    }
}

/// What one epoch did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    /// Mean loss over the epoch's batches (the cross-entropy, without the proximal term).
    pub loss: f64,
    pub learning_rate: f64,
}

/// Binary cross-entropy with logits, `pos_weight` on the positive terms, in the stable form
/// `w y softplus(-x) + (1 - y) softplus(x)` with `softplus(z) = max(z, 0) + ln(1 + e^-|z|)` (candle's own
/// returns inf for |x| >= ~40). Mean over the batch.
pub fn bce_with_logits(
    logits: &Tensor,
    labels: &Tensor,
    pos_weight: f64,
) -> candle_core::Result<Tensor> {
    let log_term = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let softplus_pos = (logits.relu()? + &log_term)?; // softplus(x)
    let softplus_neg = (logits.neg()?.relu()? + &log_term)?; // softplus(-x)
    let positive = (labels * pos_weight)?.mul(&softplus_neg)?;
    let negative = (labels.neg()? + 1.0)?.mul(&softplus_pos)?;
    (positive + negative)?.mean_all()
}

/// SGD with momentum and decoupled weight decay, as PyTorch's `SGD(momentum, weight_decay)`:
/// `v = m v + g + wd w`, `w -= lr v`.
struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        for (var, v) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            let mut g = g.clone();
            if self.weight_decay > 0.0 {
                g = (g + (var.as_tensor() * self.weight_decay)?)?;
            }
            let new_v = match v.take() {
                Some(prev) if self.momentum > 0.0 => ((prev * self.momentum)? + g)?,
                _ => g,
            };
            var.set(&(var.as_tensor() - (&new_v * lr)?)?)?;
            *v = Some(new_v.detach());
        }
        Ok(())
    }
}

enum Opt {
    /// candle-nn's, with candle's kernels (the reference).
    AdamW(AdamW),
    FusedAdamW(FusedAdamW),
    Sgd(Sgd),
}

/// The parts of a training step as `fit` runs them, one batch at a time (the benchmark times each part).
pub struct Trainer<'a> {
    network: &'a Network,
    cfg: &'a TrainConfig,
    pub(crate) trainable: Vec<Var>,
    /// FedProx: mu and the weights at the start.
    pub(crate) anchor: Option<(f64, Vec<Tensor>)>,
    opt: Opt,
}

/// A batch's forward pass: the loss to differentiate (with the proximal term) and the cross-entropy alone.
pub struct Forward {
    pub loss: Tensor,
    pub cross_entropy: f64,
}

impl<'a> Trainer<'a> {
    pub fn new(network: &'a Network, cfg: &'a TrainConfig) -> Result<Trainer<'a>, ModelError> {
        cfg.check()?;
        let trainable: Vec<Var> = network
            .trainable_vars()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let anchor: Option<(f64, Vec<Tensor>)> = match cfg.proximal_mu {
            Some(mu) if mu > 0.0 => Some((
                mu,
                trainable
                    .iter()
                    .map(|v| v.as_tensor().detach().copy())
                    .collect::<Result<_, _>>()?,
            )),
            _ => None,
        };
        let opt = match cfg.optimizer {
            Optimizer::AdamW { weight_decay } => {
                let params = ParamsAdamW {
                    lr: cfg.learning_rate,
                    weight_decay,
                    ..Default::default()
                };
                match network.net.kernels {
                    Kernels::Fedslm => Opt::FusedAdamW(FusedAdamW::new(trainable.clone(), params)?),
                    Kernels::Candle => Opt::AdamW(AdamW::new(trainable.clone(), params)?),
                }
            }
            Optimizer::Sgd {
                momentum,
                weight_decay,
            } => Opt::Sgd(Sgd {
                velocity: vec![None; trainable.len()],
                vars: trainable.clone(),
                momentum,
                weight_decay,
            }),
        };
        Ok(Trainer {
            network,
            cfg,
            trainable,
            anchor,
            opt,
        })
    }

    /// Assembles the batch (augmented from `rng` where the configuration says so) and runs the network on it.
    pub fn forward(&self, batch: &[&Sample], rng: &mut Rng) -> Result<Forward, ModelError> {
        self.forward_with(batch, rng, true, true)
    }

    /// [`Trainer::forward`], with batch norm on the batch's statistics (`batch_statistics`) or on the running
    /// ones, and with or without the proximal term.
    pub(crate) fn forward_with(
        &self,
        batch: &[&Sample],
        rng: &mut Rng,
        batch_statistics: bool,
        proximal: bool,
    ) -> Result<Forward, ModelError> {
        let groups = 3;
        // Each crop's augmentation drawn in order from the run's generator, then applied in parallel.
        let augmented: Option<Vec<Vec<f32>>> = self.cfg.augmentation.as_ref().map(|a| {
            let drawn: Vec<_> = batch.iter().map(|s| a.draw(s.size, groups, rng)).collect();
            batch
                .par_iter()
                .zip(&drawn)
                .map(|(s, d)| {
                    let mut out = Vec::with_capacity(s.image.len());
                    d.apply(&s.image, s.channels, s.size, &mut out);
                    out
                })
                .collect()
        });
        let mut next = augmented.iter().flatten();
        let (images, clinical) = self.network.batch(batch, |s, buf| match next.next() {
            Some(image) => buf.extend_from_slice(image),
            None => buf.extend_from_slice(&s.image),
        })?;
        let labels: Vec<f32> = batch
            .iter()
            .map(|s| if s.label == Some(true) { 1.0 } else { 0.0 })
            .collect();
        let labels = Tensor::from_vec(labels, batch.len(), images.device())?;
        let logits = self
            .network
            .net
            .forward_t(&images, clinical.as_ref(), batch_statistics)?;
        let bce = bce_with_logits(&logits, &labels, self.cfg.pos_weight.unwrap_or(1.0))?;
        let cross_entropy = f64::from(bce.to_scalar::<f32>()?);
        let mut loss = bce;
        if let (true, Some((mu, start))) = (proximal, &self.anchor) {
            let mut distance = Tensor::zeros((), candle_core::DType::F32, images.device())?;
            for (v, w0) in self.trainable.iter().zip(start) {
                distance = (distance + (v.as_tensor() - w0)?.sqr()?.sum_all()?)?;
            }
            loss = (loss + (distance * (mu / 2.0))?)?;
        }
        Ok(Forward {
            loss,
            cross_entropy,
        })
    }

    pub fn backward(&self, forward: &Forward) -> Result<GradStore, ModelError> {
        Ok(forward.loss.backward()?)
    }

    /// One optimiser step at learning rate `lr`.
    pub fn update(&mut self, grads: &GradStore, lr: f64) -> Result<(), ModelError> {
        match &mut self.opt {
            Opt::AdamW(a) => {
                a.set_learning_rate(lr);
                a.step(grads)?;
            }
            Opt::FusedAdamW(a) => {
                a.set_learning_rate(lr);
                a.step(grads)?;
            }
            Opt::Sgd(s) => s.step(grads, lr)?,
        }
        Ok(())
    }
}

impl Network {
    /// Trains on `samples` (all labelled) for `cfg.epochs`, calling `progress` after each epoch.
    pub fn fit(
        &self,
        samples: &[&Sample],
        cfg: &TrainConfig,
        mut progress: impl FnMut(&EpochReport),
    ) -> Result<Vec<EpochReport>, ModelError> {
        cfg.check()?;
        for s in samples {
            self.check_sample(s)?;
            if s.label.is_none() {
                return Err(ModelError::Input {
                    patient: s.patient_id.clone(),
                    center: s.center.clone(),
                    reason: "no SLM outcome to train on".into(),
                });
            }
        }
        if samples.len() < 2 {
            return Err(ModelError::Training(format!(
                "{} labelled patients; training needs at least 2",
                samples.len()
            )));
        }
        if let Some(dp) = &cfg.dp {
            return self.fit_private(samples, cfg, dp, progress);
        }
        let mut trainer = Trainer::new(self, cfg)?;
        // Batches of at least 2: a last batch of one would give batch norm a variance of zero.
        let batches_per_epoch = samples.len().div_ceil(cfg.batch_size);
        let total_steps = (cfg.epochs * batches_per_epoch).max(1);
        let root = Rng::new(cfg.seed);
        let mut reports = Vec::with_capacity(cfg.epochs);
        let mut step = 0;
        for epoch in 0..cfg.epochs {
            let mut rng = root.fork(epoch as u64 + 1);
            let mut order: Vec<usize> = (0..samples.len()).collect();
            rng.shuffle(&mut order);
            let (mut loss_sum, mut batches) = (0.0, 0usize);
            let mut lr = cfg.learning_rate;
            for chunk in order.chunks(cfg.batch_size) {
                if chunk.len() < 2 {
                    continue;
                }
                let batch: Vec<&Sample> = chunk.iter().map(|&i| samples[i]).collect();
                let forward = trainer.forward(&batch, &mut rng)?;
                let value = forward.cross_entropy;
                if !value.is_finite() {
                    return Err(ModelError::Training(format!(
                        "the loss became {value} at epoch {} (learning rate {lr:.2e} too high?)",
                        epoch + 1
                    )));
                }
                lr = cfg.learning_rate
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * step as f64 / total_steps as f64).cos());
                let grads = trainer.backward(&forward)?;
                trainer.update(&grads, lr)?;
                step += 1;
                loss_sum += value;
                batches += 1;
            }
            let report = EpochReport {
                epoch: epoch + 1,
                loss: loss_sum / batches.max(1) as f64,
                learning_rate: lr,
            };
            progress(&report);
            reports.push(report);
        }
        Ok(reports)
    }
}
