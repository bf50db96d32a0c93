//! `fedslm client`: a hospital node. It loads and checks its cohort before it connects (nothing leaves the site
//! on bad data), then trains on the server's request and sends only weights, counts and losses.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use fedslm_client::{connect, Backoff, ClientConfig, ClientError, LocalTrainer, NodeEvent};
use fedslm_cohort::{
    load_center, open_cohort, stratified_folds, ImagePaths, Manifest, Patient, Sample,
};
use fedslm_model::{clinical, save, ModelCard, NetConfig, Network, NetworkKind, TrainConfig};
use fedslm_protocol::clinical::NewtonUpdate;
use fedslm_protocol::{
    close, codec, EvalReport, EvaluateTask, FitResult, FitTask, Fold, Limits, LocalObjective,
    Message, ModelKind, PlacementReport, PlacementTask, SampleCounts, ScoreHistogram, Weights,
};
use fedslm_server::evaluation::from_wire;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Client configuration (TOML): centre, server, certificate files, cohort, coding and preprocessing.
    #[arg(long)]
    config: PathBuf,
    /// Check the certificate (identity, validity, expiry), the cohort, and that the server admits this centre;
    /// then exit.
    #[arg(long, conflicts_with = "dry_run")]
    check: bool,
    /// Load the cohort and print what would leave the site each round (message kinds and sizes); connect to
    /// nothing.
    #[arg(long)]
    dry_run: bool,
    /// Give up after this many failed connection attempts in a row (default: keep trying).
    #[arg(long)]
    max_attempts: Option<u32>,
}

/// The centre's data, loaded and checked.
struct Cohort {
    center: String,
    manifest: Manifest,
    samples: Vec<Sample>,
}

/// Which of a centre's labelled patients a task is about.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// Every labelled patient.
    All,
    /// Every labelled patient outside the fold (a fit task's training set).
    Outside(Fold),
    /// The fold's patients only (an evaluation of a held-out fold).
    Inside(Fold),
}

impl Part {
    fn fit(fold: Option<Fold>) -> Part {
        fold.map_or(Part::All, Part::Outside)
    }

    fn evaluate(fold: Option<Fold>) -> Part {
        fold.map_or(Part::All, Part::Inside)
    }
}

impl Cohort {
    /// Patients with images and a known outcome in `part`: those a network trains and is evaluated on.
    fn labelled_samples(&self, part: Part) -> Vec<&Sample> {
        let folds = self.folds(part);
        self.samples
            .iter()
            .filter(|s| s.label.is_some() && folds.keeps(&s.patient_id))
            .collect()
    }

    /// Patients with a known outcome in `part`: those the clinical model is fitted and evaluated on.
    fn labelled_patients(&self, part: Part) -> Vec<&Patient> {
        let folds = self.folds(part);
        self.manifest
            .patients
            .iter()
            .filter(|p| p.slm.is_some() && folds.keeps(&p.id))
            .collect()
    }

    /// The fold of each labelled patient under `part`'s split: stratified by outcome over the manifest's
    /// labelled patients in manifest order, with the fold's seed mixed with the centre id. The clinical model and
    /// the networks use the same split (a patient without images is simply absent from the networks').
    fn folds(&self, part: Part) -> FoldFilter<'_> {
        let fold = match part {
            Part::All => {
                return FoldFilter {
                    part,
                    of: Default::default(),
                }
            }
            Part::Outside(f) | Part::Inside(f) => f,
        };
        let labelled: Vec<&Patient> = self
            .manifest
            .patients
            .iter()
            .filter(|p| p.slm.is_some())
            .collect();
        let labels: Vec<bool> = labelled.iter().map(|p| p.slm == Some(true)).collect();
        let assigned = stratified_folds(
            &labels,
            fold.count as usize,
            centre_seed(fold.seed, &self.center),
        );
        FoldFilter {
            part,
            of: labelled
                .iter()
                .map(|p| p.id.as_str())
                .zip(assigned)
                .collect(),
        }
    }

    fn counts(&self) -> SampleCounts {
        let labelled = self.manifest.patients.iter().filter(|p| p.slm.is_some());
        SampleCounts {
            patients: self.manifest.patients.len() as u64,
            positives: labelled.filter(|p| p.slm == Some(true)).count() as u64,
            with_images: self.samples.len() as u64,
        }
    }
}

