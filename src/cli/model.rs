//! `fedslm model init`: the initial global model of a deployment, named in the server's configuration.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedslm_cohort::{ClinicalCoding, PreprocessSettings};
use fedslm_model::{clinical, save, ModelCard};
use serde_json::json;

use super::train::TrainableModel;

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
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    let ModelCommand::Init(args) = cmd;
    let TrainableModel::Clinical = args.model;
    let (coding, preprocess) = (ClinicalCoding::default(), PreprocessSettings::default());
    let p = clinical::names().len();
    let card = ModelCard {
        training: json!({"software": concat!("fedslm ", env!("CARGO_PKG_VERSION")), "mode": "init", "seed": args.seed}),
        ..ModelCard::new("clinical", coding, preprocess)
    };
    save(
        &args.out,
        &clinical::to_weights(&vec![0.0; p], &vec![0.0; p * p])?,
        &card,
    )?;
    println!("initial clinical model: {}", args.out.display());
    Ok(())
}
