//! `fedslm predict`: per-patient risk of SLM for a site's patients.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use fedslm_cohort::{load_center, settings_hash, ClinicalCoding, Manifest, PreprocessSettings};
use fedslm_model::{clinical, load, Network};
use fedslm_protocol::hex::to_hex;

use super::train::settings_from;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A model file (from `fedslm train` or a federation).
    #[arg(long)]
    model: PathBuf,
    /// The site's manifest.csv; the slm column may be empty.
    #[arg(long)]
    manifest: PathBuf,
    /// The site's client.toml, for its clinical coding and preprocessing (default: the study's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// CSV to write (default: standard output): patient_id, probability, and label where every patient has one.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder for the preprocessing cache.
    #[arg(long)]
    cache: Option<PathBuf>,
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let (coding, preprocess) = settings_from(args.config.as_deref())?;
    let (manifest, probabilities) = probabilities(
        &args.model,
        &args.manifest,
        &coding,
        &preprocess,
        args.cache.as_deref(),
    )?;
    let labelled = manifest.patients.iter().all(|p| p.slm.is_some());
    let mut csv = String::from(if labelled {
        "patient_id,label,probability\n"
    } else {
        "patient_id,probability\n"
    });
    for (p, prob) in manifest.patients.iter().zip(probabilities) {
        match p.slm {
            Some(l) if labelled => csv += &format!("{},{},{prob:.17}\n", p.id, u8::from(l)),
            _ => csv += &format!("{},{prob:.17}\n", p.id),
        }
    }
    match &args.out {
        Some(path) => {
            std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => std::io::stdout().write_all(csv.as_bytes())?,
    }
    Ok(())
}

/// Every patient of the manifest at `manifest_path` scored by the model file at `model`, in manifest order;
/// refused when the site's coding and preprocessing differ from the model's.
pub fn probabilities(
    model: &Path,
    manifest_path: &Path,
    coding: &ClinicalCoding,
    preprocess: &PreprocessSettings,
    cache: Option<&Path>,
) -> anyhow::Result<(Manifest, Vec<f64>)> {
    let (weights, card) = load(model)?;
    let here = to_hex(&settings_hash(coding, preprocess));
    if here != card.settings_hash {
        bail!(
            "this site's settings hash {here} differs from the model's {}: the model was trained with coding {:?} \
             and preprocessing {:?}",
            card.settings_hash,
            card.coding,
            card.preprocess
        );
    }
    let manifest = Manifest::read(manifest_path, coding)?;
    let probabilities: Vec<f64> = match card.model.as_str() {
        "clinical" => {
            let coefficients =
                clinical::coefficients(&weights).with_context(|| format!("{}", model.display()))?;
            manifest
                .patients
                .iter()
                .map(|p| clinical::predict(coding, &coefficients, p))
                .collect()
        }
        "mri" | "combined" => {
            let (network, _) = Network::load(model)?;
            let site = manifest_path
                .parent()
                .and_then(|d| d.file_name())
                .map_or_else(|| "site".into(), |n| n.to_string_lossy().into_owned());
            let (samples, _) = load_center(&manifest, &site, coding, preprocess, cache)?;
            network.predict(&samples.iter().collect::<Vec<_>>())?
        }
        other => bail!(
            "{}: a {other} model is not one this fedslm knows",
            model.display()
        ),
    };
    Ok((manifest, probabilities))
}