fn load_cohort(config: &ClientConfig) -> anyhow::Result<Cohort> {
    let Some(dir) = &config.cohort else {
        bail!("client.toml has no cohort: name the folder that holds this centre's manifest.csv");
    };
    let mut centres = open_cohort(dir, &config.coding, &[])?;
    if centres.len() != 1 {
        bail!(
            "{}: a node holds one centre's cohort, found {} ({})",
            dir.display(),
            centres.len(),
            centres
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (center, manifest) = centres.remove(0);
    let has_images = |p: &Patient| {
        ImagePaths::COLUMNS
            .iter()
            .any(|c| p.images.get(c).is_some())
    };
    if !manifest.patients.iter().any(has_images) {
        // A centre with clinical data only can still take part in the clinical model.
        return Ok(Cohort {
            center,
            manifest,
            samples: Vec::new(),
        });
    }
    let (samples, _) = load_center(
        &manifest,
        &center,
        &config.coding,
        &config.preprocess,
        config.cache.as_deref(),
    )
    .with_context(|| format!("cohort {}", dir.display()))?;
    Ok(Cohort {
        center,
        manifest,
        samples,
    })
}

pub fn run(args: ClientArgs) -> anyhow::Result<()> {
    let config = ClientConfig::load(&args.config)?;
    if let Some(n) = config.threads {
        // Before any pool exists: candle's kernels and the loaders size theirs from it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if args.check {
        check_certificate(&config, &args.config)?;
    }
    let cohort = load_cohort(&config)?;
    let counts = cohort.counts();
    println!(
        "cohort: centre {}, {} patients ({} with SLM), {} with images",
        cohort.center, counts.patients, counts.positives, counts.with_images
    );
    if args.dry_run {
        return dry_run(&config, &cohort, counts);
    }
    super::runtime()?.block_on(async {
        if args.check {
            let session = match connect(&config, counts).await {
                Ok(s) => s,
                Err(e @ ClientError::Timeout { .. }) => bail!(
                    "{e}\nfedslm speaks QUIC, over UDP: check that UDP port {} is open on every firewall \
                     between this node and the server (TCP being open is not enough)",
                    config.server.rsplit(':').next().unwrap_or("?")
                ),
                Err(e) => return Err(e.into()),
            };
            let w = session.welcome.clone();
            println!(
                "server: {} admitted centre {} to run {} as {:?}, {} rounds",
                session.remote_address(),
                w.center,
                w.run_id,
                w.role,
                w.rounds
            );
            session.close(close::DONE, "check done").await;
            return Ok(());
        }
        let trainer = NodeTrainer {
            config: config.clone(),
            cohort,
            network: None,
            kept: VecDeque::new(),
        };
        let backoff = Backoff {
            attempts: args.max_attempts,
            ..Backoff::default()
        };
        let finish = fedslm_client::run(&config, counts, trainer, backoff, |e| match e {
            NodeEvent::Admitted { run_id } => println!("admitted to run {run_id}"),
            NodeEvent::Trained {
                round,
                examples,
                loss,
            } => println!("round {round}: trained on {examples} patients, loss {loss:.4}"),
            NodeEvent::Refused { round, reason } => {
                println!("round {round}: the server refused this update: {reason}")
            }
            NodeEvent::Void { round } => println!("round {round}: closed before this update"),
            NodeEvent::Reconnecting { after, reason } => {
                println!("{reason}; reconnecting in {:.1} s", after.as_secs_f64())
            }
            NodeEvent::Accepted { round } => println!("round {round}: update accepted"),
        })
        .await?;
        println!(
            "run {} finished after {} rounds: {}",
            finish.run_id, finish.rounds_completed, finish.reason
        );
        Ok(())
    })
}

fn check_certificate(config: &ClientConfig, path: &Path) -> anyhow::Result<()> {
    let cert = CertificateDer::from_pem_file(&config.tls.cert)
        .with_context(|| format!("cannot read certificate {}", config.tls.cert.display()))?;
    let certified = fedslm_certs::center_of(&cert)
        .with_context(|| format!("certificate {}", config.tls.cert.display()))?;
    if certified != config.center {
        bail!(
            "{} says centre {}, but certificate {} is centre {certified}'s",
            path.display(),
            config.center,
            config.tls.cert.display()
        );
    }
    let (not_before, not_after) = fedslm_certs::validity_of(&cert)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let day = 86_400;
    if now < not_before {
        bail!(
            "certificate {} is not valid yet (from {} days from now): check this machine's clock",
            config.tls.cert.display(),
            (not_before - now) / day
        );
    }
    if now > not_after {
        bail!(
            "certificate {} expired {} days ago: ask the coordinating centre for a new one",
            config.tls.cert.display(),
            (now - not_after) / day
        );
    }
    let left = (not_after - now) / day;
    println!(
        "certificate: centre {certified}, valid for {left} more days ({}){}",
        config.tls.cert.display(),
        if left < 30 { ": renew it soon" } else { "" }
    );
    Ok(())
}

/// What each kind of run would send from this site, as the encoded frames' sizes.
fn dry_run(config: &ClientConfig, cohort: &Cohort, counts: SampleCounts) -> anyhow::Result<()> {
    let limits = Limits::default();
    let size = |m: &Message| -> anyhow::Result<usize> { Ok(codec::encode(m, &limits)?.len()) };
    let hello = Message::Hello(fedslm_client::hello(config, counts));
    println!("once per connection: Hello, {} bytes (protocol and software versions, centre id, settings hash, counts: {} patients, {} with SLM, {} with images)",
        size(&hello)?, counts.patients, counts.positives, counts.with_images);
    let p = clinical::names().len();
    let newton = NewtonUpdate::zeros(p).to_weights()?;
    let result = |weights: Weights| {
        Message::FitResult(FitResult {
            round: 1,
            weights,
            examples: counts.patients,
            train_loss: 0.0,
        })
    };
    println!(
        "each round, clinical model (federated Newton): FitResult, {} bytes (gradient [{p}], Hessian [{p}x{p}], log-likelihood, patient count)",
        size(&result(newton))?
    );
    let pre = &config.preprocess;
    for (kind, name, clinical_features) in [
        (NetworkKind::Mri, "mri", 0),
        (
            NetworkKind::Combined,
            "combined",
            clinical::names().len() - 1,
        ),
    ] {
        let cfg = NetConfig::compact(pre.channels(), pre.size, clinical_features);
        let net = Network::new(kind, cfg, 0)?;
        println!(
            "each round, {name} network (default {}): FitResult, {} bytes (weights, patient count, training loss)",
            net.describe(),
            size(&result(net.to_weights()?))?
        );
    }
    println!(
        "never: images, patient ids, clinical rows or predictions ({} patients' data stay at {})",
        cohort.manifest.patients.len(),
        cohort.center
    );
    Ok(())
}

/// Each labelled patient's fold, and which part a task keeps.
struct FoldFilter<'a> {
    part: Part,
    of: std::collections::HashMap<&'a str, usize>,
}

impl FoldFilter<'_> {
    fn keeps(&self, patient: &str) -> bool {
        match self.part {
            Part::All => true,
            Part::Outside(f) => self.of.get(patient).is_some_and(|&i| i != f.index as usize),
            Part::Inside(f) => self.of.get(patient) == Some(&(f.index as usize)),
        }
    }
}

