//! The node's answers to the server's tasks: local training (or the clinical model's Newton statistics),
//! evaluation into histograms, and the placement sums of the paired tests' second pass.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fedslm_client::{ClientConfig, LocalTrainer, TaskKind};
use fedslm_model::{clinical, save, ModelCard, NetConfig, Network, TrainConfig};
use fedslm_protocol::clinical::newton_weights;
use fedslm_protocol::folds::{center_seed, Selection};
use fedslm_protocol::{
    ErrorCode, EvalReport, EvaluateTask, FitResult, FitTask, LocalObjective, ModelKind,
    PlacementReport, PlacementTask, SampleCounts, Weights,
};

use crate::ledger::{CheckError, Ledger, LedgerError, Mechanism};
use crate::scores::{read_scores, write_scores, KeptScores, Scored};
use crate::{NodeError, PlacementError, SiteCohort};
use fedslm_metrics::dp::SecureNoise;
use fedslm_model::DpTraining;

use crate::fedbn::{with_batch_norm_of, LocalBatchNorm};

/// A hospital node: its configuration, its cohort, the network of its last task, the scores it keeps, and its
/// privacy ledger.
pub struct Node {
    config: ClientConfig,
    cohort: SiteCohort,
    /// Every differentially private release, recorded before it is sent (`privacy.ledger`).
    ledger: Option<Ledger>,
    /// The network of the last task, reused while the architecture stays the same.
    network: Option<Network>,
    /// Each run's last evaluation, patient by patient, for the second pass of paired tests.
    kept: KeptScores,
    /// FedBN: each run's batch-norm layers as this centre trained them; they never leave it.
    local_batch_norm: LocalBatchNorm,
}

impl Node {
    /// A node over the cohort of `config`, loaded and checked.
    pub fn load(config: &ClientConfig) -> Result<Node, NodeError> {
        Node::new(config.clone(), SiteCohort::load(config)?)
    }

    /// A node over `cohort`, with its privacy ledger read back and held (see [`Ledger::open`]).
    pub fn new(config: ClientConfig, cohort: SiteCohort) -> Result<Node, NodeError> {
        let ledger = config.ledger.as_deref().map(Ledger::open).transpose()?;
        Node::with_ledger(config, cohort, ledger)
    }

    /// A node to look at, not to run (`--dry-run`, `--check`): its ledger, where there is one, read without
    /// holding it, so that it can be looked at while the site's node runs.
    pub fn inspect(config: &ClientConfig) -> Result<Node, NodeError> {
        let ledger = config
            .ledger
            .as_deref()
            .filter(|p| p.exists())
            .map(Ledger::read)
            .transpose()?;
        Node::with_ledger(config.clone(), SiteCohort::load(config)?, ledger)
    }

    fn with_ledger(
        config: ClientConfig,
        cohort: SiteCohort,
        ledger: Option<Ledger>,
    ) -> Result<Node, NodeError> {
        Ok(Node {
            config,
            cohort,
            ledger,
            network: None,
            kept: KeptScores::default(),
            local_batch_norm: LocalBatchNorm::default(),
        })
    }

    /// FedBN: the batch-norm layers this centre keeps for `run` (they never leave it).
    pub fn local_batch_norm(&self, run: &str) -> Option<&fedslm_protocol::Weights> {
        self.local_batch_norm.get(run)
    }

    /// The privacy ledger, where client.toml names one.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// Refuses a release of `mechanism` for `run` that the site's budget cannot pay for.
    fn afford(&self, run: &str, mechanism: &Mechanism) -> Result<(), NodeError> {
        let (Some(budget), Some(ledger)) = (&self.config.privacy.dp_budget, &self.ledger) else {
            return Ok(());
        };
        let cost = mechanism.rdp().map_err(LedgerError::from)?;
        ledger.check(budget, run, &cost).map_err(|e| match e {
            CheckError::Refused(r) => NodeError::Policy(r),
            CheckError::Ledger(l) => NodeError::Ledger(l),
        })
    }

