//! `fedslm simulate`: the study, federated, on one machine. A fresh PKI, a real server and one real client per
//! centre on loopback QUIC with mutual TLS (in this process: the same endpoint and node code as `fedslm server`
//! and `fedslm client`), for each model: a federated k-fold cross-validation (each training centre holds out
//! its fold i in federation i; the folds' held-out histograms pooled give the internal estimate), then a
//! federation on all the training data, whose model the held-out centre validates externally. Only
//! histograms, counts and losses come back; the statistics are computed from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fedslm_certs::{IssueOptions, Pki};
use fedslm_client::{Backoff, ClientConfig};
use fedslm_metrics as m;
use fedslm_model::{save, ClinicalTable, ModelCard};
use fedslm_node::{Node, SharedNode};
use fedslm_protocol::{CenterId, ModelKind, Role};
use fedslm_server::evaluation::{auc_json, Evaluation};
use fedslm_server::{Outcome, Server, ServerConfig, ServerEvent};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::evaluate::{score_report, Predictions, ScoreReport};
use super::train::NetArgs;

/// The study's figures (BMC Med Imaging 2025;25:173): internal (5-fold CV) and external AUC.
const PAPER: [(&str, f64, f64); 3] = [
    ("clinical", 0.816, 0.824),
    ("mri", 0.788, 0.662),
    ("combined", 0.887, 0.876),
];
/// Net benefit thresholds of the decision curves.
const THRESHOLDS: [f64; 19] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9, 0.95,
];

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A multi-centre cohort (one folder per centre with its manifest.csv); default: write the `study`
    /// synthetic cohort into the output folder.
    #[arg(long)]
    cohort: Option<PathBuf>,
    /// A new (or empty) folder for everything the run writes.
    #[arg(long, default_value = "simulation")]
    out: PathBuf,
    /// Models to federate; combined brings clinical with it (its head starts at the clinical fit).
    #[arg(
        long,
        value_parser = super::model_kind(),
        value_delimiter = ',',
        default_value = "clinical,mri,combined"
    )]
    models: Vec<ModelKind>,
    /// Cross-validation folds (each a federation); 0: no cross-validation (no internal estimate).
    #[arg(long, default_value_t = 5)]
    folds: u32,
    /// Rounds of each network's federation (the clinical model runs federated Newton to convergence).
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Local epochs per round at each training centre.
    #[arg(long, default_value_t = 3)]
    local_epochs: u32,
    /// The centre held out for external validation, or `none`; default: `external` if there is one.
    #[arg(long)]
    holdout: Option<String>,
    /// Bins of the score histograms the centres send.
    #[arg(long, default_value_t = 1000)]
    bins: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the centralised baseline (`fedslm train` on the training centres pooled, same folds and epochs).
    #[arg(long)]
    no_centralised: bool,
}

struct Simulation {
    out: PathBuf,
    cohort: PathBuf,
    pki: PathBuf,
    centres: Vec<(String, Role)>,
    trainers: Vec<(String, SharedNode, fedslm_protocol::SampleCounts)>,
    args: SimulateArgs,
}

/// What one federation gave.
struct Federated {
    evaluation: Option<Evaluation>,
    model: PathBuf,
    rounds: u32,
    fit: Option<m::LogisticFit>,
    audit_head: String,
}