/// A node's trainer shared between runs (a simulation runs many federations over the same loaded cohorts).
pub struct SharedTrainer(pub std::sync::Arc<std::sync::Mutex<NodeTrainer>>);

impl LocalTrainer for SharedTrainer {
    fn fit(&mut self, task: &FitTask) -> Result<FitResult, String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).fit(task)
    }

    fn evaluate(&mut self, run_id: &str, task: &EvaluateTask) -> Result<EvalReport, String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .evaluate(run_id, task)
    }

    fn placements(&mut self, task: &PlacementTask) -> Result<PlacementReport, String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .placements(task)
    }
}

/// A node's trainer over the cohort of `config`, loaded and checked; with what the node tells the server.
pub fn node_trainer(config: &ClientConfig) -> anyhow::Result<(NodeTrainer, SampleCounts)> {
    let cohort = load_cohort(config)?;
    let counts = cohort.counts();
    Ok((
        NodeTrainer {
            config: config.clone(),
            cohort,
            network: None,
            kept: VecDeque::new(),
        },
        counts,
    ))
}

/// Runs whose evaluation scores a node keeps for paired comparisons; older ones are forgotten.
const KEPT_RUNS: usize = 256;

/// A patient's score in an evaluation, kept at the node (it never leaves it).
#[derive(Debug)]
struct Scored {
    patient: String,
    label: bool,
    probability: f64,
}

/// The file of a run's kept scores. A run id comes from the server: only plain names become file names.
fn scores_path(dir: &Path, run_id: &str) -> anyhow::Result<PathBuf> {
    let plain = !run_id.is_empty()
        && run_id.len() <= 128
        && !run_id.starts_with('.')
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        bail!("run id {run_id:?} is not a plain name (letters, digits, '.', '_', '-')");
    }
    Ok(dir.join(format!("{run_id}.csv")))
}