    /// Records a release in the ledger (fsynced) before it is sent.
    fn spend(
        &mut self,
        run: &str,
        round: u32,
        kind: TaskKind,
        mechanism: Mechanism,
    ) -> Result<(), NodeError> {
        if let Some(ledger) = &mut self.ledger {
            ledger.record(run, round, kind.name(), mechanism)?;
            let spent = self
                .config
                .privacy
                .dp_budget
                .map(|b| ledger.spent(Some(run), b.delta))
                .transpose()?;
            tracing::info!(
                run = %fedslm_protocol::text::escape_peer(run),
                round,
                kind = kind.name(),
                epsilon = spent.map(|e| e.epsilon),
                "privacy ledger: release recorded"
            );
            fedslm_files::failpoint::hit(fedslm_files::failpoint::LEDGER_WRITTEN, round);
        }
        Ok(())
    }

    pub fn cohort(&self) -> &SiteCohort {
        &self.cohort
    }

    /// What the node tells the server in its Hello.
    pub fn counts(&self) -> SampleCounts {
        self.cohort.counts()
    }

    /// Trains from the task's weights, or computes the clinical model's Newton statistics; with `record` in
    /// client.toml, keeps a copy of what leaves the site.
    pub fn fit(&mut self, run_id: &str, task: &FitTask) -> Result<FitResult, NodeError> {
        // The site's policy first: the kind of task, whether it is private, whether the budget pays for it,
        // then (before anything leaves) how many patients are behind the answer; the ledger records the
        // release before it is sent.
        let policy = &self.config.privacy;
        let kind = match task.objective {
            LocalObjective::NewtonStep => TaskKind::Newton,
            LocalObjective::Landmarks => TaskKind::Landmarks,
            LocalObjective::Plain | LocalObjective::Proximal { .. } => TaskKind::Fit,
        };
        policy.accepts(kind)?;
        policy.privacy(kind, task.dp.is_some())?;
        let mechanism = match (&task.dp, kind) {
            (Some(dp), TaskKind::Newton) if dp.sample_rate != 1.0 => {
                return Err(NodeError::Privacy(format!(
                    "Newton statistics are released once, with every patient: sampling rate {} must be 1",
                    dp.sample_rate
                )))
            }
            (Some(dp), TaskKind::Newton) => Some(Mechanism::of_task(dp, 1)),
            (Some(dp), _) => Some(Mechanism::of_task(dp, task.local_epochs)),
            (None, _) => None,
        };
        if let Some(m) = &mechanism {
            self.afford(run_id, m)?;
        }
        let result = match task.objective {
            LocalObjective::NewtonStep => self.newton(task)?,
            LocalObjective::Landmarks => self.landmarks(task)?,
            LocalObjective::Plain | LocalObjective::Proximal { .. } => self.train(run_id, task)?,
        };
        self.config.privacy.examples(result.examples)?;
        if let Some(m) = mechanism {
            self.spend(run_id, task.round, kind, m)?;
        }
        if let Some(dir) = &self.config.record {
            self.record(dir, task, &result).map_err(NodeError::Record)?;
        }
        Ok(result)
    }

    /// Evaluates the task's model on the selected labelled patients and keeps their scores under `run_id`
    /// (in memory, and on disk where client.toml names a `scores` folder).
    pub fn evaluate(&mut self, run_id: &str, task: &EvaluateTask) -> Result<EvalReport, NodeError> {
        let policy = &self.config.privacy;
        policy.accepts(TaskKind::Evaluate)?;
        policy.privacy(TaskKind::Evaluate, task.histogram_noise.is_some())?;
        policy.bins(task.histogram_bins)?;
        let mechanism = task.histogram_noise.map(Mechanism::histogram);
        if let Some(m) = &mechanism {
            self.afford(run_id, m)?;
        }
        let (mut report, scored) = self.evaluate_all(run_id, task)?;
        self.config.privacy.classes(
            report.positives,
            report.examples.saturating_sub(report.positives),
        )?;
        if let Some(sigma) = task.histogram_noise {
            report = noised(&report, sigma)?;
        }
        if let Some(m) = mechanism {
            self.spend(run_id, task.round, TaskKind::Evaluate, m)?;
        }
        if let Some(dir) = &self.config.scores {
            write_scores(dir, run_id, &scored).map_err(NodeError::KeepScores)?;
        }
        self.kept.keep(run_id, scored);
        Ok(report)
    }