pub fn run(mut args: SimulateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // The combined network starts from the clinical model of the same fold: clinical runs first, and always
    // where combined does.
    let clinical_requested = args.models.contains(&ModelKind::Clinical);
    if args.models.contains(&ModelKind::Combined) {
        args.models.push(ModelKind::Clinical);
    }
    args.models.sort();
    args.models.dedup();
    if args.folds == 1 || args.folds > fedslm_protocol::MAX_FOLDS {
        bail!(
            "--folds {}: 0 (no cross-validation) or 2 to {}",
            args.folds,
            fedslm_protocol::MAX_FOLDS
        );
    }
    if args.rounds == 0 || args.local_epochs == 0 {
        bail!("--rounds and --local-epochs must be at least 1");
    }
    let max_bins = fedslm_protocol::Limits::default().max_histogram_bins;
    if args.bins < 2 || args.bins > max_bins {
        bail!("--bins {}: 2 to {max_bins}", args.bins);
    }
    if args.out.exists()
        && std::fs::read_dir(&args.out)
            .with_context(|| format!("{}", args.out.display()))?
            .next()
            .is_some()
    {
        bail!("{} is not empty; choose a new --out", args.out.display());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = args
        .out
        .canonicalize()
        .with_context(|| format!("{}", args.out.display()))?;
    let cohort = match &args.cohort {
        Some(c) => c
            .canonicalize()
            .with_context(|| format!("cohort {}", c.display()))?,
        None => {
            let dir = out.join("cohort");
            super::synth::write_preset(&dir, args.seed, fedslm_cohort::synth::Preset::Study)?;
            dir
        }
    };
    let mut names: Vec<String> = std::fs::read_dir(&cohort)
        .with_context(|| format!("cohort {}", cohort.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("manifest.csv").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("{}: no centre folder with a manifest.csv", cohort.display());
    }
    let holdout = match args.holdout.as_deref() {
        Some("none") => None,
        Some(c) if names.iter().any(|n| n == c) => Some(c.to_string()),
        Some(c) => bail!(
            "--holdout {c}: no such centre; the cohort has {}",
            names.join(", ")
        ),
        None => names.iter().find(|n| *n == "external").cloned(),
    };
    let centres: Vec<(String, Role)> = names
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
    if !centres.iter().any(|(_, r)| *r == Role::Train) {
        bail!(
            "no training centre left once {} is held out",
            holdout.unwrap_or_default()
        );
    }

    let pki_dir = out.join("pki");
    let pki = Pki::init(&pki_dir, "simulation", "localhost", &["127.0.0.1".parse()?])?;
    let mut trainers = Vec::new();
    for (name, _) in &centres {
        let id = CenterId::new(name.as_str())
            .with_context(|| format!("centre folder {name:?} is not a valid centre id"))?;
        let dir = pki_dir.join("centres").join(name);
        pki.issue(&id, &dir, IssueOptions::days(30)?)?;
        let config = client_config(
            &out,
            &pki_dir,
            name,
            Some(&cohort.join(name)),
            "127.0.0.1:9",
        )?;
        let node = Node::load(&config)?;
        let counts = node.counts();
        println!(
            "{name}: {} patients ({} with SLM), {} with images{}",
            counts.patients,
            counts.positives,
            counts.with_images,
            if Some(name) == holdout.as_ref() {
                ", held out for external validation"
            } else {
                ""
            }
        );
        trainers.push((name.clone(), SharedNode::new(node), counts));
    }
    let ctx = Simulation {
        out: out.clone(),
        cohort: cohort.clone(),
        pki: pki_dir,
        centres,
        trainers,
        args,
    };
    let runtime = super::runtime()?;
    let mut results = serde_json::Map::new();
    let mut per_model = Vec::new();
    for &model in &ctx.args.models {
        let clinical = match model {
            ModelKind::Combined => per_model
                .iter()
                .find(|(m, _)| *m == ModelKind::Clinical)
                .map(|(_, r)| r),
            _ => None,
        };
        let r = match simulate_model(&ctx, &runtime, model, clinical) {
            Ok(r) => r,
            // Brought in only to start the combined network's head: without it the head starts plain.
            Err(e) if model == ModelKind::Clinical && !clinical_requested => {
                println!(
                    "the clinical model cannot be fitted here ({e:#}); the combined network's head starts \
                     without it"
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        results.insert(model.name().into(), r.json.clone());
        per_model.push((model, r));
    }
    let comparisons = compare(&ctx, &runtime, &per_model)?;
    let wall = started.elapsed().as_secs_f64();
    let peak = super::server::peak_rss_mib();
    let results = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "cohort": cohort.display().to_string(),
        "holdout": holdout,
        "settings": {
            "folds": ctx.args.folds, "rounds": ctx.args.rounds, "local_epochs": ctx.args.local_epochs,
            "bins": ctx.args.bins, "seed": ctx.args.seed, "network": "compact (ResNet-10, width 8, 9x64x64)",
        },
        "models": results,
        "comparisons": comparisons,
        "wall_seconds": wall,
        "peak_memory_mib": peak,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )
    .context("cannot write results.json")?;
    figures(&out, &per_model)?;
    let report = report_md(&results, &per_model);
    std::fs::write(out.join("report.md"), &report).context("cannot write report.md")?;
    println!("\n{}", table(&per_model, &comparisons));
    println!(
        "wall time {wall:.0} s, peak memory {peak:.0} MiB; results.json, report.md and figures/ in {}",
        out.display()
    );
    Ok(())
}

fn client_config(
    out: &Path,
    pki: &Path,
    name: &str,
    cohort: Option<&Path>,
    server: &str,
) -> anyhow::Result<ClientConfig> {
    let dir = pki.join("centres").join(name);
    let mut text = format!(
        "center = \"{name}\"\nserver = \"{server}\"\nserver_name = \"localhost\"\n\
         ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncache = \"{}\"\n",
        dir.join("ca.pem").display(),
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}.key")).display(),
        out.join("cache").display(),
    );
    if let Some(c) = cohort {
        text.push_str(&format!("cohort = \"{}\"\n", c.display()));
    }
    Ok(ClientConfig::parse(&text, &dir.join("client.toml"))?)
}

/// One model's results: the JSON for results.json, and the histograms behind it.
struct ModelResult {
    json: Value,
    internal: Option<m::ScoreHistograms>,
    external: Option<m::ScoreHistograms>,
    internal_report: Option<ScoreReport>,
    external_report: Option<ScoreReport>,
    fit: Option<m::LogisticFit>,
    /// Each fold's final model, then the final model of the federation on all training data.
    fold_models: Vec<PathBuf>,
    run_model: PathBuf,
}

fn simulate_model(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    model: ModelKind,
    clinical: Option<&ModelResult>,
) -> anyhow::Result<ModelResult> {
    let dir = ctx.out.join("runs").join(model.name());
    std::fs::create_dir_all(&dir)?;
    // The combined network's head starts at the clinical model federated on the same patients (the same
    // fold held out), so that nothing of a held-out fold reaches its initialisation.
    let init = |tag: &str, clinical: Option<&Path>| -> anyhow::Result<PathBuf> {
        let path = match clinical {
            Some(_) => dir.join(format!("init-{tag}.safetensors")),
            None => dir.join("init.safetensors"),
        };
        super::model::init(model, ctx.args.seed, &NetArgs::compact(), clinical, &path)?;
        Ok(path)
    };
    let clinical_for = |fold: Option<u32>| -> Option<&Path> {
        let c = clinical?;
        match fold {
            Some(f) => c.fold_models.get(f as usize).map(PathBuf::as_path),
            None => Some(c.run_model.as_path()),
        }
    };
    let mut internal: Option<m::ScoreHistograms> = None;
    let mut per_centre: std::collections::BTreeMap<String, m::ScoreHistograms> = Default::default();
    let mut fold_rounds = Vec::new();
    let mut fold_models = Vec::new();
    for fold in 0..ctx.args.folds {
        let start = init(&format!("fold-{}", fold + 1), clinical_for(Some(fold)))?;
        let f = federate(ctx, runtime, model, &start, Some(fold))?;
        let e = f
            .evaluation
            .with_context(|| format!("{} fold {}: no evaluation", model.name(), fold + 1))?;
        for c in e.centres.iter().filter(|c| c.role == Role::Train) {
            merge(&mut internal, &c.histogram)?;
            merge_into(&mut per_centre, c.center.as_str(), &c.histogram)?;
        }
        fold_rounds.push(f.rounds);
        fold_models.push(f.model);
        if let Some(Ok(so_far)) = internal.as_ref().map(|h| h.delong()) {
            let (lo, hi) = so_far.ci95();
            println!(
                "{} internal AUC so far, folds 1-{} pooled: {:.3} ({lo:.3}-{hi:.3}; {}+/{}-)",
                model.name(),
                fold + 1,
                so_far.auc,
                so_far.n_positive,
                so_far.n_negative
            );
        }
    }
    let start = init("all", clinical_for(None))?;
    let all = federate(ctx, runtime, model, &start, None)?;
    let external = all
        .evaluation
        .as_ref()
        .and_then(|e| e.pooled(Role::Validate));
    let final_model = ctx
        .out
        .join("models")
        .join(format!("{}.safetensors", model.name()));
    std::fs::create_dir_all(ctx.out.join("models"))?;
    std::fs::copy(&all.model, &final_model)
        .with_context(|| format!("cannot copy {}", all.model.display()))?;

    let internal_report = internal
        .as_ref()
        .map(|h| side_report(model.name(), h))
        .transpose()?;
    let external_report = external
        .as_ref()
        .map(|h| side_report(model.name(), h))
        .transpose()?;
    // The cut-off is chosen internally and applied unchanged at the external centre.
    let cutoff = internal_report.as_ref().map(|r| r.youden.threshold);
    let at = |h: &Option<m::ScoreHistograms>| -> Value {
        match (h, cutoff) {
            (Some(h), Some(t)) => {
                let (labels, scores) = pseudo(h);
                match m::at_cutoff(&labels, &scores, t) {
                    Ok(c) => {
                        json!({"threshold": t, "sensitivity": c.sensitivity(), "specificity": c.specificity()})
                    }
                    Err(_) => Value::Null,
                }
            }
            _ => Value::Null,
        }
    };
    let centralised = if ctx.args.no_centralised {
        Value::Null
    } else {
        centralised(ctx, model)?
    };
    let head_start = match (model, clinical) {
        (ModelKind::Combined, Some(_)) => {
            json!("the clinical model federated on the same patients")
        }
        (ModelKind::Combined, None) => json!("none: no clinical model could be fitted"),
        _ => Value::Null,
    };
    let json = json!({
        "head_start": head_start,
        "centralised": centralised,
        "internal": internal.as_ref().map(|h| with_at(auc_json(h), at(&internal))),
        "external": external.as_ref().map(|h| with_at(auc_json(h), at(&external))),
        "per_centre_internal": per_centre.iter().map(|(c, h)| (c.clone(), auc_json(h))).collect::<serde_json::Map<_, _>>(),
        "rounds": {"folds": fold_rounds, "final": all.rounds},
        "final_model": final_model.display().to_string(),
        "audit_head": all.audit_head,
        "youden_cutoff": cutoff,
        "internal_report": internal_report.as_ref().map(serde_json::to_value).transpose()?,
        "external_report": external_report.as_ref().map(serde_json::to_value).transpose()?,
    });
    Ok(ModelResult {
        json,
        internal,
        external,
        internal_report,
        external_report,
        fit: all.fit,
        fold_models,
        run_model: all.model,
    })
}

/// The baseline federation is measured against: `fedslm train` on the training centres pooled, with the same
/// number of folds, epochs (rounds x local epochs), seed and initialisation recipe, validated on the same
/// held-out centre.
fn centralised(ctx: &Simulation, model: ModelKind) -> anyhow::Result<Value> {
    let started = Instant::now();
    let dir = ctx.out.join("centralised").join(model.name());
    let training: Vec<&str> = ctx
        .centres
        .iter()
        .filter(|(_, r)| *r == Role::Train)
        .map(|(c, _)| c.as_str())
        .collect();
    let mut words: Vec<String> = [
        "--cohort",
        &ctx.cohort.display().to_string(),
        "--model",
        model.name(),
        "--centers",
        &training.join(","),
        "--folds",
        &ctx.args.folds.to_string(),
        "--seed",
        &ctx.args.seed.to_string(),
        "--out",
        &dir.display().to_string(),
        "--cache",
        &ctx.out.join("cache").display().to_string(),
        "--epochs",
        &(ctx.args.rounds * ctx.args.local_epochs).to_string(),
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    if model == ModelKind::Combined {
        words.push("--head-from-clinical".into());
    }
    println!(
        "{} centralised: fedslm train {}",
        model.name(),
        words.join(" ")
    );
    let trained = super::train::train(&super::train::args_from(&words)?)
        .with_context(|| format!("the centralised {} baseline", model.name()))?;
    let side = |labels: &[bool], scores: &[f64]| -> Value {
        match m::auc_delong(labels, scores) {
            Ok(e) => {
                let (lo, hi) = e.ci95();
                json!({"auc": e.auc, "ci95": [lo, hi], "n": {"positives": labels.iter().filter(|&&y| y).count(), "negatives": labels.iter().filter(|&&y| !y).count()}})
            }
            Err(e) => json!({"auc": null, "why": e.to_string()}),
        }
    };
    let internal = trained
        .out_of_fold
        .as_ref()
        .map(|(labels, scores)| side(labels, scores));
    let external = match ctx.centres.iter().find(|(_, r)| *r == Role::Validate) {
        Some((centre, _)) => {
            let (coding, preprocess) = NetArgs::compact().settings()?;
            let (manifest, probs) = super::predict::probabilities(
                &trained.model,
                &ctx.cohort.join(centre).join("manifest.csv"),
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
            Some(side(&labels, &scores))
        }
        None => None,
    };
    Ok(json!({
        "internal": internal,
        "external": external,
        "model": trained.model.display().to_string(),
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

fn with_at(mut v: Value, at: Value) -> Value {
    v["at_internal_youden"] = at;
    v
}

fn merge(into: &mut Option<m::ScoreHistograms>, h: &m::ScoreHistograms) -> anyhow::Result<()> {
    match into {
        Some(x) => x.merge(h)?,
        None => *into = Some(h.clone()),
    }
    Ok(())
}

fn merge_into(
    map: &mut std::collections::BTreeMap<String, m::ScoreHistograms>,
    key: &str,
    h: &m::ScoreHistograms,
) -> anyhow::Result<()> {
    match map.get_mut(key) {
        Some(x) => x.merge(h)?,
        None => {
            map.insert(key.to_string(), h.clone());
        }
    }
    Ok(())
}

/// The binned scores as rows, positives first: each patient stands at its bin's centre. Rows are not
/// patients' and carry no pairing between models; ROC, Youden, decision curves and calibration depend only on
/// each class's distribution, which the histograms hold exactly (to the bin).
fn pseudo(h: &m::ScoreHistograms) -> (Vec<bool>, Vec<f64>) {
    let centre = |b: usize| h.bin_value(b) + 0.5 / h.bins() as f64;
    let mut labels = Vec::new();
    let mut scores = Vec::new();
    for (class, counts) in [(true, &h.positive), (false, &h.negative)] {
        for (b, &n) in counts.iter().enumerate() {
            for _ in 0..n {
                labels.push(class);
                scores.push(centre(b));
            }
        }
    }
    (labels, scores)
}

fn side_report(name: &str, h: &m::ScoreHistograms) -> anyhow::Result<ScoreReport> {
    let (labels, scores) = pseudo(h);
    score_report(name, &labels, &scores, &THRESHOLDS)
}

/// The run id of a model's federation on fold `fold` (or on all training data): the key under which every
/// node keeps that run's evaluation scores for the paired tests.
fn run_id(model: ModelKind, fold: Option<u32>) -> String {
    match fold {
        Some(f) => format!("simulate-{}-fold-{}", model.name(), f + 1),
        None => format!("simulate-{}-all", model.name()),
    }
}

fn centres_toml(ctx: &Simulation) -> String {
    let mut toml = String::new();
    for (c, role) in &ctx.centres {
        let role = match role {
            Role::Train => "train",
            Role::Validate => "validate",
        };
        toml.push_str(&format!("[[center]]\nid = \"{c}\"\nrole = \"{role}\"\n"));
    }
    toml
}

/// Every node connected to `addr` until the server tells it the run is over.
fn start_nodes(
    ctx: &Simulation,
    addr: std::net::SocketAddr,
) -> anyhow::Result<
    Vec<tokio::task::JoinHandle<Result<fedslm_protocol::Finish, fedslm_client::ClientError>>>,
> {
    let mut clients = Vec::new();
    for (name, trainer, counts) in &ctx.trainers {
        // The node's trainer holds its cohort; this run's configuration only says where to connect.
        let config = client_config(&ctx.out, &ctx.pki, name, None, &addr.to_string())?;
        let trainer = trainer.clone();
        let counts = *counts;
        clients.push(tokio::spawn(async move {
            let backoff = Backoff {
                attempts: Some(5),
                ..Backoff::default()
            };
            fedslm_client::run(&config, counts, trainer, backoff, |_| {}).await
        }));
    }
    Ok(clients)
}

/// Paired DeLong tests of each model against the combined network, internally (pooled out-of-fold scores)
/// and externally, through the second pass: one more server, to which every node connects; each centre
/// places its patients' two kept scores in the pooled histograms the server sends and returns only sums.
fn compare(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    per_model: &[(ModelKind, ModelResult)],
) -> anyhow::Result<Vec<Value>> {
    let Some((_, b)) = per_model.iter().find(|(m, _)| *m == ModelKind::Combined) else {
        return Ok(Vec::new());
    };
    let b_model = ModelKind::Combined;
    let folds: Vec<Option<u32>> = (0..ctx.args.folds).map(Some).collect();
    let runs = |m: ModelKind, fs: &[Option<u32>]| -> Vec<String> {
        fs.iter().map(|f| run_id(m, *f)).collect()
    };
    // (a, side, pooled a, pooled b, centres, a's runs, b's runs)
    let mut plans = Vec::new();
    for (a_model, a) in per_model.iter().filter(|(m, _)| *m != b_model) {
        let sides = [
            (
                "internal",
                &a.internal,
                &b.internal,
                Role::Train,
                folds.clone(),
            ),
            (
                "external",
                &a.external,
                &b.external,
                Role::Validate,
                vec![None],
            ),
        ];
        for (side, ha, hb, role, fs) in sides {
            let (Some(ha), Some(hb)) = (ha, hb) else {
                continue;
            };
            let centres: Vec<CenterId> = ctx
                .centres
                .iter()
                .filter(|(_, r)| *r == role)
                .map(|(c, _)| CenterId::new(c.as_str()))
                .collect::<Result<_, _>>()?;
            plans.push((
                *a_model,
                side,
                ha,
                hb,
                centres,
                runs(*a_model, &fs),
                runs(b_model, &fs),
            ));
        }
    }
    if plans.is_empty() {
        return Ok(Vec::new());
    }
    let mut tasks = Vec::new();
    for (_, _, ha, hb, centres, a_runs, b_runs) in &plans {
        for c in centres {
            tasks.push((
                c.clone(),
                fedslm_protocol::PlacementTask::new(a_runs.clone(), b_runs.clone(), ha, hb),
            ));
        }
    }
    let dir = ctx.out.join("runs").join("comparisons");
    std::fs::create_dir_all(&dir)?;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\npki = \"{}\"\nrun_id = \"simulate-comparisons\"\noutput = \"{}\"\n\
         rounds = 1\n{}",
        ctx.pki.display(),
        dir.display(),
        centres_toml(ctx)
    );
    let config = ServerConfig::parse(&toml, &dir.join("server.toml"))?;
    let mut answers = runtime
        .block_on(async {
            let server = Arc::new(Server::bind(config)?);
            let clients = start_nodes(ctx, server.local_addr()?)?;
            let answers = server
                .run_placements(tasks, std::time::Duration::from_secs(600))
                .await;
            for c in clients {
                if let Ok(Err(e)) = c.await {
                    tracing::warn!(error = %e, "a node ended with an error");
                }
            }
            Ok::<_, anyhow::Error>(answers)
        })?
        .into_iter();
    let mut out = Vec::new();
    for (a_model, side, ha, hb, centres, _, _) in &plans {
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        for c in centres {
            match answers.next() {
                Some(Ok(r)) => reports.push((c.clone(), r)),
                Some(Err(e)) => failed.push(e),
                None => failed.push(format!("{c}: no answer")),
            }
        }
        let result = if failed.is_empty() {
            fedslm_server::evaluation::paired_comparison(ha, hb, &reports)
        } else {
            Err(failed.join("; "))
        };
        let what = format!("{} vs combined, {side}", a_model.name());
        out.push(match result {
            Ok(c) => {
                println!(
                    "paired DeLong, {what}: AUC {:.3} vs {:.3}, z = {:.2}, p = {:.4}",
                    c.auc_a, c.auc_b, c.z, c.p
                );
                json!({"a": a_model.name(), "b": "combined", "side": side, "auc_a": c.auc_a,
                       "auc_b": c.auc_b, "z": c.z, "p": c.p})
            }
            Err(e) => {
                println!("paired DeLong, {what}: not computed: {e}");
                json!({"a": a_model.name(), "b": "combined", "side": side, "error": e})
            }
        });
    }
    Ok(out)
}

/// One federation over loopback: a server and every centre's node, to its end.
fn federate(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    model: ModelKind,
    init: &Path,
    fold: Option<u32>,
) -> anyhow::Result<Federated> {
    let tag = fold.map_or("all".to_string(), |f| format!("fold-{}", f + 1));
    let dir = ctx.out.join("runs").join(model.name()).join(&tag);
    std::fs::create_dir_all(&dir)?;
    let clinical = model == ModelKind::Clinical;
    let rounds = if clinical { 30 } else { ctx.args.rounds };
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\npki = \"{}\"\nrun_id = \"{}\"\noutput = \"{}\"\n\
         initial_model = \"{}\"\nrounds = {rounds}\nlocal_epochs = {}\nround_start_grace_secs = 30\n\
         evaluation_bins = {}\nseed = {}\n",
        ctx.pki.display(),
        run_id(model, fold),
        dir.display(),
        init.display(),
        ctx.args.local_epochs,
        ctx.args.bins,
        ctx.args.seed,
    );
    if let Some(f) = fold {
        toml.push_str(&format!("cv_fold = {f}\ncv_folds = {}\n", ctx.args.folds));
    }
    toml.push_str(&centres_toml(ctx));
    let config = ServerConfig::parse(&toml, &dir.join("server.toml"))?;
    let run = super::server::open_run(&config, init, false)?;
    let label = format!(
        "{} {}",
        model.name(),
        fold.map_or("all data".to_string(), |f| format!(
            "fold {}/{}",
            f + 1,
            ctx.args.folds
        ))
    );
    let bar = ProgressBar::new(u64::from(rounds)).with_style(
        ProgressStyle::with_template("{prefix:>18} round {pos}/{len} [{bar:25}] {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.clone());
    let store = run.store.clone();
    let card = run.card.clone();
    let (outcome, evaluation) = runtime.block_on(async {
        let server = Arc::new(Server::bind(config)?);
        let addr = server.local_addr()?;
        let mut events = server.subscribe();
        let writer = super::server::checkpoint_writer(card.clone());
        let s = server.clone();
        let coordinator = run.coordinator;
        let run_store = run.store.clone();
        let server_task = tokio::spawn(async move {
            s.run_rounds(coordinator, run_store, writer, std::future::pending())
                .await
        });
        let clients = start_nodes(ctx, addr)?;
        let mut evaluation = None;
        while let Ok(event) = events.recv().await {
            match event {
                ServerEvent::RoundCommitted(r) => {
                    bar.set_position(u64::from(r.round));
                    bar.set_message(super::server::round_line(&r));
                }
                ServerEvent::Evaluated(e) => evaluation = Some(e),
                ServerEvent::Finished(_) => break,
                _ => {}
            }
        }
        let outcome = server_task.await.context("the server stopped")?;
        for c in clients {
            if let Ok(Err(e)) = c.await {
                tracing::warn!(error = %e, "a node ended with an error");
            }
        }
        Ok::<_, anyhow::Error>((outcome, evaluation))
    })?;
    bar.finish_and_clear();
    if let Some(e) = &evaluation {
        println!("{label}: {}", super::server::evaluation_line(e));
    }
    match outcome {
        Some(Outcome::Completed {
            rounds,
            weights,
            fit,
        }) => {
            let path = dir.join(format!("{}.safetensors", model.name()));
            let mut final_card = ModelCard {
                training: json!({
                    "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
                    "mode": "federated (simulation)",
                    "rounds": rounds,
                    "fold": fold,
                    "folds": ctx.args.folds,
                    "seed": ctx.args.seed,
                    "centers": ctx.centres.iter().map(|(c, r)| format!("{c} ({r:?})")).collect::<Vec<_>>(),
                    "audit_head": store.head().hex(),
                }),
                metrics: evaluation
                    .as_ref()
                    .map(|e| {
                        let j = e.to_json();
                        json!({"internal": j["internal"], "external": j["external"]})
                    })
                    .unwrap_or(Value::Null),
                ..card
            };
            if let Some(fit) = &fit {
                final_card.clinical = Some(ClinicalTable::from_fit(fit));
                final_card.training["patients"] = json!(fit.n);
            }
            save(&path, &weights, &final_card)?;
            Ok(Federated {
                evaluation,
                model: path,
                rounds,
                fit,
                audit_head: store.head().hex(),
            })
        }
        Some(Outcome::Failed { rounds, reason }) => {
            bail!("{label}: the federation failed after {rounds} rounds: {reason}")
        }
        None => bail!("{label}: the federation stopped"),
    }
}

fn fmt_auc(r: Option<&ScoreReport>) -> String {
    r.map_or("-".into(), |r| {
        format!("{:.3} ({:.3}-{:.3})", r.auc, r.ci95[0], r.ci95[1])
    })
}

/// The study's table beside the paper's figures.
fn table(per_model: &[(ModelKind, ModelResult)], comparisons: &[Value]) -> String {
    let mut t = format!(
        "{:<10} {:>24} {:>24} {:>12} {:>12} {:>16} {:>16} {:>11} {:>11} {:>15}\n",
        "model",
        "internal AUC (95% CI)",
        "external AUC (95% CI)",
        "paper int.",
        "paper ext.",
        "sens/spec int.",
        "sens/spec ext.",
        "central int",
        "central ext",
        "p vs comb. i/e"
    );
    for (model, r) in per_model {
        let paper = PAPER.iter().find(|p| p.0 == model.name());
        let ss = |side: &str| {
            let a = &r.json[side]["at_internal_youden"];
            match (a["sensitivity"].as_f64(), a["specificity"].as_f64()) {
                (Some(s), Some(p)) => format!("{s:.2}/{p:.2}"),
                _ => "-".into(),
            }
        };
        let central = |side: &str| {
            r.json["centralised"][side]["auc"]
                .as_f64()
                .map_or("-".into(), |a| format!("{a:.3}"))
        };
        let p = |side: &str| {
            comparisons
                .iter()
                .find(|c| c["a"] == model.name() && c["side"] == side)
                .and_then(|c| c["p"].as_f64())
                .map_or("-".into(), |p| {
                    if p < 0.001 {
                        "<0.001".to_string()
                    } else {
                        format!("{p:.3}")
                    }
                })
        };
        t.push_str(&format!(
            "{:<10} {:>24} {:>24} {:>12} {:>12} {:>16} {:>16} {:>11} {:>11} {:>15}\n",
            model.name(),
            fmt_auc(r.internal_report.as_ref()),
            fmt_auc(r.external_report.as_ref()),
            paper.map_or("-".into(), |p| format!("{:.3}", p.1)),
            paper.map_or("-".into(), |p| format!("{:.3}", p.2)),
            ss("internal"),
            ss("external"),
            central("internal"),
            central("external"),
            format!("{}/{}", p("internal"), p("external")),
        ));
    }
    t
}

fn report_md(results: &Value, per_model: &[(ModelKind, ModelResult)]) -> String {
    let s = &results["settings"];
    let mut md = String::from("# fedslm simulate: the study, federated\n\n");
    md.push_str(&format!(
        "Cohort `{}`; external validation at `{}`. Federated {}-fold cross-validation (internal: each patient scored \
         once, by the federation that held its fold out); then one federation on all training data, validated \
         externally. Networks: {} rounds of {} local epochs, {}; the clinical model: federated Newton to \
         convergence. Histograms of {} bins; seed {}. Wall time {:.0} s, peak memory {:.0} MiB.\n\n",
        results["cohort"].as_str().unwrap_or("?"),
        results["holdout"].as_str().unwrap_or("none"),
        s["folds"], s["rounds"], s["local_epochs"], s["network"].as_str().unwrap_or("?"),
        s["bins"], s["seed"], results["wall_seconds"].as_f64().unwrap_or(0.0),
        results["peak_memory_mib"].as_f64().unwrap_or(0.0),
    ));
    md.push_str("## AUC, internal and external, beside the study's\n\n```\n");
    md.push_str(&table(
        per_model,
        results["comparisons"].as_array().map_or(&[], |v| v),
    ));
    md.push_str("```\n\nSensitivity and specificity at the Youden cut-off chosen on the internal (out-of-fold) scores, applied unchanged externally. \
                 Central: `fedslm train` on the training centres pooled (same folds count, epochs = rounds x local epochs, seed, and \
                 the combined network's head started at the clinical fit of the same training patients), out of fold and at the \
                 held-out centre; the command is in results.json.\n\n");
    for (model, r) in per_model {
        if let Some(fit) = &r.fit {
            md.push_str(&format!(
                "## The {} model, federated Newton on all training data\n\n",
                model.name()
            ));
            md.push_str("| covariate | beta | SE | OR | OR 95% CI | p |\n| --- | --- | --- | --- | --- | --- |\n");
            for (i, name) in fit.names.iter().enumerate() {
                let (lo, hi) = fit.odds_ratio_ci95(i);
                md.push_str(&format!(
                    "| {name} | {:.3} | {:.3} | {:.3} | {lo:.3}-{hi:.3} | {:.4} |\n",
                    fit.coefficients[i],
                    fit.std_errors[i],
                    fit.odds_ratio(i),
                    fit.p[i]
                ));
            }
            md.push('\n');
        }
    }
    md.push_str("## Per-centre internal AUC (out of fold)\n\n| model | centre | AUC | 95% CI | positives/negatives |\n| --- | --- | --- | --- | --- |\n");
    for (model, r) in per_model {
        if let Some(map) = r.json["per_centre_internal"].as_object() {
            for (c, v) in map {
                md.push_str(&format!(
                    "| {} | {c} | {} | {} | {}/{} |\n",
                    model.name(),
                    v["auc"].as_f64().map_or("-".into(), |a| format!("{a:.3}")),
                    v["ci95"].as_array().map_or("-".into(), |ci| format!(
                        "{:.3}-{:.3}",
                        ci[0].as_f64().unwrap_or(f64::NAN),
                        ci[1].as_f64().unwrap_or(f64::NAN)
                    )),
                    v["n"]["positives"],
                    v["n"]["negatives"],
                ));
            }
        }
    }
    if let Some(comparisons) = results["comparisons"].as_array().filter(|c| !c.is_empty()) {
        md.push_str("\n## Paired DeLong tests against the combined network (second pass)\n\n\
                     | model | side | AUC | combined AUC | z | p |\n| --- | --- | --- | --- | --- | --- |\n");
        for c in comparisons {
            let num = |k: &str, digits: usize| {
                c[k].as_f64()
                    .map_or("-".to_string(), |v| format!("{v:.digits$}"))
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                c["a"].as_str().unwrap_or("?"),
                c["side"].as_str().unwrap_or("?"),
                num("auc_a", 3),
                num("auc_b", 3),
                num("z", 2),
                c["p"].as_f64().map_or_else(
                    || format!("not computed: {}", c["error"].as_str().unwrap_or("?")),
                    |p| format!("{p:.4}")
                ),
            ));
        }
    }
    md.push_str("\n## Audit\n\n| model | final federation's audit head |\n| --- | --- |\n");
    for (model, r) in per_model {
        md.push_str(&format!(
            "| {} | `{}` |\n",
            model.name(),
            r.json["audit_head"].as_str().unwrap_or("?")
        ));
    }
    md.push_str("\nFigures: `figures/internal/{roc,dca,calibration}.png` and `figures/external/...` (PNG and SVG).\n\
                 Paired DeLong p against the combined network: from the second pass (each centre's placement sums \
                 of its patients' kept scores against the pooled histograms; no score leaves a centre).\n");
    md
}

/// ROC and decision curves of every model, internal and external.
fn figures(out: &Path, per_model: &[(ModelKind, ModelResult)]) -> anyhow::Result<()> {
    for (side, pick) in [
        (
            "internal",
            (|r: &ModelResult| r.internal.clone())
                as fn(&ModelResult) -> Option<m::ScoreHistograms>,
        ),
        ("external", |r: &ModelResult| r.external.clone()),
    ] {
        let hists: Vec<(String, m::ScoreHistograms)> = per_model
            .iter()
            .filter_map(|(model, r)| pick(r).map(|h| (model.name().to_string(), h)))
            .collect();
        let Some((_, first)) = hists.first() else {
            continue;
        };
        // One set of rows for every model: the same patients, so the same class counts.
        let (np, nn) = (first.n_positive(), first.n_negative());
        let (same, other): (Vec<_>, Vec<_>) = hists
            .iter()
            .partition(|(_, h)| h.n_positive() == np && h.n_negative() == nn);
        for (name, h) in other {
            // One figure's curves share their patients (one prevalence, one treat-all line).
            println!(
                "{side} figures: {name} left out: its {}+/{}- patients are not the {np}+/{nn}- of {}",
                h.n_positive(),
                h.n_negative(),
                hists[0].0
            );
        }
        let labels = pseudo(first).0;
        let mut scores = Vec::new();
        let mut reports = Vec::new();
        for (name, h) in same {
            scores.push((name.clone(), pseudo(h).1));
            reports.push((name.clone(), side_report(name, h)?));
        }
        let p = Predictions { labels, scores };
        crate::plot::write_figures(&out.join("figures").join(side), &p, &reports)?;
    }
    Ok(())
}
