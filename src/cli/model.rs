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
    let (coding, preprocess) = args.net.settings()?;
    let training = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "mode": "init",
        "seed": args.seed,
    });
    match args.model.network_kind() {
        None => {
            let p = clinical::names().len();
            let card = ModelCard {
                training,
                ..ModelCard::new("clinical", coding, preprocess)
            };
            save(
                &args.out,
                &clinical::to_weights(&vec![0.0; p], &vec![0.0; p * p])?,
                &card,
            )?;
            println!("initial clinical model: {}", args.out.display());
        }
        Some(kind) => {
            let config = args.net.config(kind, &preprocess)?;
            let network = Network::new(kind, config, args.seed)?;
            // The standardisation stays the identity until the federation has the training centres' sums.
            let card = ModelCard {
                training,
                ..network.card(coding, preprocess)
            };
            save(&args.out, &network.to_weights()?, &card)?;
            println!("initial {}: {}", network.describe(), args.out.display());
        }
    }
    Ok(())
}