    /// The placement sums of the kept scores of the task's runs: each patient scored under both models, its
    /// placements among the pooled scores of the other class.
    pub fn placements(&self, task: &PlacementTask) -> Result<PlacementReport, NodeError> {
        self.config.privacy.accepts(TaskKind::Placement)?;
        // Placement sums carry no noise: a site that requires DP does not answer them.
        self.config.privacy.privacy(TaskKind::Placement, false)?;
        let a = self.paired_side(&task.a_runs, "A")?;
        let b = self.paired_side(&task.b_runs, "B")?;
        if !a.keys().eq(b.keys()) {
            return Err(PlacementError::DifferentPatients {
                a: a.len(),
                b: b.len(),
            }
            .into());
        }
        let mut labels = Vec::with_capacity(a.len());
        let (mut pa, mut pb) = (Vec::with_capacity(a.len()), Vec::with_capacity(a.len()));
        for ((patient, (ya, sa)), (yb, sb)) in a.iter().zip(b.values()) {
            if ya != yb {
                return Err(PlacementError::DifferentOutcomes(patient.clone()).into());
            }
            labels.push(*ya);
            pa.push(*sa);
            pb.push(*sb);
        }
        let positives = labels.iter().filter(|y| **y).count() as u64;
        self.config
            .privacy
            .classes(positives, labels.len() as u64 - positives)?;
        let sums = fedslm_metrics::PlacementSums::from_patients(
            &(&task.pooled_a).into(),
            &(&task.pooled_b).into(),
            &labels,
            &pa,
            &pb,
        )?;
        Ok(sums.into())
    }

    /// One model's kept scores over the runs named, by patient (each patient once).
    fn paired_side(
        &self,
        runs: &[String],
        side: &'static str,
    ) -> Result<BTreeMap<String, (bool, f64)>, PlacementError> {
        let mut scores = BTreeMap::new();
        for run in runs {
            let from_disk;
            let kept = match (self.kept.get(run), &self.config.scores) {
                (Some(kept), _) => kept,
                (None, Some(dir)) => {
                    from_disk =
                        read_scores(dir, run).map_err(|source| PlacementError::KeptRun {
                            side,
                            run: run.clone(),
                            source,
                        })?;
                    &from_disk
                }
                (None, None) => {
                    return Err(PlacementError::NoRun {
                        side,
                        run: run.clone(),
                    })
                }
            };
            for s in kept {
                if scores
                    .insert(s.patient.clone(), (s.label, s.probability))
                    .is_some()
                {
                    return Err(PlacementError::ScoredTwice {
                        side,
                        patient: s.patient.clone(),
                    });
                }
            }
        }
        Ok(scores)
    }

