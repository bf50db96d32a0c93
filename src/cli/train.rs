//! `fedslm train`: centralised training on one or several centres pooled, the baseline federated results are
//! compared against. Stratified k-fold cross-validation estimates performance; the exported model is fitted on
//! all the data given.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fedslm_cohort::{open_cohort, stratified_folds, ClinicalCoding, Patient, PreprocessSettings};
use fedslm_metrics::auc_delong;
use fedslm_model::{clinical, save, ClinicalTable, ModelCard};
use serde_json::json;

/// The models `train` builds today; the candle networks come with the rest of the model work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainableModel {
    /// Logistic regression on sex, tumour site, CEA and CA19-9.
    Clinical,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A cohort folder: one centre (with manifest.csv) or several (sub-folders with manifest.csv), pooled.
    #[arg(long)]
    cohort: PathBuf,
    #[arg(long, value_enum)]
    model: TrainableModel,
    /// Only these centres of the cohort, comma-separated.
    #[arg(long, value_delimiter = ',')]
    centers: Vec<String>,
    /// Cross-validation folds (stratified); 0 or 1 skips cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Folder for the model file (clinical.safetensors).
    #[arg(long, default_value = ".")]
    out: PathBuf,
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

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let TrainableModel::Clinical = args.model;
    let coding = ClinicalCoding::default();
    let centres = open_cohort(&args.cohort, &coding, &args.centers)?;
    let patients: Vec<&Patient> = centres
        .iter()
        .flat_map(|(_, m)| m.patients.iter())
        .filter(|p| p.slm.is_some())
        .collect();
    if patients.is_empty() {
        bail!(
            "{}: no patient with a known SLM outcome",
            args.cohort.display()
        );
    }
    let labels: Vec<bool> = patients.iter().map(|p| p.slm == Some(true)).collect();
    let mut cv = serde_json::Value::Null;
    let mut cv_line = String::new();
    if args.folds >= 2 {
        let folds = stratified_folds(&labels, args.folds, args.seed);
        let mut out_of_fold = vec![0.0; patients.len()];
        let mut per_fold = Vec::new();
        for f in 0..args.folds {
            let train: Vec<&Patient> = patients
                .iter()
                .zip(&folds)
                .filter(|(_, k)| **k != f)
                .map(|(p, _)| *p)
                .collect();
            let fit = clinical::fit(&coding, &train)
                .with_context(|| format!("cross-validation fold {}", f + 1))?;
            let (mut l, mut s) = (Vec::new(), Vec::new());
            for (i, p) in patients.iter().enumerate().filter(|(i, _)| folds[*i] == f) {
                out_of_fold[i] = clinical::predict(&coding, &fit.coefficients, p);
                l.push(labels[i]);
                s.push(out_of_fold[i]);
            }
            per_fold.push(ci_text(&l, &s).0);
        }
        let (pooled, text) = ci_text(&labels, &out_of_fold);
        cv_line = format!(
            "cross-validation, {} stratified folds (seed {}): out-of-fold AUC {text}",
            args.folds, args.seed
        );
        cv = json!({"folds": args.folds, "seed": args.seed, "out_of_fold": pooled, "per_fold": per_fold});
    }
    let fit = clinical::fit(&coding, &patients).context("fitting on all patients")?;
    let preprocess = PreprocessSettings::default();
    let card = ModelCard {
        clinical: Some(ClinicalTable::from_fit(&fit)),
        training: json!({
            "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
            "mode": "centralised",
            "cohort": args.cohort.display().to_string(),
            "centers": centres.iter().map(|(n, m)| json!({"name": n, "patients": m.patients.len()})).collect::<Vec<_>>(),
            "patients": patients.len(),
            "positives": labels.iter().filter(|&&l| l).count(),
            "newton_iterations": fit.iterations,
        }),
        metrics: json!({"cross_validation": cv}),
        ..ModelCard::new("clinical", coding, preprocess)
    };
    let path = args.out.join("clinical.safetensors");
    save(
        &path,
        &clinical::to_weights(&fit.coefficients, &fit.covariance)?,
        &card,
    )?;

    println!(
        "clinical model on {} patients ({} with SLM) from {}",
        patients.len(),
        labels.iter().filter(|&&l| l).count(),
        centres
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
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
    if !cv_line.is_empty() {
        println!("\n{cv_line}");
    }
    println!("\nmodel: {}", path.display());
    Ok(())
}
