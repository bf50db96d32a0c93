//! `fedslm server`: the coordinating centre's endpoint.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedslm_server::{Server, ServerConfig};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Server configuration (TOML): listen address, PKI folder, run, enrolled centres.
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(&args.config)?;
    let enrolled: Vec<String> = config
        .enrolment
        .centers
        .iter()
        .map(|(c, r)| format!("{c} ({r:?})"))
        .collect();
    super::runtime()?.block_on(async {
        let server = Server::bind(config)?;
        let addr = server.local_addr().context("no local address")?;
        tracing::info!(%addr, centres = %enrolled.join(", "), "listening");
        server
            .run(async {
                super::shutdown_signal().await;
                tracing::info!("shutting down");
            })
            .await;
        Ok(())
    })
}