    /// Predictions for every selected labelled patient, as counts, mean log-loss and per-class histograms,
    /// and the patients' scores for the node to keep.
    fn evaluate_all(
        &mut self,
        run_id: &str,
        task: &EvaluateTask,
    ) -> Result<(EvalReport, Vec<Scored>), NodeError> {
        let selection = Selection::evaluate(task.fold);
        let (ids, labels, probs): (Vec<String>, Vec<bool>, Vec<f64>) = match task.model {
            ModelKind::Clinical => {
                let beta = clinical::coefficients(&task.weights)?;
                let patients = self.cohort.labelled_patients(selection);
                let (mut ids, mut labels, mut probs) = (vec![], vec![], vec![]);
                for p in patients {
                    if let Some(y) = p.slm {
                        ids.push(p.id.clone());
                        labels.push(y);
                        probs.push(clinical::predict(&self.config.coding, &beta, p));
                    }
                }
                (ids, labels, probs)
            }
            ModelKind::Mri | ModelKind::Combined => {
                // FedBN: a centre that trained in the run scores with its own layers.
                let own = self
                    .local_batch_norm
                    .get(run_id)
                    .map(|layers| with_batch_norm_of(&task.weights, layers))
                    .transpose()?;
                let network = network_for(
                    &mut self.network,
                    &self.config,
                    &self.cohort,
                    task.model,
                    own.as_ref().unwrap_or(&task.weights),
                    0,
                )?;
                if task.adapt_batch_norm {
                    // AdaBN: the statistics of this centre's images; no label is read.
                    let images = self.cohort.samples_in(selection);
                    let n = network.adapt_batch_norm(&images)?;
                    tracing::info!(
                        round = task.round,
                        images = n,
                        "batch-norm statistics recomputed from this centre's images (AdaBN)"
                    );
                }
                let labelled = self.cohort.labelled_samples(selection);
                let probs = network.predict(&labelled)?;
                (
                    labelled.iter().map(|s| s.patient_id.clone()).collect(),
                    labelled.iter().map(|s| s.label == Some(true)).collect(),
                    probs,
                )
            }
        };
        if labels.is_empty() {
            return Err(NodeError::NothingToEvaluate);
        }
        let histograms = fedslm_metrics::ScoreHistograms::from_scores(
            &labels,
            &probs,
            task.histogram_bins as usize,
        )?;
        let report = EvalReport {
            round: task.round,
            examples: labels.len() as u64,
            positives: labels.iter().filter(|&&y| y).count() as u64,
            loss: mean_log_loss(&labels, &probs),
            histogram: (&histograms).into(),
        };
        let scored = ids
            .into_iter()
            .zip(labels.into_iter().zip(probs))
            .map(|(patient, (label, probability))| Scored {
                patient,
                label,
                probability,
            })
            .collect();
        Ok((report, scored))
    }

    fn newton(&self, task: &FitTask) -> Result<FitResult, NodeError> {
        let beta = clinical::coefficients(&task.weights)?;
        let patients = self.cohort.labelled_patients(Selection::fit(task.fold));
        let s = match &task.dp {
            None => clinical::local_stats(&self.config.coding, &patients, &beta)?,
            Some(dp) => {
                let (x, y) = clinical::design(&self.config.coding, &patients);
                if y.is_empty() {
                    return Err(NodeError::NoOutcome);
                }
                fedslm_metrics::dp::private_newton_stats(
                    &x,
                    &y,
                    &beta,
                    dp.clip,
                    dp.noise_multiplier,
                    &mut secure_noise()?,
                )
            }
        };
        if s.n == 0 {
            return Err(NodeError::NoOutcome);
        }
        Ok(FitResult {
            round: task.round,
            weights: newton_weights(&s)?,
            examples: s.n,
            // Under DP the loss is not released.
            train_loss: if task.dp.is_some() {
                f64::NAN
            } else {
                -s.log_likelihood / s.n as f64
            },
        })
    }

