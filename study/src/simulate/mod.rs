//! `fedslm simulate`: the study, federated, on one machine. A fresh PKI, a real server and one real node per
//! centre on loopback QUIC with mutual TLS (in this process: the same endpoint and node code as `fedslm server`
//! and `fedslm client`), for each model: a federated k-fold cross-validation (each training centre holds out
//! its fold i in federation i; the folds' held-out histograms pooled give the internal estimate), then a
//! federation on all the training data, whose model the held-out centre validates externally. Only
//! histograms, counts and losses come back; the statistics are computed from them.

mod compare;
pub mod configs;
mod federation;
pub mod privacy;
pub mod report;
pub mod results;
mod shift;
pub mod spread;
mod standardise;
pub mod tradeoff;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fedslm_cohort::synth::{write_cohort, Geometry, Plan, Preset};
use fedslm_metrics::{self as m, LogisticFit, ScoreHistograms};
use fedslm_model::ModelKind;
use fedslm_node::{Node, SharedNode};
use fedslm_protocol::Role;
use fedslm_server::evaluation::AucSummary;

pub use federation::run_id;
use results::{
    AtCutoff, CentralisedResult, ModelResults, RoundsRecord, SettingsRecord, SideResult,
    StudyResults,
};
pub use shift::ShiftMethods;

use crate::centralised::{train, TrainProgress, TrainSpec};
use crate::score::{binned_rows, histogram_report, Predictions, ScoreReport};
use crate::{Context, NetSpec, StudyError};

/// What `fedslm simulate` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A multi-centre cohort (one folder per centre with its manifest.csv); `None`: write the `study`
    /// synthetic cohort into the output folder.
    pub cohort: Option<PathBuf>,
    /// A new (or empty) folder for everything the run writes.
    pub out: PathBuf,
    /// Models to federate; combined brings clinical with it (its head starts at the clinical fit).
    pub models: Vec<ModelKind>,
    /// Cross-validation folds (each a federation); 0: no cross-validation (no internal estimate).
    pub folds: u32,
    /// Rounds of each network's federation (the clinical model runs federated Newton to convergence).
    pub rounds: u32,
    /// Local epochs per round at each training centre.
    pub local_epochs: u32,
    pub holdout: Holdout,
    /// Bins of the score histograms the centres send.
    pub bins: u32,
    /// The synthetic cohort's seed, and the training seed where `training_seed` is unset.
    pub seed: u64,
    /// The seed of the initial weights, folds, batches and augmentation; `None`: `seed`.
    pub training_seed: Option<u64>,
    /// The centralised baseline (centralised training on the training centres pooled, same folds and epochs).
    pub centralised: bool,
    /// Every site under differential privacy with this ε per federation (`privacy`); `None`: in the clear.
    pub dp_epsilon: Option<f64>,
    /// Secure aggregation in every federation: the server sees only sums of three or more centres (the
    /// training centres' updates, Newton statistics, evaluations and placement sums); each training site's
    /// policy requires it.
    pub secure_aggregation: bool,
    /// The methods against scanner shift the study uses.
    pub shift: ShiftMethods,
}

impl Default for Settings {
    /// The study's defaults.
    fn default() -> Settings {
        Settings {
            cohort: None,
            out: PathBuf::from("simulation"),
            models: ModelKind::ALL.to_vec(),
            folds: 5,
            rounds: 10,
            local_epochs: 3,
            holdout: Holdout::Default,
            bins: 1000,
            seed: 42,
            training_seed: None,
            centralised: true,
            dp_epsilon: None,
            secure_aggregation: false,
            shift: ShiftMethods::DEFAULT,
        }
    }
}

/// The centre held out for external validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holdout {
    /// `external`, where the cohort has a centre of that name; else none.
    Default,
    None,
    Center(String),
}

impl Holdout {
    /// The held-out centre among `names`, refused where the named one is not there.
    fn resolve(&self, names: &[String]) -> Result<Option<String>, StudyError> {
        match self {
            Holdout::None => Ok(None),
            Holdout::Default => Ok(names.iter().find(|n| *n == "external").cloned()),
            Holdout::Center(c) if names.contains(c) => Ok(Some(c.clone())),
            Holdout::Center(c) => Err(StudyError::Refused(format!(
                "--holdout {c}: no such centre; the cohort has {}",
                names.join(", ")
            ))),
        }
    }
}

