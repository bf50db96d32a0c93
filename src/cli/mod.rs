//! Command-line interface: argument parsing (clap derive) and dispatch. `anyhow` lives here, at the edge.

mod bench;
mod bench_train;
mod certs;
mod client;
mod evaluate;
mod inspect;
mod model;
mod predict;
mod progress;
mod server;
mod simulate;
mod synth;
mod train;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fedslm",
    version,
    about = "Federated learning of liver metastasis prediction from rectal MRI, without sharing images"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The study, federated, on this machine: k-fold federated cross-validation and external validation of
    /// the clinical, MRI and combined models over loopback QUIC, with the report.
    Simulate(simulate::SimulateArgs),
    /// Write a synthetic multi-centre cohort (NIfTI images and manifests).
    Synth(synth::SynthArgs),
    /// The federation's certificates: CA, server, centres, revocation.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// The coordinating server.
    Server(server::ServerArgs),
    /// A hospital node.
    Client(client::ClientArgs),
    /// AUC with DeLong CI, paired tests, Youden cut-off, decision curves, Brier and calibration of a
    /// predictions file.
    Evaluate(evaluate::EvaluateArgs),
    /// Centralised training with cross-validation: the baseline for federated results.
    Train(train::TrainArgs),
    /// Per-patient SLM probability from a model file.
    Predict(predict::PredictArgs),
    /// Model files for deployments.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Benchmarks that print figures (the cost of a federated round).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Dims, spacing and value statistics of a NIfTI file, DICOM file or series; or a manifest's summary.
    Inspect(inspect::InspectArgs),
}

pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate(a) => simulate::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Certs(c) => certs::run(c),
        Command::Server(a) => server::run(a),
        Command::Client(a) => client::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Train(a) => train::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Model(c) => model::run(c),
        Command::Bench(c) => bench::run(c),
    }
}

/// Completes on Ctrl-C or SIGTERM (how service managers stop a node).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// The study's three models as a command-line value: `clinical`, `mri` or `combined`, listed in the help.
fn model_kind() -> impl clap::builder::TypedValueParser<Value = fedslm_protocol::ModelKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(fedslm_protocol::ModelKind::ALL.map(|m| m.name()))
        .try_map(|name| name.parse::<fedslm_protocol::ModelKind>())
}

/// A multi-threaded tokio runtime for the commands that do network work.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
