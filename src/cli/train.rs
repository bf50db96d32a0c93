//! `fedslm train`: centralised training on one or several centres pooled, the baseline federated results are
//! compared against. Stratified k-fold cross-validation estimates performance (out-of-fold predictions are
//! written for `fedslm evaluate`); the exported model is fitted on all the data given.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fedslm_client::ClientConfig;
use fedslm_cohort::{
    load_center, open_cohort, stratified_folds, ClinicalCoding, Patient, PreprocessSettings, Sample,
};
use fedslm_metrics::auc_delong;
use fedslm_model::{
    clinical, save, Augmentation, ClinicalTable, ModelCard, ModelKind, NetConfig, Network,
    Optimizer, Standardisation, TrainConfig,
};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// ResNet-10 of width 8 with a 3x3 stride-2 stem: the default, sized for a 2-core CPU.
    Compact,
    /// ResNet-10 of width 64, torchvision's stem.
    Resnet10,
    /// ResNet-18 of width 64, torchvision's stem: the study's network.
    Resnet18,
    /// ResNet-34 of width 64, torchvision's stem.
    Resnet34,
}

/// The settings that decide what a network looks like and what it is fed.
#[derive(Debug, Args)]
pub struct NetArgs {
    #[arg(long, value_enum, default_value = "compact")]
    arch: Arch,
    /// Channels of the first stage (default: 8 for compact, 64 otherwise).
    #[arg(long)]
    width: Option<usize>,
    /// The study's scale: ResNet-18 on 224 x 224 crops of the largest ROI slice (3 channels). Overrides --arch
    /// and the preprocessing's size and neighbours.
    #[arg(long)]
    study_scale: bool,
    /// A centre's client.toml, for its clinical coding and preprocessing (default: the study's).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl NetArgs {
    /// The default network (compact) with the study's coding and preprocessing.
    pub fn compact() -> NetArgs {
        NetArgs {
            arch: Arch::Compact,
            width: None,
            study_scale: false,
            config: None,
        }
    }

    /// The clinical coding and preprocessing to use.
    pub fn settings(&self) -> anyhow::Result<(ClinicalCoding, PreprocessSettings)> {
        let (coding, mut preprocess) = settings_from(self.config.as_deref())?;
        if self.study_scale {
            preprocess.size = 224;
            preprocess.neighbours = 0;
        }
        Ok((coding, preprocess))
    }

    /// The architecture for `kind` on crops made with `preprocess`.
    pub fn config(
        &self,
        kind: ModelKind,
        preprocess: &PreprocessSettings,
    ) -> anyhow::Result<NetConfig> {
        let features = match kind {
            ModelKind::Clinical => bail!("the clinical model is not an image network"),
            ModelKind::Mri => 0,
            ModelKind::Combined => ClinicalCoding::FEATURES.len(),
        };
        let (c, s) = (preprocess.channels(), preprocess.size);
        let arch = if self.study_scale {
            Arch::Resnet18
        } else {
            self.arch
        };
        let mut config = match arch {
            Arch::Compact => NetConfig::compact(c, s, features),
            Arch::Resnet10 => NetConfig {
                depth: 10,
                ..NetConfig::resnet18(c, s, features)
            },
            Arch::Resnet18 => NetConfig::resnet18(c, s, features),
            Arch::Resnet34 => NetConfig {
                depth: 34,
                ..NetConfig::resnet18(c, s, features)
            },
        };
        if let Some(w) = self.width {
            config.width = w;
        }
        config
            .check()
            .map_err(|e| anyhow::anyhow!("network architecture: {e}"))?;
        Ok(config)
    }
}