/// Writes a run's scores to `dir/<run id>.csv`, whole or not at all.
fn keep_scores(dir: &Path, run_id: &str, scored: &[Scored]) -> anyhow::Result<()> {
    let path = scores_path(dir, run_id)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut csv = String::from("patient_id,label,probability\n");
    for s in scored {
        csv += &format!(
            "{},{},{:.17}\n",
            s.patient,
            u8::from(s.label),
            s.probability
        );
    }
    let pending = path.with_extension("csv.pending");
    std::fs::write(&pending, csv).with_context(|| format!("cannot write {}", pending.display()))?;
    std::fs::rename(&pending, &path).with_context(|| format!("cannot write {}", path.display()))
}

fn read_scores(dir: &Path, run_id: &str) -> anyhow::Result<Vec<Scored>> {
    let path = scores_path(dir, run_id)?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("this node has no evaluation of it (no {})", path.display()))?;
    let mut lines = text.lines().enumerate();
    if lines.next().map(|(_, h)| h) != Some("patient_id,label,probability") {
        bail!("{}: not a scores file (its header)", path.display());
    }
    lines
        .map(|(i, line)| {
            let bad = || anyhow::anyhow!("{} line {}: {line:?}", path.display(), i + 1);
            let mut f = line.split(',');
            let (Some(patient), Some(label), Some(p), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(bad());
            };
            let label = match label {
                "0" => false,
                "1" => true,
                _ => return Err(bad()),
            };
            let probability: f64 = p.parse().map_err(|_| bad())?;
            if !(0.0..=1.0).contains(&probability) {
                return Err(bad());
            }
            Ok(Scored {
                patient: patient.to_string(),
                label,
                probability,
            })
        })
        .collect()
}

/// Training at this node, on the server's request.
pub struct NodeTrainer {
    config: ClientConfig,
    cohort: Cohort,
    /// The network of the last task, reused while the architecture stays the same.
    network: Option<Network>,
    /// Each run's last evaluation, patient by patient, for the second pass of paired tests.
    kept: VecDeque<(String, Vec<Scored>)>,
}

impl LocalTrainer for NodeTrainer {
    fn fit(&mut self, task: &FitTask) -> Result<FitResult, String> {
        let result = match task.objective {
            LocalObjective::NewtonStep => self.newton(task),
            LocalObjective::Plain | LocalObjective::Proximal { .. } => self.train(task),
        }
        .map_err(|e| format!("{e:#}"))?;
        if let Some(dir) = &self.config.record {
            self.record(dir, task, &result)
                .map_err(|e| format!("cannot keep a copy of the update: {e:#}"))?;
        }
        Ok(result)
    }

    fn evaluate(&mut self, run_id: &str, task: &EvaluateTask) -> Result<EvalReport, String> {
        let (report, scored) = self.evaluate_all(task).map_err(|e| format!("{e:#}"))?;
        if let Some(dir) = &self.config.scores {
            keep_scores(dir, run_id, &scored)
                .map_err(|e| format!("cannot keep this run's scores: {e:#}"))?;
        }
        self.kept.retain(|(r, _)| r != run_id);
        if self.kept.len() == KEPT_RUNS {
            self.kept.pop_front();
        }
        self.kept.push_back((run_id.to_string(), scored));
        Ok(report)
    }

    fn placements(&mut self, task: &PlacementTask) -> Result<PlacementReport, String> {
        self.placement_sums(task).map_err(|e| format!("{e:#}"))
    }
}

