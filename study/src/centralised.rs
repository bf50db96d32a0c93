//! Centralised training (`fedslm train`) on one or several centres pooled: the baseline federated results are
//! compared against. Stratified k-fold cross-validation estimates performance (out-of-fold predictions are
//! written for `fedslm evaluate`); the exported model is fitted on all the data given.

use std::path::{Path, PathBuf};

use fedslm_cohort::{load_center, open_cohort, stratified_folds, Patient, Sample};
use fedslm_metrics::LogisticFit;
use fedslm_model::{
    clinical, save, ClinicalTable, ModelCard, ModelKind, Network, Standardisation, TrainConfig,
};
use fedslm_server::evaluation::AucSummary;
use serde::Serialize;
use serde_json::json;

use crate::{Context, NetSpec, StudyError};

/// What to train, on what, and where to write it.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    /// A cohort folder: one centre (with manifest.csv) or several (sub-folders with manifest.csv), pooled.
    pub cohort: PathBuf,
    pub model: ModelKind,
    /// Only these centres of the cohort (empty: all).
    pub centers: Vec<String>,
    /// Cross-validation folds (stratified); 0 or 1 skips cross-validation.
    pub folds: usize,
    /// Seed of the folds, the initial weights, batches and augmentation.
    pub seed: u64,
    /// Folder for the model file (`<model>.safetensors`) and the out-of-fold predictions
    /// (`<model>-cv-predictions.csv`).
    pub out: PathBuf,
    /// Folder for the preprocessing cache.
    pub cache: Option<PathBuf>,
    /// The combined network: start its head at the clinical logistic model fitted on the same training
    /// patients (as a federation's initial model does).
    pub head_from_clinical: bool,
    pub net: NetSpec,
    /// How image networks are trained (its seed is `seed`).
    pub train: TrainConfig,
}

/// Cross-validation's summary: the pooled out-of-fold AUC and each fold's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CrossValidation {
    pub folds: usize,
    pub seed: u64,
    pub out_of_fold: AucSummary,
    pub per_fold: Vec<AucSummary>,
}

/// What a centralised training left.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The model file, fitted on all patients given.
    pub model: PathBuf,
    /// What it is ("clinical model", or the network's description).
    pub description: String,
    pub centers: Vec<String>,
    pub patients: usize,
    pub positives: usize,
    /// The clinical model's fit on all patients.
    pub clinical_fit: Option<LogisticFit>,
    /// With cross-validation: its summary, the out-of-fold predictions file, and the out-of-fold labels and
    /// scores.
    pub cross_validation: Option<(CrossValidation, PathBuf, Vec<bool>, Vec<f64>)>,
}

/// Training's progress, for a progress bar.
#[derive(Debug, Clone)]
pub enum TrainProgress<'a> {
    /// A network's fit begins: `fits` fits of `epochs` epochs each in all.
    Planned { fits: usize, epochs: usize },
    /// A fit begins, on `what` ("fold 2/5", "all patients").
    Fitting { what: &'a str },
    /// One epoch ended.
    Epoch,
    /// The combined network's head starts plain: the clinical model could not be fitted on `what`.
    HeadStartsPlain { what: &'a str, why: String },
}

/// One patient of the training data, whatever the model.
struct Row<'a> {
    id: &'a str,
    center: &'a str,
    label: bool,
}

/// Cross-validation: `score(fold, train, test)` fits on the indices `train` and scores `test`; writes the
/// out-of-fold predictions to `csv_path`.
fn cross_validate(
    rows: &[Row],
    folds: usize,
    seed: u64,
    csv_path: &Path,
    mut score: impl FnMut(usize, &[usize], &[usize]) -> Result<Vec<f64>, StudyError>,
) -> Result<(CrossValidation, Vec<bool>, Vec<f64>), StudyError> {
    let labels: Vec<bool> = rows.iter().map(|r| r.label).collect();
    let assignment = stratified_folds(&labels, folds, seed);
    let mut out_of_fold = vec![0.0; rows.len()];
    let mut per_fold = Vec::new();
    for f in 0..folds {
        let train: Vec<usize> = (0..rows.len()).filter(|&i| assignment[i] != f).collect();
        let test: Vec<usize> = (0..rows.len()).filter(|&i| assignment[i] == f).collect();
        let scores =
            score(f, &train, &test).context(|| format!("cross-validation fold {}", f + 1))?;
        for (&i, s) in test.iter().zip(&scores) {
            out_of_fold[i] = *s;
        }
        let l: Vec<bool> = test.iter().map(|&i| labels[i]).collect();
        per_fold.push(AucSummary::of_scores(&l, &scores));
    }
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
    crate::error::write_file(csv_path, csv.as_bytes())?;
    let summary = CrossValidation {
        folds,
        seed,
        out_of_fold: AucSummary::of_scores(&labels, &out_of_fold),
        per_fold,
    };
    Ok((summary, labels, out_of_fold))
}

