//! `fedslm client`: a hospital node.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use fedslm_client::{connect, ClientConfig};
use fedslm_protocol::{close, SampleCounts};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Client configuration (TOML): centre, server, certificate files.
    #[arg(long)]
    config: PathBuf,
    /// Check the certificate and that the server admits this centre, then exit.
    #[arg(long)]
    check: bool,
}

pub fn run(args: ClientArgs) -> anyhow::Result<()> {
    let config = ClientConfig::load(&args.config)?;
    if args.check {
        let cert = CertificateDer::from_pem_file(&config.tls.cert)
            .with_context(|| format!("cannot read certificate {}", config.tls.cert.display()))?;
        let certified = fedslm_certs::center_of(&cert)
            .with_context(|| format!("certificate {}", config.tls.cert.display()))?;
        if certified != config.center {
            bail!(
                "{} says centre {}, but certificate {} is centre {certified}'s",
                args.config.display(),
                config.center,
                config.tls.cert.display()
            );
        }
        println!(
            "certificate: centre {certified} ({})",
            config.tls.cert.display()
        );
    }
    super::runtime()?.block_on(async {
        let session = connect(&config, SampleCounts::default()).await?;
        let w = session.welcome.clone();
        println!(
            "admitted to run {} by {} as centre {} ({:?}), {} rounds",
            w.run_id,
            session.remote_address(),
            w.center,
            w.role,
            w.rounds
        );
        if args.check {
            session.close(close::DONE, "check done").await;
            return Ok(());
        }
        let finish = session.wait_finish().await?;
        println!(
            "run {} finished after {} rounds: {}",
            finish.run_id, finish.rounds_completed, finish.reason
        );
        Ok(())
    })
}