impl Settings {
    /// The seed of everything trained: initial weights, folds, batches, augmentation.
    pub fn training_seed(&self) -> u64 {
        self.training_seed.unwrap_or(self.seed)
    }

    /// The models to run in the study's order: combined brings clinical (its head starts at the clinical
    /// fit), which runs first. The second value says whether clinical was asked for itself.
    fn ordered_models(&self) -> (Vec<ModelKind>, bool) {
        let requested = self.models.contains(&ModelKind::Clinical);
        let mut models = self.models.clone();
        if models.contains(&ModelKind::Combined) {
            models.push(ModelKind::Clinical);
        }
        models.sort();
        models.dedup();
        (models, requested)
    }

    /// Refuses, by name, settings that cannot work, before anything is written.
    pub fn check(&self) -> Result<(), StudyError> {
        if self.folds == 1 || self.folds > fedslm_protocol::MAX_FOLDS {
            return Err(StudyError::Refused(format!(
                "--folds {}: 0 (no cross-validation) or 2 to {}",
                self.folds,
                fedslm_protocol::MAX_FOLDS
            )));
        }
        if self.rounds == 0 || self.local_epochs == 0 {
            return Err(StudyError::Refused(
                "--rounds and --local-epochs must be at least 1".into(),
            ));
        }
        let max_bins = fedslm_protocol::Limits::default().max_histogram_bins;
        if self.bins < 2 || self.bins > max_bins {
            return Err(StudyError::Refused(format!(
                "--bins {}: 2 to {max_bins}",
                self.bins
            )));
        }
        if self.models.is_empty() {
            return Err(StudyError::Refused("--models names no model".into()));
        }
        if !(self.shift.smooth_mm.is_finite() && (0.0..=10.0).contains(&self.shift.smooth_mm)) {
            return Err(StudyError::Refused(format!(
                "--smooth-mm {}: 0 to 10",
                self.shift.smooth_mm
            )));
        }
        if !(self.shift.fov_mm.is_finite() && (0.0..=500.0).contains(&self.shift.fov_mm)) {
            return Err(StudyError::Refused(format!(
                "--fov-mm {}: 0 to 500",
                self.shift.fov_mm
            )));
        }
        if let Some(e) = self.dp_epsilon {
            if !(e.is_finite() && e > 0.0) {
                return Err(StudyError::Refused(format!(
                    "--dp-epsilon {e}: must be a positive number"
                )));
            }
            if self.shift.standardise {
                return Err(StudyError::Refused(
                    "--shift standardise with --dp-epsilon: the landmarks round sends each centre's image \
                     landmarks without noise, which a site under differential privacy refuses"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// What a simulation tells whoever watches it.
#[derive(Debug, Clone)]
pub enum StudyEvent<'a> {
    /// A line a person reading the run wants to see: a centre loaded, a fold's result, a test.
    Milestone(String),
    /// The synthetic cohort is being written: `done` of `total` patients.
    WritingCohort { done: usize, total: usize },
    /// A federation named `label` begins, of `rounds` rounds.
    FederationStarted { label: &'a str, rounds: u32 },
    /// Its round `round` was committed.
    RoundCommitted {
        label: &'a str,
        round: u32,
        summary: String,
    },
    /// It ended.
    FederationEnded { label: &'a str },
    /// The centralised baseline of `model` is training.
    Centralised {
        model: ModelKind,
        progress: TrainProgress<'a>,
    },
}

/// Whoever watches a simulation (a terminal's progress bars, a log): called from the simulation's threads.
pub type Observer<'a> = &'a (dyn Fn(StudyEvent<'_>) + Sync);

/// A running simulation's fixed parts.
pub(crate) struct Simulation<'a> {
    pub(crate) settings: Settings,
    pub(crate) out: PathBuf,
    pub(crate) cohort: PathBuf,
    pub(crate) pki: PathBuf,
    pub(crate) centers: Vec<(String, Role)>,
    /// Each centre's node, its cohort loaded once for every federation (again once the intensity scale is
    /// agreed).
    pub(crate) nodes: Vec<(String, SharedNode)>,
    /// The intensity scale the landmarks round agreed, under `--shift standardise`.
    pub(crate) scale: Option<fedslm_cohort::IntensityScale>,
    pub(crate) observer: Observer<'a>,
}

impl Simulation<'_> {
    /// The network settings every centre and the centralised baseline share: the shift methods', on the
    /// agreed intensity scale if there is one.
    pub(crate) fn net(&self) -> NetSpec {
        NetSpec {
            intensity_scale: self.scale,
            ..self.settings.shift.net()
        }
    }
}

/// One model's federations: what the results record, and the histograms and files behind them.
pub(crate) struct ModelRun {
    pub(crate) results: ModelResults,
    pub(crate) internal: Option<ScoreHistograms>,
    pub(crate) external: Option<ScoreHistograms>,
    pub(crate) fit: Option<LogisticFit>,
    /// Each fold's final model, then the final model of the federation on all training data.
    pub(crate) fold_models: Vec<PathBuf>,
    pub(crate) run_model: PathBuf,
    /// Under DP: the noise multiplier of its federation on all training data.
    pub(crate) noise_multiplier: Option<f64>,
}

/// Every model's federations, in order: the clinical model first where the combined network's head starts
/// from it, which is then skipped (with a milestone) if it cannot be fitted and was not asked for.
fn federate_models(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    models: &[ModelKind],
    clinical_requested: bool,
    phases: &mut Phases,
) -> Result<Vec<(ModelKind, ModelRun)>, StudyError> {
    let mut per_model: Vec<(ModelKind, ModelRun)> = Vec::new();
    for &model in models {
        let clinical = match model {
            ModelKind::Combined => per_model
                .iter()
                .find(|(m, _)| *m == ModelKind::Clinical)
                .map(|(_, r)| r),
            _ => None,
        };
        let r = match simulate_model(ctx, runtime, model, clinical) {
            Ok(r) => r,
            // Brought in only to start the combined network's head: without it the head starts plain.
            Err(e) if model == ModelKind::Clinical && !clinical_requested => {
                (ctx.observer)(StudyEvent::Milestone(format!(
                    "the clinical model cannot be fitted here ({e}); the combined network's head starts \
                     without it"
                )));
                continue;
            }
            Err(e) => return Err(e),
        };
        phases.done(&format!("{model} federations"));
        per_model.push((model, r));
    }
    Ok(per_model)
}

/// The wall time of a run's phases, each from the end of the last.
struct Phases {
    last: Instant,
    phases: Vec<results::Phase>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// `name` ended now: the time since the last phase is its.
    fn done(&mut self, name: &str) {
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.push(name, seconds);
    }

    /// A phase timed apart (one that ran beside the others).
    fn push(&mut self, name: &str, seconds: f64) {
        self.phases.push(results::Phase {
            name: name.to_string(),
            seconds,
        });
    }
}

/// Runs the study as `settings` say; writes results.json, report.md, figures and the final models into
/// `settings.out`, and returns the results.
pub fn run(settings: Settings, observer: Observer<'_>) -> Result<StudyResults, StudyError> {
    let started = Instant::now();
    let mut phases = Phases::new();
    settings.check()?;
    let (models, clinical_requested) = settings.ordered_models();
    let out = prepare_out(&settings.out)?;
    let cohort = match &settings.cohort {
        Some(c) => c.canonicalize().map_err(|source| StudyError::Read {
            path: c.clone(),
            source,
        })?,
        None => {
            let dir = out.join("cohort");
            write_study_cohort(&dir, settings.seed, observer)?;
            dir
        }
    };
    phases.done("cohort");
    let names = center_names(&cohort)?;
    let holdout = settings.holdout.resolve(&names)?;
    let centers: Vec<(String, Role)> = names
        .iter()
        .map(|n| {
            let role = if Some(n) == holdout.as_ref() {
                Role::Validate
            } else {
                Role::Train
            };
            (n.clone(), role)
        })
        .collect();
    if !centers.iter().any(|(_, r)| *r == Role::Train) {
        return Err(StudyError::Refused(format!(
            "no training centre left once {} is held out",
            holdout.unwrap_or_default()
        )));
    }
    let pki_dir = out.join("pki");
    configs::loopback_pki(
        &pki_dir,
        "simulation",
        centers.iter().map(|(n, _)| n.as_str()),
        30,
    )?;
    let nodes = load_nodes(
        &settings,
        &out,
        &pki_dir,
        &cohort,
        &centers,
        &settings.shift.net(),
        observer,
    )?;
    phases.done("sites (PKI, cohorts loaded and preprocessed)");
    let mut ctx = Simulation {
        settings,
        out: out.clone(),
        cohort: cohort.clone(),
        pki: pki_dir,
        centers,
        nodes,
        scale: None,
        observer,
    };
    let runtime = crate::error::runtime()?;
    if ctx.settings.shift.standardise {
        ctx.scale = Some(standardise::agree_scale(&ctx, &runtime)?);
        ctx.nodes = load_nodes(
            &ctx.settings,
            &out,
            &ctx.pki,
            &cohort,
            &ctx.centers,
            &ctx.net(),
            observer,
        )?;
        phases.done("intensity scale agreed (landmarks round), sites standardised");
    }
    let ctx = ctx;
    let federations_started = Instant::now();
    // The centralised baselines depend on nothing federated: they train on their own thread alongside the
    // federations, filling the cores that the rounds' waits leave idle. Each training is deterministic for
    // its seed and the process's thread count, so the figures are those of running them one after another.
    let mut federated_seconds = 0.0;
    let (per_model, baselines) = std::thread::scope(|scope| {
        // One thread a model: the two networks' baselines keep the cores busy once the federations end.
        let baselines: Vec<_> = if ctx.settings.centralised {
            models
                .iter()
                .map(|&m| {
                    let ctx = &ctx;
                    scope.spawn(move || (m, centralised(ctx, m)))
                })
                .collect()
        } else {
            Vec::new()
        };
        let federated = federate_models(&ctx, &runtime, &models, clinical_requested, &mut phases);
        federated_seconds = federations_started.elapsed().as_secs_f64();
        let baselines: Result<Vec<_>, StudyError> = baselines
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| StudyError::Failed("a centralised baseline stopped".into()))
            })
            .collect();
        (federated, baselines)
    });
    let mut per_model = per_model?;
    if ctx.settings.centralised {
        for (model, result) in baselines? {
            // A baseline of a model that was left out (the clinical model brought in only for the combined
            // network's head, where it cannot be fitted) is not reported, nor is its failure.
            if let Some((_, r)) = per_model.iter_mut().find(|(m, _)| *m == model) {
                r.results.centralised = Some(result?);
            }
        }
        phases.done("centralised baselines, after the last federation");
        let longest = per_model
            .iter()
            .filter_map(|(_, r)| r.results.centralised.as_ref().map(|c| c.seconds))
            .fold(0.0, f64::max);
        phases.push(
            &format!(
                "(the longest centralised baseline, beside {federated_seconds:.1} s of federations)"
            ),
            longest,
        );
    }
    let comparisons = compare::compare(&ctx, &runtime, &per_model)?;
    phases.done("paired tests");
    let s = &ctx.settings;
    let dp = match s.dp_epsilon {
        None => None,
        Some(epsilon) => Some(privacy::DpRecord {
            epsilon_per_federation: epsilon,
            delta: fedslm_client::policy::DEFAULT_DELTA,
            noise_multipliers: per_model
                .iter()
                .filter_map(|(m, r)| r.noise_multiplier.map(|n| (m.name().to_string(), n)))
                .collect(),
            study_epsilon_by_center: ctx
                .nodes
                .iter()
                .map(|(name, node)| {
                    let node = node.0.lock().unwrap_or_else(|p| p.into_inner());
                    let spent = node
                        .ledger()
                        .map(|l| l.spent(None, fedslm_client::policy::DEFAULT_DELTA))
                        .transpose()
                        .map_err(|e| StudyError::Node(Box::new(e.into())))?;
                    Ok((name.clone(), spent.map_or(0.0, |e| e.epsilon)))
                })
                .collect::<Result<_, StudyError>>()?,
        }),
    };
    let results = StudyResults {
        software: concat!("fedslm ", env!("CARGO_PKG_VERSION")).into(),
        cohort: cohort.display().to_string(),
        holdout,
        settings: SettingsRecord {
            folds: s.folds,
            rounds: s.rounds,
            local_epochs: s.local_epochs,
            bins: s.bins,
            seed: s.seed,
            training_seed: s.training_seed(),
            shift: s.shift.names(),
            intensity_scale: ctx.scale,
            network: "compact (ResNet-10, width 8, 9x64x64)".into(),
            dp,
            secure_aggregation: s.secure_aggregation,
        },
        models: per_model
            .iter()
            .map(|(m, r)| (m.name().to_string(), r.results.clone()))
            .collect(),
        comparisons,
        wall_seconds: started.elapsed().as_secs_f64(),
        peak_memory_mib: crate::runs::peak_rss_mib(),
        phases: phases.phases,
    };
    let json = serde_json::to_vec_pretty(&results)
        .map_err(|e| StudyError::Failed(format!("results.json: {e}")))?;
    crate::error::write_file(&out.join("results.json"), &json)?;
    figures(&out, &per_model, observer)?;
    let fits: Vec<(ModelKind, &LogisticFit)> = per_model
        .iter()
        .filter_map(|(m, r)| r.fit.as_ref().map(|f| (*m, f)))
        .collect();
    let md = report::report_md(&results, &fits);
    crate::error::write_file(&out.join("report.md"), md.as_bytes())?;
    Ok(results)
}

/// Each centre's node, its cohort loaded and preprocessed as `net` says, its policy and ledger as the run's
/// privacy says.
fn load_nodes(
    settings: &Settings,
    out: &Path,
    pki: &Path,
    cohort: &Path,
    centers: &[(String, Role)],
    net: &NetSpec,
    observer: Observer<'_>,
) -> Result<Vec<(String, SharedNode)>, StudyError> {
    let mut nodes = Vec::new();
    for (name, role) in centers {
        let mut config = configs::client_config(
            out,
            pki,
            name,
            Some(&cohort.join(name)),
            std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
        )?;
        if let Some(epsilon) = settings.dp_epsilon {
            config.privacy = privacy::policy(epsilon);
            config.ledger = Some(privacy::ledger(out, name));
        }
        config.augmentation = settings.shift.augmentation();
        config.preprocess = net.settings()?.1;
        let node = Node::load(&config)?;
        let counts = node.counts();
        observer(StudyEvent::Milestone(format!(
            "{name}: {} patients ({} with SLM), {} with images{}{}",
            counts.patients,
            counts.positives,
            counts.with_images,
            if *role == Role::Validate {
                ", held out for external validation"
            } else {
                ""
            },
            if net.intensity_scale.is_some() {
                ", standardised on the agreed scale"
            } else {
                ""
            }
        )));
        nodes.push((name.clone(), SharedNode::new(node)));
    }
    Ok(nodes)
}

/// The log file a command writes into the output folder before the study begins (every line of the servers
/// and nodes the study runs in its process).
pub const LOG_FILE: &str = "fedslm.log";

/// The output folder, new or empty (but for its [`LOG_FILE`]), made absolute.
pub fn prepare_out(out: &Path) -> Result<PathBuf, StudyError> {
    let read = |source| StudyError::Read {
        path: out.to_path_buf(),
        source,
    };
    let holds_more = |out: &Path| -> Result<bool, StudyError> {
        for entry in std::fs::read_dir(out).map_err(read)? {
            if entry.map_err(read)?.file_name() != LOG_FILE {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if out.exists() && holds_more(out)? {
        return Err(StudyError::Refused(format!(
            "{} is not empty; choose a new --out",
            out.display()
        )));
    }
    crate::error::create_dir(out)?;
    out.canonicalize().map_err(read)
}

/// The centres of a cohort: its sub-folders with a manifest.csv, sorted.
fn center_names(cohort: &Path) -> Result<Vec<String>, StudyError> {
    let mut names: Vec<String> = std::fs::read_dir(cohort)
        .map_err(|source| StudyError::Read {
            path: cohort.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("manifest.csv").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(StudyError::Refused(format!(
            "{}: no centre folder with a manifest.csv",
            cohort.display()
        )));
    }
    Ok(names)
}

/// The `study` synthetic cohort, written as NIfTI files and manifests into `dir`.
fn write_study_cohort(dir: &Path, seed: u64, observer: Observer<'_>) -> Result<(), StudyError> {
    let centers = Preset::Study.centers();
    let plan = Plan::natural(&centers);
    let total: usize = plan.groups.iter().map(|g| g.1.len()).sum();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let report = write_cohort(dir, seed, &centers, &plan, &Geometry::standard(), &|n| {
        let done = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        observer(StudyEvent::WritingCohort { done, total });
    })?;
    observer(StudyEvent::Milestone(format!(
        "synthetic cohort, seed {seed}: {}",
        dir.display()
    )));
    for line in report.table().lines() {
        observer(StudyEvent::Milestone(line.to_string()));
    }
    Ok(())
}

fn merge(into: &mut Option<ScoreHistograms>, h: &ScoreHistograms) -> Result<(), StudyError> {
    match into {
        Some(x) => x.merge(h)?,
        None => *into = Some(h.clone()),
    }
    Ok(())
}

/// Sensitivity and specificity of binned scores at a cut-off.
fn at_cutoff(h: &ScoreHistograms, threshold: f64) -> Option<AtCutoff> {
    let (labels, scores) = binned_rows(h);
    m::at_cutoff(&labels, &scores, threshold)
        .ok()
        .map(|c| AtCutoff {
            threshold,
            sensitivity: c.sensitivity(),
            specificity: c.specificity(),
        })
}

/// One model's cross-validation federations, its federation on all training data, and its centralised
/// baseline.
fn simulate_model(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    model: ModelKind,
    clinical: Option<&ModelRun>,
) -> Result<ModelRun, StudyError> {
    let s = &ctx.settings;
    let dir = ctx.out.join("runs").join(model.name());
    crate::error::create_dir(&dir)?;
    // The combined network's head starts at the clinical model federated on the same patients (the same
    // fold held out), so that nothing of a held-out fold reaches its initialisation.
    let init = |tag: &str, clinical: Option<&Path>| -> Result<PathBuf, StudyError> {
        let path = match clinical {
            Some(_) => dir.join(format!("init-{tag}.safetensors")),
            None => dir.join("init.safetensors"),
        };
        crate::init::initial_model(model, s.training_seed(), &ctx.net(), clinical, &path)?;
        Ok(path)
    };
    let clinical_for = |fold: Option<u32>| -> Option<&Path> {
        let c = clinical?;
        match fold {
            Some(f) => c.fold_models.get(f as usize).map(PathBuf::as_path),
            None => Some(c.run_model.as_path()),
        }
    };
    let mut internal: Option<ScoreHistograms> = None;
    let mut per_center: BTreeMap<String, Option<ScoreHistograms>> = BTreeMap::new();
    let mut fold_rounds = Vec::new();
    let mut fold_models = Vec::new();
    for fold in 0..s.folds {
        let start = init(&format!("fold-{}", fold + 1), clinical_for(Some(fold)))?;
        let f = federation::federate(ctx, runtime, model, &start, Some(fold))?;
        let e = f.evaluation.ok_or_else(|| {
            StudyError::Failed(format!("{model} fold {}: no evaluation", fold + 1))
        })?;
        // Every training centre's held-out patients: each centre's histograms, or under secure aggregation
        // their sum (no centre's own is then seen, and the per-centre table stays empty).
        if let Some(h) = e.pooled(Role::Train) {
            merge(&mut internal, &h)?;
        }
        for c in e.centers.iter().filter(|c| c.role == Role::Train) {
            merge(
                per_center.entry(c.center.to_string()).or_default(),
                &c.histogram,
            )?;
        }
        fold_rounds.push(f.rounds);
        fold_models.push(f.model);
        if let Some(h) = &internal {
            (ctx.observer)(StudyEvent::Milestone(format!(
                "{model} internal so far, folds 1-{} pooled: {}",
                fold + 1,
                AucSummary::of_histograms(h)
            )));
        }
    }
    let start = init("all", clinical_for(None))?;
    let all = federation::federate(ctx, runtime, model, &start, None)?;
    let external = all
        .evaluation
        .as_ref()
        .and_then(|e| e.pooled(Role::Validate));
    let models_dir = ctx.out.join("models");
    crate::error::create_dir(&models_dir)?;
    let final_model = models_dir.join(format!("{model}.safetensors"));
    std::fs::copy(&all.model, &final_model).map_err(|source| StudyError::Write {
        path: final_model.clone(),
        source,
    })?;
    let report = |h: &Option<ScoreHistograms>| match h {
        Some(h) => histogram_report(model.name(), h),
        None => Ok(None),
    };
    let internal_report = report(&internal)?;
    let external_report = report(&external)?;
    // The cut-off is chosen internally and applied unchanged at the external centre.
    let cutoff = internal_report.as_ref().map(|r| r.youden.threshold);
    let side = |h: &Option<ScoreHistograms>| {
        h.as_ref().map(|h| SideResult {
            auc: AucSummary::of_histograms(h),
            at_internal_youden: cutoff.and_then(|t| at_cutoff(h, t)),
        })
    };
    // Filled in by the centralised baseline, which trains alongside.
    let centralised = None;
    let head_start = match (model, clinical) {
        (ModelKind::Combined, Some(_)) => {
            Some("the clinical model federated on the same patients".to_string())
        }
        (ModelKind::Combined, None) => Some("none: no clinical model could be fitted".to_string()),
        _ => None,
    };
    let results = ModelResults {
        head_start,
        centralised,
        internal: side(&internal),
        external: side(&external),
        per_center_internal: per_center
            .iter()
            .filter_map(|(c, h)| {
                h.as_ref()
                    .map(|h| (c.clone(), AucSummary::of_histograms(h)))
            })
            .collect(),
        rounds: RoundsRecord {
            folds: fold_rounds,
            all: all.rounds,
        },
        final_model: final_model.display().to_string(),
        audit_head: all.audit_head,
        youden_cutoff: cutoff,
        internal_report,
        external_report,
    };
    Ok(ModelRun {
        results,
        internal,
        external,
        fit: all.fit,
        fold_models,
        run_model: all.model,
        noise_multiplier: all.noise_multiplier,
    })
}

/// The baseline federation is measured against: centralised training on the training centres pooled, with
/// the same number of folds, epochs (rounds x local epochs), seed and initialisation recipe, validated on the
/// same held-out centre.
fn centralised(ctx: &Simulation, model: ModelKind) -> Result<CentralisedResult, StudyError> {
    let started = Instant::now();
    let s = &ctx.settings;
    let spec = TrainSpec {
        cohort: ctx.cohort.clone(),
        model,
        centers: ctx
            .centers
            .iter()
            .filter(|(_, r)| *r == Role::Train)
            .map(|(c, _)| c.clone())
            .collect(),
        folds: s.folds as usize,
        seed: s.training_seed(),
        out: ctx.out.join("centralised").join(model.name()),
        cache: Some(ctx.out.join("cache")),
        head_from_clinical: model == ModelKind::Combined,
        net: ctx.net(),
        train: fedslm_model::TrainConfig {
            epochs: (s.rounds * s.local_epochs) as usize,
            augmentation: Some(s.shift.augmentation()),
            ..fedslm_model::TrainConfig::default()
        },
    };
    (ctx.observer)(StudyEvent::Milestone(format!(
        "{model} centralised: {} epochs on {} pooled, {} folds",
        spec.train.epochs,
        spec.centers.join(", "),
        spec.folds
    )));
    let trained = train(&spec, &mut |progress| {
        (ctx.observer)(StudyEvent::Centralised { model, progress })
    })
    .context(|| format!("the centralised {model} baseline"))?;
    let internal = trained
        .cross_validation
        .as_ref()
        .map(|(_, _, labels, scores)| AucSummary::of_scores(labels, scores));
    let external = match ctx.centers.iter().find(|(_, r)| *r == Role::Validate) {
        Some((center, _)) => {
            let (coding, preprocess) = ctx.net().settings()?;
            let (manifest, probs) = crate::predict::probabilities(
                &trained.model,
                &ctx.cohort.join(center).join("manifest.csv"),
                &coding,
                &preprocess,
                Some(&ctx.out.join("cache")),
            )?;
            let (labels, scores): (Vec<bool>, Vec<f64>) = manifest
                .patients
                .iter()
                .zip(probs)
                .filter_map(|(p, s)| p.slm.map(|y| (y, s)))
                .unzip();
            Some(AucSummary::of_scores(&labels, &scores))
        }
        None => None,
    };
    Ok(CentralisedResult {
        internal,
        external,
        model: trained.model.display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// ROC, decision and calibration curves of every model, internal and external.
fn figures(
    out: &Path,
    per_model: &[(ModelKind, ModelRun)],
    observer: Observer<'_>,
) -> Result<(), StudyError> {
    type Pick = fn(&ModelRun) -> Option<&ScoreHistograms>;
    let sides: [(&str, Pick); 2] = [
        ("internal", |r| r.internal.as_ref()),
        ("external", |r| r.external.as_ref()),
    ];
    for (side, pick) in sides {
        let hists: Vec<(&str, &ScoreHistograms)> = per_model
            .iter()
            .filter_map(|(model, r)| pick(r).map(|h| (model.name(), h)))
            .collect();
        let Some(&(first_name, first)) = hists.first() else {
            continue;
        };
        if first.delong().is_err() {
            observer(StudyEvent::Milestone(format!(
                "{side} figures: none drawn: {first_name}'s {}+/{}- patients give no AUC",
                first.n_positive(),
                first.n_negative(),
            )));
            continue;
        }
        // One figure's curves share their patients (one prevalence, one treat-all line).
        let (np, nn) = (first.n_positive(), first.n_negative());
        let mut scores = Vec::new();
        let mut reports: Vec<(String, ScoreReport)> = Vec::new();
        for (name, h) in &hists {
            if (h.n_positive(), h.n_negative()) != (np, nn) {
                observer(StudyEvent::Milestone(format!(
                    "{side} figures: {name} left out: its {}+/{}- patients are not the {np}+/{nn}- of {first_name}",
                    h.n_positive(),
                    h.n_negative(),
                )));
                continue;
            }
            let Some(report) = histogram_report(name, h)? else {
                continue;
            };
            scores.push((name.to_string(), binned_rows(h).1));
            reports.push((name.to_string(), report));
        }
        let p = Predictions {
            labels: binned_rows(first).0,
            scores,
        };
        crate::figures::write_figures(&out.join("figures").join(side), &p, &reports)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_brings_clinical_first_and_bad_settings_are_refused_by_name() {
        let s = Settings {
            models: vec![ModelKind::Combined, ModelKind::Mri],
            ..Settings::default()
        };
        assert_eq!(
            s.ordered_models(),
            (ModelKind::ALL.to_vec(), false),
            "clinical comes in first, and was not asked for"
        );
        for (bad, flag) in [
            (
                Settings {
                    folds: 1,
                    ..Settings::default()
                },
                "--folds 1",
            ),
            (
                Settings {
                    folds: 101,
                    ..Settings::default()
                },
                "--folds 101",
            ),
            (
                Settings {
                    rounds: 0,
                    ..Settings::default()
                },
                "--rounds",
            ),
            (
                Settings {
                    local_epochs: 0,
                    ..Settings::default()
                },
                "--local-epochs",
            ),
            (
                Settings {
                    bins: 1,
                    ..Settings::default()
                },
                "--bins 1",
            ),
            (
                Settings {
                    models: vec![],
                    ..Settings::default()
                },
                "--models",
            ),
            (
                Settings {
                    shift: ShiftMethods {
                        smooth_mm: -1.0,
                        ..ShiftMethods::NONE
                    },
                    ..Settings::default()
                },
                "--smooth-mm -1",
            ),
            (
                Settings {
                    shift: ShiftMethods {
                        fov_mm: f64::NAN,
                        ..ShiftMethods::NONE
                    },
                    ..Settings::default()
                },
                "--fov-mm NaN",
            ),
            (
                Settings {
                    shift: ShiftMethods {
                        standardise: true,
                        ..ShiftMethods::NONE
                    },
                    dp_epsilon: Some(5.0),
                    ..Settings::default()
                },
                "--shift standardise with --dp-epsilon",
            ),
        ] {
            let e = bad.check().unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
        assert!(Settings::default().check().is_ok());
        assert!(Settings {
            folds: 0,
            ..Settings::default()
        }
        .check()
        .is_ok());
    }

    #[test]
    fn the_holdout_is_external_by_default_and_a_named_center_must_exist() {
        let names = vec!["center-a".to_string(), "external".to_string()];
        assert_eq!(
            Holdout::Default.resolve(&names).unwrap().as_deref(),
            Some("external")
        );
        assert_eq!(Holdout::Default.resolve(&names[..1]).unwrap(), None);
        assert_eq!(Holdout::None.resolve(&names).unwrap(), None);
        assert_eq!(
            Holdout::Center("center-a".into())
                .resolve(&names)
                .unwrap()
                .as_deref(),
            Some("center-a")
        );
        let e = Holdout::Center("nowhere".into())
            .resolve(&names)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nowhere") && e.contains("center-a, external"),
            "{e}"
        );
    }

    #[test]
    fn run_ids_name_the_model_and_the_fold() {
        assert_eq!(run_id(ModelKind::Mri, Some(0)), "simulate-mri-fold-1");
        assert_eq!(run_id(ModelKind::Combined, None), "simulate-combined-all");
    }

    #[test]
    fn an_output_folder_with_anything_in_it_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("sim");
        assert!(prepare_out(&out).unwrap().is_absolute());
        std::fs::write(out.join(LOG_FILE), "").unwrap();
        assert!(prepare_out(&out).is_ok(), "the command's own log file");
        std::fs::write(out.join("x"), "").unwrap();
        let e = prepare_out(&out).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
    }
}
