//! `fedslm predict`: per-patient risk of SLM for a site's patients.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

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
    let net = fedslm_study::NetSpec {
        settings_from: args.config.clone(),
        ..Default::default()
    };
    let (coding, preprocess) = net.settings()?;
    let (manifest, probabilities) = fedslm_study::predict::probabilities(
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
        Some(path) => fedslm_files::write_atomic(path, csv.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().write_all(csv.as_bytes())?,
    }
    Ok(())
}
