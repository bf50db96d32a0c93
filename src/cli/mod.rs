//! Command-line interface: argument parsing (clap derive) and dispatch. `anyhow` lives here, at the edge.

mod bench;
mod bench_train;
mod certs;
mod client;
pub mod console;
mod evaluate;
mod inspect;
mod model;
mod predict;
mod privacy;
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
    /// Log filter (tracing's EnvFilter syntax) of the log file, of a service's standard error, and with -v of
    /// the terminal; RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// Log lines as text for people, or one JSON object per line for machines.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: console::LogFormat,
    /// Show every log line on the terminal too, above the progress bars.
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
    /// The final results alone: no progress, no milestones.
    #[arg(short, long, global = true)]
    pub quiet: bool,
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
    /// A site's differential-privacy budget, and what its ledger says it has spent and has left.
    Privacy(privacy::PrivacyArgs),
}

/// How a command shows its work: the log filter, and how much the terminal gets.
pub struct Output {
    filter: String,
    format: console::LogFormat,
    verbosity: console::Verbosity,
}

impl Output {
    /// Logging for a command a person waits for, with its log file (whose place is said at once).
    fn start(&self, log_file: Option<&std::path::Path>) -> anyhow::Result<()> {
        console::init_interactive(&self.filter, self.format, self.verbosity, log_file).map_err(
            |e| {
                anyhow::anyhow!(
                    "cannot write the log file {}: {e}",
                    log_file.map_or(String::new(), |p| p.display().to_string())
                )
            },
        )?;
        if let Some(path) = log_file {
            console::console().milestone(&format!("log: {}", path.display()));
        }
        Ok(())
    }
}

impl Cli {
    /// Whether this command is the coordinating server, which holds a model's worth of buffers for every
    /// round and must give them back, where the other commands train.
    pub fn serves(&self) -> bool {
        matches!(self.command, Command::Server(_))
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let output = Output {
        filter: cli.log,
        format: cli.log_format,
        verbosity: match (cli.quiet, cli.verbose) {
            (true, _) => console::Verbosity::Quiet,
            (false, true) => console::Verbosity::Verbose,
            (false, false) => console::Verbosity::Normal,
        },
    };
    match cli.command {
        Command::Server(a) => {
            console::init_service(&output.filter, output.format);
            server::run(a)
        }
        Command::Client(a) => {
            console::init_service(&output.filter, output.format);
            client::run(a)
        }
        Command::Simulate(a) => simulate::run(a, &output),
        Command::Synth(a) => synth::run(a, &output),
        Command::Train(a) => train::run(a, &output),
        Command::Bench(c) => bench::run(c, &output),
        // Short commands: no log file.
        Command::Certs(c) => output.start(None).and_then(|()| certs::run(c)),
        Command::Evaluate(a) => output.start(None).and_then(|()| evaluate::run(a)),
        Command::Inspect(a) => output.start(None).and_then(|()| inspect::run(a)),
        Command::Predict(a) => output.start(None).and_then(|()| predict::run(a)),
        Command::Model(c) => output.start(None).and_then(|()| model::run(c)),
        Command::Privacy(a) => output.start(None).and_then(|()| privacy::run(a)),
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
