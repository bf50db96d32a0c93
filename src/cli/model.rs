//! `fedslm model init` and `fedslm model landmarks`: the initial global model of a deployment, named in the
//! server's configuration.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedslm_model::ModelKind;

use super::train::NetArgs;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a fresh model file.
    Init(InitArgs),
    /// Write the initial model of a landmarks run (server.toml `strategy = "landmarks"`, which agrees the
    /// intensity scale of every client.toml): a 3 x 11 tensor of zeros.
    Landmarks(LandmarksArgs),
}

#[derive(Debug, Args)]
pub struct LandmarksArgs {
    #[arg(long)]
    out: PathBuf,
    /// The client.toml whose coding and preprocessing the card records (default: the study's).
    #[arg(long)]
    config: Option<PathBuf>,
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
    let args = match cmd {
        ModelCommand::Init(args) => args,
        ModelCommand::Landmarks(args) => {
            let net = fedslm_study::NetSpec {
                settings_from: args.config,
                ..Default::default()
            };
            fedslm_study::scale::initial_landmarks(&net, &args.out)?;
            println!(
                "initial landmarks (3 x 11 zeros) of a strategy = \"landmarks\" run: {}",
                args.out.display()
            );
            return Ok(());
        }
    };
    let what = fedslm_study::init::initial_model(
        args.model,
        args.seed,
        &args.net.spec(),
        args.clinical.as_deref(),
        &args.out,
    )?;
    println!("initial {what}: {}", args.out.display());
    Ok(())
}
