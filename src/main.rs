//! `fedslm`: federated learning of synchronous liver metastasis prediction from rectal cancer MRI.
//! The one binary; each subcommand lives in `cli/`.

mod cli;
mod plot;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args.log);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