impl NodeTrainer {
    /// The placement sums of the kept scores of the task's runs: each patient scored under both models, its
    /// placements among the pooled scores of the other class.
    fn placement_sums(&self, task: &PlacementTask) -> anyhow::Result<PlacementReport> {
        let side = |runs: &[String],
                    model: &str|
         -> anyhow::Result<BTreeMap<String, (bool, f64)>> {
            let mut scores = BTreeMap::new();
            for run in runs {
                let from_disk;
                let kept = match self.kept.iter().find(|(r, _)| r == run) {
                    Some((_, kept)) => kept,
                    None => match &self.config.scores {
                        Some(dir) => {
                            from_disk = read_scores(dir, run)
                                .with_context(|| format!("model {model}: run {run:?}"))?;
                            &from_disk
                        }
                        None => bail!("model {model}: this node has no evaluation of run {run:?}"),
                    },
                };
                for s in kept {
                    if scores
                        .insert(s.patient.clone(), (s.label, s.probability))
                        .is_some()
                    {
                        bail!(
                            "model {model}: patient {} is scored in more than one run",
                            s.patient
                        );
                    }
                }
            }
            Ok(scores)
        };
        let a = side(&task.a_runs, "A")?;
        let b = side(&task.b_runs, "B")?;
        if !a.keys().eq(b.keys()) {
            bail!(
                "model A scored {} patients here and model B {}, not all the same: a paired test needs the \
                 same patients",
                a.len(),
                b.len()
            );
        }
        let mut labels = Vec::with_capacity(a.len());
        let (mut pa, mut pb) = (Vec::with_capacity(a.len()), Vec::with_capacity(a.len()));
        for ((patient, (ya, sa)), (yb, sb)) in a.iter().zip(b.values()) {
            if ya != yb {
                bail!("patient {patient} has different outcomes in the two runs");
            }
            labels.push(*ya);
            pa.push(*sa);
            pb.push(*sb);
        }
        let s = fedslm_metrics::PlacementSums::from_patients(
            &from_wire(&task.pooled_a),
            &from_wire(&task.pooled_b),
            &labels,
            &pa,
            &pb,
        )?;
        Ok(PlacementReport {
            n_positive: s.n_positive,
            n_negative: s.n_negative,
            positive: s.positive,
            negative: s.negative,
        })
    }

