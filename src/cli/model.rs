//! `fedslm model init`: the initial global model of a deployment, named in the server's configuration.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedslm_model::{clinical, save, ModelCard, Network};
use serde_json::json;

use super::train::{NetArgs, TrainableModel};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a fresh model file.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[arg(long, value_enum)]
    model: TrainableModel,
    /// Seed of the initial weights (the clinical model starts at zero, Newton's starting point, whatever it is).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    net: NetArgs,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    let ModelCommand::Init(args) = cmd;
    let what = init(args.model, args.seed, &args.net, &args.out)?;
    println!("initial {what}: {}", args.out.display());
    Ok(())
}

/// Writes a fresh `model` to `out`; returns what it is.
pub fn init(
    model: TrainableModel,
    seed: u64,
    net: &NetArgs,
    out: &std::path::Path,
) -> anyhow::Result<String> {
    let (coding, preprocess) = net.settings()?;
    let training = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "mode": "init",
        "seed": seed,
    });
    match model.network_kind() {
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
            // The standardisation stays the identity until the federation has the training centres' sums.
            let card = ModelCard {
                training,
                ..network.card(coding, preprocess)
            };
            save(out, &network.to_weights()?, &card)?;
            Ok(network.describe())
        }
    }
}