    fn train(&mut self, run_id: &str, task: &FitTask) -> Result<FitResult, NodeError> {
        if task.model == ModelKind::Clinical {
            return Err(NodeError::ClinicalIsNotTrained);
        }
        let seed = center_seed(task.seed, &self.cohort.center);
        // FedBN: this centre's own layers of the run, where it has trained in it before.
        let own = match self.local_batch_norm.get(run_id) {
            Some(layers) if task.keep_batch_norm_local => {
                Some(with_batch_norm_of(&task.weights, layers)?)
            }
            _ => None,
        };
        let network = network_for(
            &mut self.network,
            &self.config,
            &self.cohort,
            task.model,
            own.as_ref().unwrap_or(&task.weights),
            task.seed,
        )?;
        let train = self.cohort.labelled_samples(Selection::fit(task.fold));
        if train.len() < 2 {
            return Err(NodeError::TooFewToTrain(train.len()));
        }
        let train_cfg = TrainConfig {
            epochs: task.local_epochs as usize,
            batch_size: task.batch_size as usize,
            learning_rate: task.learning_rate,
            proximal_mu: match task.objective {
                LocalObjective::Proximal { mu } => Some(mu),
                _ => None,
            },
            seed,
            dp: task.dp.map(DpTraining::from),
            augmentation: Some(self.config.augmentation),
            ..TrainConfig::default()
        };
        let reports = network.fit(&train, &train_cfg, |r| {
            tracing::debug!(round = task.round, epoch = r.epoch, loss = r.loss, "epoch");
        })?;
        let mut weights = network.to_weights()?;
        if task.keep_batch_norm_local {
            // The trained layers stay here; the global model's go back in their place.
            self.local_batch_norm.keep(run_id, &weights)?;
            weights = with_batch_norm_of(&weights, &task.weights)?;
        }
        Ok(FitResult {
            round: task.round,
            weights,
            examples: train.len() as u64,
            // Under DP the loss is not released.
            train_loss: match task.dp {
                Some(_) => f64::NAN,
                None => reports.last().map_or(f64::NAN, |r| r.loss),
            },
        })
    }

    /// The mean intensity landmarks of this centre's images (each sequence's crop before standardisation), the
    /// images counted as examples: no label is used, no voxel leaves.
    fn landmarks(&self, task: &FitTask) -> Result<FitResult, NodeError> {
        if self.config.preprocess.intensity_scale.is_some() {
            return Err(NodeError::AlreadyStandardised);
        }
        let (mean, images) = fedslm_cohort::mean_landmarks(&self.cohort.samples);
        if images == 0 {
            return Err(NodeError::NoImages);
        }
        Ok(FitResult {
            round: task.round,
            weights: fedslm_protocol::landmarks::landmark_weights(&mean)?,
            examples: images,
            train_loss: 0.0,
        })
    }

    /// A copy of what leaves the site: `round-NNNN.safetensors`, the count and loss in its card.
    fn record(
        &self,
        dir: &Path,
        task: &FitTask,
        result: &FitResult,
    ) -> Result<(), fedslm_model::ModelError> {
        let model = match task.objective {
            LocalObjective::NewtonStep => "newton-statistics",
            LocalObjective::Landmarks => "intensity-landmarks",
            _ => task.model.name(),
        };
        let card = ModelCard {
            training: serde_json::json!({
                "mode": "federated update",
                "center": self.cohort.center,
                "round": result.round,
                "examples": result.examples,
                "train_loss": result.train_loss,
            }),
            ..ModelCard::new(model, self.config.coding, self.config.preprocess)
        };
        save(
            &dir.join(format!("round-{:04}.safetensors", result.round)),
            &result.weights,
            &card,
        )
    }
}

/// The node's network for `weights` in `slot` (built again only when the architecture changes), loaded with
/// them.
fn network_for<'a>(
    slot: &'a mut Option<Network>,
    config: &ClientConfig,
    cohort: &SiteCohort,
    model: ModelKind,
    weights: &Weights,
    seed: u64,
) -> Result<&'a Network, NodeError> {
    if !model.is_network() {
        return Err(NodeError::NotANetwork);
    }
    if cohort.samples.is_empty() {
        return Err(NodeError::NoImages);
    }
    let pre = &config.preprocess;
    let cfg = NetConfig::from_weights(weights, pre.size)?;
    if cfg.in_channels != pre.channels() {
        return Err(NodeError::Channels {
            task: cfg.in_channels,
            node: pre.channels(),
        });
    }
    let network = match slot.take() {
        Some(n) if n.kind == model && n.config == cfg => n,
        _ => Network::new(model, cfg, seed)?,
    };
    network.load_weights(weights)?;
    Ok(slot.insert(network))
}