    /// Predictions for every labelled local patient, as counts, mean log-loss and per-class histograms, and
    /// the patients' scores for the node to keep.
    fn evaluate_all(&mut self, task: &EvaluateTask) -> anyhow::Result<(EvalReport, Vec<Scored>)> {
        let part = Part::evaluate(task.fold);
        let (ids, (labels, probs)): (Vec<String>, (Vec<bool>, Vec<f64>)) = match task.model {
            ModelKind::Clinical => {
                let beta = clinical::coefficients(&task.weights)?;
                self.cohort
                    .labelled_patients(part)
                    .into_iter()
                    .filter_map(|p| {
                        p.slm.map(|y| {
                            (
                                p.id.clone(),
                                (y, clinical::predict(&self.config.coding, &beta, p)),
                            )
                        })
                    })
                    .unzip()
            }
            ModelKind::Mri | ModelKind::Combined => {
                let network = network_for(
                    &mut self.network,
                    &self.config,
                    &self.cohort,
                    task.model,
                    &task.weights,
                    0,
                )?;
                let labelled = self.cohort.labelled_samples(part);
                let probs = network.predict(&labelled)?;
                (
                    labelled.iter().map(|s| s.patient_id.clone()).collect(),
                    (
                        labelled.iter().map(|s| s.label == Some(true)).collect(),
                        probs,
                    ),
                )
            }
        };
        if labels.is_empty() {
            bail!("no patient with a known SLM outcome to evaluate on");
        }
        let h = fedslm_metrics::ScoreHistograms::from_scores(
            &labels,
            &probs,
            task.histogram_bins as usize,
        )?;
        let loss = labels
            .iter()
            .zip(&probs)
            .map(|(&y, &p)| {
                let p = p.clamp(1e-12, 1.0 - 1e-12);
                if y {
                    -p.ln()
                } else {
                    -(1.0 - p).ln()
                }
            })
            .sum::<f64>()
            / labels.len() as f64;
        let report = EvalReport {
            round: task.round,
            examples: labels.len() as u64,
            positives: labels.iter().filter(|&&y| y).count() as u64,
            loss,
            histogram: ScoreHistogram {
                positive: h.positive,
                negative: h.negative,
            },
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

    fn newton(&self, task: &FitTask) -> anyhow::Result<FitResult> {
        let beta = clinical::coefficients(&task.weights)?;
        let patients = self.cohort.labelled_patients(Part::fit(task.fold));
        let s = clinical::local_stats(&self.config.coding, &patients, &beta)?;
        if s.n == 0 {
            bail!("no patient with a known SLM outcome");
        }
        let update = NewtonUpdate {
            gradient: s.gradient,
            hessian: s.hessian,
            log_likelihood: s.log_likelihood,
            fitted_exactly: s.fitted_exactly,
        };
        Ok(FitResult {
            round: task.round,
            weights: update.to_weights()?,
            examples: s.n,
            train_loss: -s.log_likelihood / s.n as f64,
        })
    }

    fn train(&mut self, task: &FitTask) -> anyhow::Result<FitResult> {
        if task.model == ModelKind::Clinical {
            bail!("the clinical model is fitted by federated Newton, not trained");
        }
        let network = network_for(
            &mut self.network,
            &self.config,
            &self.cohort,
            task.model,
            &task.weights,
            task.seed,
        )?;
        let train = self.cohort.labelled_samples(Part::fit(task.fold));
        if train.len() < 2 {
            bail!(
                "{} patients with images and an outcome: too few to train",
                train.len()
            );
        }
        let train_cfg = TrainConfig {
            epochs: task.local_epochs as usize,
            batch_size: task.batch_size as usize,
            learning_rate: task.learning_rate,
            proximal_mu: match task.objective {
                LocalObjective::Proximal { mu } => Some(mu),
                _ => None,
            },
            seed: centre_seed(task.seed, &self.cohort.center),
            ..TrainConfig::default()
        };
        let reports = network.fit(&train, &train_cfg, |r| {
            tracing::debug!(round = task.round, epoch = r.epoch, loss = r.loss, "epoch");
        })?;
        Ok(FitResult {
            round: task.round,
            weights: network.to_weights()?,
            examples: train.len() as u64,
            train_loss: reports.last().map_or(f64::NAN, |r| r.loss),
        })
    }

    /// A copy of what leaves the site: `round-NNNN.safetensors`, the count and loss in its card.
    fn record(&self, dir: &Path, task: &FitTask, result: &FitResult) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let model = match task.objective {
            LocalObjective::NewtonStep => "newton-statistics",
            _ => match task.model {
                ModelKind::Mri => "mri",
                ModelKind::Combined => "combined",
                ModelKind::Clinical => "clinical",
            },
        };
        let card = ModelCard {
            training: json!({
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
        )?;
        Ok(())
    }
}

/// The node's network for `weights` (built again only when the architecture changes), loaded with them.
fn network_for<'a>(
    slot: &'a mut Option<Network>,
    config: &ClientConfig,
    cohort: &Cohort,
    model: ModelKind,
    weights: &Weights,
    seed: u64,
) -> anyhow::Result<&'a Network> {
    let kind = match model {
        ModelKind::Mri => NetworkKind::Mri,
        ModelKind::Combined => NetworkKind::Combined,
        ModelKind::Clinical => bail!("the clinical model is not a network"),
    };
    if cohort.samples.is_empty() {
        bail!(
            "this centre's manifest names no images: it can take part in the clinical model only"
        );
    }
    let cfg = NetConfig::from_weights(weights, config.preprocess.size)
        .map_err(|e| anyhow::anyhow!("the task's network: {e}"))?;
    if cfg.in_channels != config.preprocess.channels() {
        bail!(
            "the task's network takes {} channels; this node's preprocessing makes {}",
            cfg.in_channels,
            config.preprocess.channels()
        );
    }
    if !slot
        .as_ref()
        .is_some_and(|n| n.kind == kind && n.config == cfg)
    {
        *slot = Some(Network::new(kind, cfg, seed)?);
    }
    let Some(network) = slot.as_ref() else {
        bail!("no network");
    };
    network.load_weights(weights)?;
    Ok(network)
}

/// A round's training seed made this centre's own (FNV-1a over the centre id, mixed into the round seed).
fn centre_seed(seed: u64, center: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in center.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    seed ^ h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_scores_round_trip_and_a_run_id_never_leaves_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let scored = vec![
            Scored {
                patient: "P1".into(),
                label: true,
                probability: 0.123_456_789_012_345_67,
            },
            Scored {
                patient: "P2".into(),
                label: false,
                probability: 1.0,
            },
        ];
        keep_scores(tmp.path(), "combined-fold-2", &scored).unwrap();
        let back = read_scores(tmp.path(), "combined-fold-2").unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].patient, "P1");
        assert!(back[0].label && !back[1].label);
        assert_eq!(back[0].probability, scored[0].probability);
        for bad in ["../escape", "", ".hidden", "a/b", "a b"] {
            let e = keep_scores(tmp.path(), bad, &scored)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a plain name"), "{bad}: {e}");
            assert!(read_scores(tmp.path(), bad).is_err());
        }
        let e = read_scores(tmp.path(), "never-run")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no evaluation"), "{e}");
        std::fs::write(
            tmp.path().join("broken.csv"),
            "patient_id,label,probability\nP1,2,0.5\n",
        )
        .unwrap();
        let e = format!("{:#}", read_scores(tmp.path(), "broken").unwrap_err());
        assert!(e.contains("line 2"), "{e}");
    }
}
