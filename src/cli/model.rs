//! `fedslm model init`: the initial global model of a deployment, named in the server's configuration.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use clap::{Args, Subcommand};
use fedslm_model::{clinical, save, ModelCard, ModelKind, Network};
use serde_json::json;

use super::train::NetArgs;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a fresh model file.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[arg(long, value_parser = super::model_kind())]
    model: ModelKind,
    /// Seed of the initial weights (the clinical model starts at zero, Newton's starting point, whatever it is).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// The combined network only: start its head at this fitted clinical model (a federated Newton run's
    /// final model), so that training adds what the MRI tells beyond the clinical factors.
    #[arg(long)]
    clinical: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    let ModelCommand::Init(args) = cmd;
    let what = init(
        args.model,
        args.seed,
        &args.net,
        args.clinical.as_deref(),
        &args.out,
    )?;
    println!("initial {what}: {}", args.out.display());
    Ok(())
}

/// Writes a fresh `model` to `out` (a combined network's head started at the `clinical` model file's
/// coefficients, if given); returns what it is.
pub fn init(
    model: ModelKind,
    seed: u64,
    net: &NetArgs,
    clinical: Option<&Path>,
    out: &Path,
) -> anyhow::Result<String> {
    let (coding, preprocess) = net.settings()?;
    let mut training = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "mode": "init",
        "seed": seed,
    });
    if clinical.is_some() && model != ModelKind::Combined {
        bail!(
            "--clinical starts the combined network's head; it does not apply to the {} model",
            model.name()
        );
    }
    match Some(model).filter(|m| m.is_network()) {
        None => {
            let p = clinical::names().len();
            let card = ModelCard {
                training,
                ..ModelCard::new("clinical", coding, preprocess)
            };
            save(
                out,
                &clinical::to_weights(&vec![0.0; p], &vec![0.0; p * p])?,
                &card,
            )?;
            Ok("clinical model".into())
        }
        Some(kind) => {
            let config = net.config(kind, &preprocess)?;
            let network = Network::new(kind, config, seed)?;
            // The clinical inputs are 0/1 indicators and stay unstandardised in federation (no centre's data
            // is seen before the first round); centralised, standardising them changed the AUC by < 0.01.
            if let Some(path) = clinical {
                let (weights, card) = fedslm_model::load(path)
                    .with_context(|| format!("clinical model {}", path.display()))?;
                if card.model != "clinical" {
                    bail!(
                        "{}: a {} model, not a clinical one",
                        path.display(),
                        card.model
                    );
                }
                if card.coding != coding {
                    bail!(
                        "{}: fitted with another clinical coding ({:?}) than this network's ({:?})",
                        path.display(),
                        card.coding,
                        coding
                    );
                }
                let beta = clinical::coefficients(&weights)
                    .with_context(|| format!("clinical model {}", path.display()))?;
                network
                    .start_head_from_clinical(&beta)
                    .with_context(|| format!("clinical model {}", path.display()))?;
                training["head_from_clinical"] = json!({
                    "file": path.display().to_string(),
                    "coefficients": beta,
                });
            }
            let card = ModelCard {
                training,
                ..network.card(coding, preprocess)
            };
            save(out, &network.to_weights()?, &card)?;
            Ok(network.describe())
        }
    }
}