/// Coding and preprocessing from a centre's client.toml, or the study's defaults.
pub fn settings_from(
    config: Option<&Path>,
) -> anyhow::Result<(ClinicalCoding, PreprocessSettings)> {
    Ok(match config {
        Some(c) => {
            let config = ClientConfig::load(c)?;
            (config.coding, config.preprocess)
        }
        None => Default::default(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

/// How image networks are trained.
#[derive(Debug, Args)]
pub struct FitArgs {
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (cosine schedule).
    #[arg(long, default_value_t = 5e-3)]
    learning_rate: f64,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerName,
    /// SGD's momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// Weight of positive patients' loss (for example negatives / positives); default 1.
    #[arg(long)]
    pos_weight: Option<f64>,
    /// Train on the crops as they are (no flips, rotations, shifts or intensity jitter).
    #[arg(long)]
    no_augment: bool,
}

impl FitArgs {
    pub fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: match self.optimizer {
                OptimizerName::Adamw => Optimizer::AdamW {
                    weight_decay: self.weight_decay,
                },
                OptimizerName::Sgd => Optimizer::Sgd {
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                },
            },
            pos_weight: self.pos_weight,
            augmentation: (!self.no_augment).then(Augmentation::default),
            proximal_mu: None,
            seed,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A cohort folder: one centre (with manifest.csv) or several (sub-folders with manifest.csv), pooled.
    #[arg(long)]
    cohort: PathBuf,
    #[arg(long, value_parser = super::model_kind())]
    model: ModelKind,
    /// Only these centres of the cohort, comma-separated.
    #[arg(long, value_delimiter = ',')]
    centers: Vec<String>,
    /// Cross-validation folds (stratified); 0 or 1 skips cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Seed of the folds, the initial weights, batches and augmentation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Folder for the model file (<model>.safetensors) and the out-of-fold predictions
    /// (<model>-cv-predictions.csv).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Folder for the preprocessing cache (crops keyed by file contents and settings).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The combined network: start its head at the clinical logistic model fitted on the same training
    /// patients (as `fedslm model init --clinical` does for a federation).
    #[arg(long)]
    head_from_clinical: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    fit: FitArgs,
}

fn ci_text(labels: &[bool], scores: &[f64]) -> (serde_json::Value, String) {
    match auc_delong(labels, scores) {
        Ok(e) => {
            let (lo, hi) = e.ci95();
            (
                json!({"auc": e.auc, "ci95": [lo, hi], "n": labels.len()}),
                format!("{:.3} ({lo:.3}-{hi:.3})", e.auc),
            )
        }
        Err(err) => (
            json!({"auc": null, "n": labels.len(), "why": err.to_string()}),
            format!("- ({err})"),
        ),
    }
}

/// One patient of the training data, whatever the model.
struct Row<'a> {
    id: &'a str,
    center: &'a str,
    label: bool,
}

/// What cross-validation gave: the JSON summary, the printed line, the out-of-fold CSV, and the out-of-fold
/// labels and scores.
struct CrossValidation {
    summary: serde_json::Value,
    line: String,
    csv: String,
    out_of_fold: (Vec<bool>, Vec<f64>),
}

/// Cross-validation: `score(train, test)` fits on the indices `train` and scores `test`.
fn cross_validate(
    rows: &[Row],
    folds: usize,
    seed: u64,
    mut score: impl FnMut(usize, &[usize], &[usize]) -> anyhow::Result<Vec<f64>>,
) -> anyhow::Result<CrossValidation> {
    let labels: Vec<bool> = rows.iter().map(|r| r.label).collect();
    let assignment = stratified_folds(&labels, folds, seed);
    let mut out_of_fold = vec![0.0; rows.len()];
    let mut per_fold = Vec::new();
    for f in 0..folds {
        let train: Vec<usize> = (0..rows.len()).filter(|&i| assignment[i] != f).collect();
        let test: Vec<usize> = (0..rows.len()).filter(|&i| assignment[i] == f).collect();
        let scores =
            score(f, &train, &test).with_context(|| format!("cross-validation fold {}", f + 1))?;
        for (&i, s) in test.iter().zip(&scores) {
            out_of_fold[i] = *s;
        }
        let l: Vec<bool> = test.iter().map(|&i| labels[i]).collect();
        per_fold.push(ci_text(&l, &scores).0);
    }
    let (pooled, text) = ci_text(&labels, &out_of_fold);
    let line =
        format!("cross-validation, {folds} stratified folds (seed {seed}): out-of-fold AUC {text}");
    let mut csv = String::from("patient_id,center,fold,label,probability\n");
    for (i, r) in rows.iter().enumerate() {
        csv += &format!(
            "{},{},{},{},{:.17}\n",
            r.id,
            r.center,
            assignment[i] + 1,
            u8::from(r.label),
            out_of_fold[i]
        );
    }
    Ok(CrossValidation {
        summary: json!({"folds": folds, "seed": seed, "out_of_fold": pooled, "per_fold": per_fold}),
        line,
        csv,
        out_of_fold: (labels, out_of_fold),
    })
}

/// What a centralised training left: the model file and, with cross-validation, the out-of-fold labels and
/// scores.
pub struct Trained {
    pub model: PathBuf,
    pub out_of_fold: Option<(Vec<bool>, Vec<f64>)>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    train(&args).map(|_| ())
}

/// `fedslm train` with `words` as its arguments: the centralised baseline of `fedslm simulate`, every
/// setting not named at `fedslm train`'s default.
pub fn args_from(words: &[String]) -> anyhow::Result<TrainArgs> {
    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: TrainArgs,
    }
    let words = std::iter::once("train".to_string()).chain(words.iter().cloned());
    Ok(<Command as clap::Parser>::try_parse_from(words)?.args)
}

pub fn train(args: &TrainArgs) -> anyhow::Result<Trained> {
    let (coding, preprocess) = args.net.settings()?;
    let centres = open_cohort(&args.cohort, &coding, &args.centers)?;
    let labelled: usize = centres
        .iter()
        .flat_map(|(_, m)| &m.patients)
        .filter(|p| p.slm.is_some())
        .count();
    if labelled == 0 {
        bail!(
            "{}: no patient with a known SLM outcome",
            args.cohort.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let centre_list = centres
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let provenance = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "mode": "centralised",
        "cohort": args.cohort.display().to_string(),
        "centers": centres.iter().map(|(n, m)| json!({"name": n, "patients": m.patients.len()})).collect::<Vec<_>>(),
        "seed": args.seed,
    });
    let name = args.model.name();
    let model_path = args.out.join(format!("{name}.safetensors"));
    let cv_path = args.out.join(format!("{name}-cv-predictions.csv"));
    let write_cv = |csv: &str| {
        std::fs::write(&cv_path, csv).with_context(|| format!("cannot write {}", cv_path.display()))
    };
    let out_of_fold = match Some(args.model).filter(|m| m.is_network()) {
        None => {
            let patients: Vec<(&str, &Patient)> = centres
                .iter()
                .flat_map(|(n, m)| m.patients.iter().map(move |p| (n.as_str(), p)))
                .filter(|(_, p)| p.slm.is_some())
                .collect();
            let rows: Vec<Row> = patients
                .iter()
                .map(|(c, p)| Row {
                    id: &p.id,
                    center: c,
                    label: p.slm == Some(true),
                })
                .collect();
            let pick =
                |idx: &[usize]| -> Vec<&Patient> { idx.iter().map(|&i| patients[i].1).collect() };
            let mut cv = (serde_json::Value::Null, String::new());
            let mut out_of_fold = None;
            if args.folds >= 2 {
                let cv_result = cross_validate(&rows, args.folds, args.seed, |_, train, test| {
                    let fit = clinical::fit(&coding, &pick(train))?;
                    Ok(pick(test)
                        .iter()
                        .map(|p| clinical::predict(&coding, &fit.coefficients, p))
                        .collect())
                })?;
                write_cv(&cv_result.csv)?;
                out_of_fold = Some(cv_result.out_of_fold);
                cv = (cv_result.summary, cv_result.line);
            }
            let all: Vec<&Patient> = patients.iter().map(|(_, p)| *p).collect();
            let fit = clinical::fit(&coding, &all).context("fitting on all patients")?;
            let mut training = provenance;
            training["patients"] = json!(rows.len());
            training["positives"] = json!(rows.iter().filter(|r| r.label).count());
            training["newton_iterations"] = json!(fit.iterations);
            let card = ModelCard {
                clinical: Some(ClinicalTable::from_fit(&fit)),
                training,
                metrics: json!({"cross_validation": cv.0}),
                ..ModelCard::new("clinical", coding, preprocess)
            };
            save(
                &model_path,
                &clinical::to_weights(&fit.coefficients, &fit.covariance)?,
                &card,
            )?;
            println!(
                "clinical model on {} patients ({} with SLM) from {centre_list}",
                rows.len(),
                rows.iter().filter(|r| r.label).count(),
            );
            print_table(&fit);
            if !cv.1.is_empty() {
                println!("\n{}\nout-of-fold predictions: {}", cv.1, cv_path.display());
            }
            out_of_fold
        }
        Some(kind) => {
            let config = args.net.config(kind, &preprocess)?;
            let train_cfg = args.fit.config(args.seed);
            let mut samples: Vec<Sample> = Vec::new();
            for (centre, manifest) in &centres {
                let (s, _) = load_center(
                    manifest,
                    centre,
                    &coding,
                    &preprocess,
                    args.cache.as_deref(),
                )
                .with_context(|| format!("centre {centre}"))?;
                samples.extend(s.into_iter().filter(|s| s.label.is_some()));
            }
            let rows: Vec<Row> = samples
                .iter()
                .map(|s| Row {
                    id: &s.patient_id,
                    center: &s.center,
                    label: s.label == Some(true),
                })
                .collect();
            let fits = if args.folds >= 2 { args.folds + 1 } else { 1 };
            let bar = indicatif::ProgressBar::new((fits * train_cfg.epochs) as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>22} [{bar:30}] {pos}/{len} epochs, {elapsed} (eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let fit_on = |idx: &[usize], what: &str| -> anyhow::Result<Network> {
                let train: Vec<&Sample> = idx.iter().map(|&i| &samples[i]).collect();
                let mut network = Network::new(kind, config, args.seed)?;
                if kind == ModelKind::Combined {
                    network.standardisation =
                        Standardisation::fit(&train, config.clinical_features);
                    if args.head_from_clinical {
                        match clinical::fit_samples(&train) {
                            Ok(beta) => network.start_head_from_clinical(&beta)?,
                            // As in a federation: a clinical model that cannot be fitted starts nothing.
                            Err(e) => bar.suspend(|| {
                                println!("{what}: the head starts plain: the clinical model: {e}")
                            }),
                        }
                    }
                }
                bar.set_message(what.to_string());
                network.fit(&train, &train_cfg, |r| {
                    bar.inc(1);
                    tracing::debug!(what, epoch = r.epoch, loss = r.loss, "epoch");
                })?;
                Ok(network)
            };
            let mut cv = (serde_json::Value::Null, String::new());
            let mut out_of_fold = None;
            if args.folds >= 2 {
                let cv_result = cross_validate(&rows, args.folds, args.seed, |f, train, test| {
                    let network = fit_on(train, &format!("fold {}/{}", f + 1, args.folds))?;
                    let test: Vec<&Sample> = test.iter().map(|&i| &samples[i]).collect();
                    Ok(network.predict(&test)?)
                })?;
                write_cv(&cv_result.csv)?;
                out_of_fold = Some(cv_result.out_of_fold);
                cv = (cv_result.summary, cv_result.line);
            }
            let all: Vec<usize> = (0..samples.len()).collect();
            let network = fit_on(&all, "all patients")?;
            bar.finish_and_clear();
            let mut training = provenance;
            training["patients"] = json!(rows.len());
            training["positives"] = json!(rows.iter().filter(|r| r.label).count());
            training["train"] = serde_json::to_value(&train_cfg)?;
            let card = ModelCard {
                training,
                metrics: json!({"cross_validation": cv.0}),
                ..network.card(coding, preprocess)
            };
            save(&model_path, &network.to_weights()?, &card)?;
            println!(
                "{} on {} patients ({} with SLM) from {centre_list}",
                network.describe(),
                rows.len(),
                rows.iter().filter(|r| r.label).count(),
            );
            if !cv.1.is_empty() {
                println!("{}\nout-of-fold predictions: {}", cv.1, cv_path.display());
            }
            out_of_fold
        }
    };
    println!("model: {}", model_path.display());
    Ok(Trained {
        model: model_path,
        out_of_fold,
    })
}

pub fn print_table(fit: &fedslm_metrics::LogisticFit) {
    println!(
        "\n{:<12} {:>8} {:>8} {:>8} {:>17} {:>8}",
        "covariate", "beta", "SE", "OR", "OR 95% CI", "p"
    );
    for (i, name) in fit.names.iter().enumerate() {
        let (lo, hi) = fit.odds_ratio_ci95(i);
        let p = if fit.p[i] < 0.001 {
            "<0.001".to_string()
        } else {
            format!("{:.3}", fit.p[i])
        };
        println!(
            "{name:<12} {:>8.3} {:>8.3} {:>8.3} {:>8.3}-{:<8.3} {p:>8}",
            fit.coefficients[i],
            fit.std_errors[i],
            fit.odds_ratio(i),
            lo,
            hi
        );
    }
    println!("log-likelihood {:.4}", fit.log_likelihood);
}