/// Trains `spec.model` on the cohort's patients pooled: cross-validated where `spec.folds >= 2`, then on
/// everyone; writes the model file (and the out-of-fold predictions).
pub fn train(
    spec: &TrainSpec,
    progress: &mut dyn FnMut(TrainProgress<'_>),
) -> Result<Trained, StudyError> {
    let (coding, preprocess) = spec.net.settings()?;
    let centers = open_cohort(&spec.cohort, &coding, &spec.centers)?;
    let labelled: usize = centers
        .iter()
        .flat_map(|(_, m)| &m.patients)
        .filter(|p| p.slm.is_some())
        .count();
    if labelled == 0 {
        return Err(StudyError::Refused(format!(
            "{}: no patient with a known SLM outcome",
            spec.cohort.display()
        )));
    }
    crate::error::create_dir(&spec.out)?;
    let provenance = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "mode": "centralised",
        "cohort": spec.cohort.display().to_string(),
        "centers": centers.iter().map(|(n, m)| json!({"name": n, "patients": m.patients.len()})).collect::<Vec<_>>(),
        "seed": spec.seed,
    });
    let name = spec.model.name();
    let model_path = spec.out.join(format!("{name}.safetensors"));
    let cv_path = spec.out.join(format!("{name}-cv-predictions.csv"));
    let center_names: Vec<String> = centers.iter().map(|(n, _)| n.clone()).collect();
    let mut trained = Trained {
        model: model_path.clone(),
        description: String::new(),
        centers: center_names,
        patients: 0,
        positives: 0,
        clinical_fit: None,
        cross_validation: None,
    };
    if !spec.model.is_network() {
        let patients: Vec<(&str, &Patient)> = centers
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
        if spec.folds >= 2 {
            let (cv, labels, scores) =
                cross_validate(&rows, spec.folds, spec.seed, &cv_path, |_, train, test| {
                    let fit = clinical::fit(&coding, &pick(train))?;
                    Ok(pick(test)
                        .iter()
                        .map(|p| clinical::predict(&coding, &fit.coefficients, p))
                        .collect())
                })?;
            trained.cross_validation = Some((cv, cv_path.clone(), labels, scores));
        }
        let all: Vec<&Patient> = patients.iter().map(|(_, p)| *p).collect();
        let fit = clinical::fit(&coding, &all).context(|| "fitting on all patients".into())?;
        trained.patients = rows.len();
        trained.positives = rows.iter().filter(|r| r.label).count();
        let mut training = provenance;
        training["patients"] = json!(trained.patients);
        training["positives"] = json!(trained.positives);
        training["newton_iterations"] = json!(fit.iterations);
        let card = ModelCard {
            clinical: Some(ClinicalTable::from_fit(&fit)),
            training,
            metrics: json!({"cross_validation": trained.cross_validation.as_ref().map(|c| &c.0)}),
            ..ModelCard::new("clinical", coding, preprocess)
        };
        save(
            &model_path,
            &clinical::to_weights(&fit.coefficients, &fit.covariance)?,
            &card,
        )?;
        trained.description = "clinical model".into();
        trained.clinical_fit = Some(fit);
        return Ok(trained);
    }
    let kind = spec.model;
    let config = spec.net.config(kind, &preprocess)?;
    let train_cfg = TrainConfig {
        seed: spec.seed,
        ..spec.train.clone()
    };
    let mut samples: Vec<Sample> = Vec::new();
    for (center, manifest) in &centers {
        let (s, _) = load_center(
            manifest,
            center,
            &coding,
            &preprocess,
            spec.cache.as_deref(),
        )
        .context(|| format!("centre {center}"))?;
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
    let fits = if spec.folds >= 2 { spec.folds + 1 } else { 1 };
    progress(TrainProgress::Planned {
        fits,
        epochs: train_cfg.epochs,
    });
    let mut fit_on = |idx: &[usize], what: &str| -> Result<Network, StudyError> {
        let train: Vec<&Sample> = idx.iter().map(|&i| &samples[i]).collect();
        let mut network = Network::new(kind, config, spec.seed)?;
        if kind == ModelKind::Combined {
            network.standardisation = Standardisation::fit(&train, config.clinical_features);
            if spec.head_from_clinical {
                match clinical::fit_samples(&train) {
                    Ok(beta) => network.start_head_from_clinical(&beta)?,
                    // As in a federation: a clinical model that cannot be fitted starts nothing.
                    Err(e) => progress(TrainProgress::HeadStartsPlain {
                        what,
                        why: e.to_string(),
                    }),
                }
            }
        }
        progress(TrainProgress::Fitting { what });
        network.fit(&train, &train_cfg, |r| {
            progress(TrainProgress::Epoch);
            tracing::debug!(what, epoch = r.epoch, loss = r.loss, "epoch");
        })?;
        Ok(network)
    };
    if spec.folds >= 2 {
        let (cv, labels, scores) =
            cross_validate(&rows, spec.folds, spec.seed, &cv_path, |f, train, test| {
                let network = fit_on(train, &format!("fold {}/{}", f + 1, spec.folds))?;
                let test: Vec<&Sample> = test.iter().map(|&i| &samples[i]).collect();
                Ok(network.predict(&test)?)
            })?;
        trained.cross_validation = Some((cv, cv_path.clone(), labels, scores));
    }
    let all: Vec<usize> = (0..samples.len()).collect();
    let network = fit_on(&all, "all patients")?;
    trained.patients = rows.len();
    trained.positives = rows.iter().filter(|r| r.label).count();
    let mut training = provenance;
    training["patients"] = json!(trained.patients);
    training["positives"] = json!(trained.positives);
    training["train"] = json!(train_cfg);
    let card = ModelCard {
        training,
        metrics: json!({"cross_validation": trained.cross_validation.as_ref().map(|c| &c.0)}),
        ..network.card(coding, preprocess)
    };
    save(&model_path, &network.to_weights()?, &card)?;
    trained.description = network.describe();
    Ok(trained)
}
