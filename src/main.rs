//! `fedslm`: federated learning of synchronous liver metastasis prediction from rectal cancer MRI.
//! The one binary; each subcommand lives in `cli/`.

mod cli;
mod plot;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away (`fedslm ... | head`)
    // instead of panicking on a broken pipe. SAFETY: restoring a signal's default action before any thread
    // starts has no preconditions.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    cli::init_logging(&args.log);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, each once: our errors often name their source in their own message.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(": ");
                    message.push_str(&cause);
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