/// The secure generator of a release's noise.
fn secure_noise() -> Result<SecureNoise, NodeError> {
    SecureNoise::from_os().map_err(|e| NodeError::Privacy(e.to_string()))
}

/// An evaluation's report with its histograms' counts noised (`sigma` each), its counts their sums, and its
/// loss not released.
fn noised(report: &EvalReport, sigma: f64) -> Result<EvalReport, NodeError> {
    let exact: fedslm_metrics::ScoreHistograms = (&report.histogram).into();
    let h = exact.noised(sigma, &mut secure_noise()?);
    Ok(EvalReport {
        round: report.round,
        examples: h.n_positive() + h.n_negative(),
        positives: h.n_positive(),
        loss: f64::NAN,
        histogram: (&h).into(),
    })
}

/// The mean log-loss of probabilities against outcomes, each probability kept within [1e-12, 1 - 1e-12].
fn mean_log_loss(labels: &[bool], probs: &[f64]) -> f64 {
    labels
        .iter()
        .zip(probs)
        .map(|(&y, &p)| {
            let p = p.clamp(1e-12, 1.0 - 1e-12);
            if y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum::<f64>()
        / labels.len() as f64
}

/// The code the server is told: a policy's refusal is the site's decision, not a failure.
fn code_of(error: &NodeError) -> ErrorCode {
    match error {
        NodeError::Policy(_) => ErrorCode::PolicyRefused,
        _ => ErrorCode::Internal,
    }
}

impl LocalTrainer for Node {
    type Error = NodeError;

    fn code(error: &NodeError) -> ErrorCode {
        code_of(error)
    }

    fn fit(&mut self, run_id: &str, task: &FitTask) -> Result<FitResult, NodeError> {
        Node::fit(self, run_id, task)
    }

    fn evaluate(&mut self, run_id: &str, task: &EvaluateTask) -> Result<EvalReport, NodeError> {
        Node::evaluate(self, run_id, task)
    }

    fn placements(&mut self, task: &PlacementTask) -> Result<PlacementReport, NodeError> {
        Node::placements(self, task)
    }
}

/// A node shared between runs: a simulation runs many federations over the same loaded cohorts.
#[derive(Clone)]
pub struct SharedNode(pub Arc<Mutex<Node>>);

impl SharedNode {
    pub fn new(node: Node) -> SharedNode {
        SharedNode(Arc::new(Mutex::new(node)))
    }

    /// What the node tells the server in its Hello.
    pub fn counts(&self) -> SampleCounts {
        self.lock().counts()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Node> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LocalTrainer for SharedNode {
    type Error = NodeError;

    fn code(error: &NodeError) -> ErrorCode {
        code_of(error)
    }

    fn fit(&mut self, run_id: &str, task: &FitTask) -> Result<FitResult, NodeError> {
        self.lock().fit(run_id, task)
    }

    fn evaluate(&mut self, run_id: &str, task: &EvaluateTask) -> Result<EvalReport, NodeError> {
        self.lock().evaluate(run_id, task)
    }

    fn placements(&mut self, task: &PlacementTask) -> Result<PlacementReport, NodeError> {
        self.lock().placements(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_loss_is_bounded_for_certain_wrong_answers() {
        let l = mean_log_loss(&[true, false], &[0.0, 1.0]);
        assert!(l.is_finite() && (l - -(1e-12f64).ln()).abs() < 1e-3, "{l}");
        let half = mean_log_loss(&[true, false], &[0.5, 0.5]);
        assert!((half - std::f64::consts::LN_2).abs() < 1e-12);
    }
}
