//! `fedslm certs`: the federation PKI from the shell.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fedslm_certs::{request, IssueOptions, Pki, RevokeTarget};
use fedslm_protocol::CenterId;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the federation CA and the server's key and certificate (coordinating centre).
    Init {
        /// New PKI folder; holds the CA key, keep it safe.
        #[arg(long)]
        out: PathBuf,
        /// Name of the federation, written into the certificates.
        #[arg(long)]
        federation: String,
        /// DNS name (or IP address) that clients use to reach the server.
        #[arg(long)]
        server_name: String,
        /// Further IP addresses of the server (repeatable).
        #[arg(long = "server-ip")]
        server_ips: Vec<IpAddr>,
    },
    /// Make this site's private key and a certificate signing request (hospital). The key stays here.
    Request {
        #[arg(long)]
        center: CenterId,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a site's CSR for a centre (coordinating centre). The certificate names the centre given here.
    Sign {
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        center: CenterId,
        /// Certificate file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        days: Days,
    },
    /// Make a centre's key and certificate in one step (simulations and tests).
    Issue {
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        center: CenterId,
        /// Folder for CENTER.pem, CENTER.key and ca.pem.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        days: Days,
    },
    /// Revoke a centre's certificates, or one certificate by serial, in the federation's CRL.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["center", "serial"])))]
    Revoke {
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        center: Option<CenterId>,
        /// Serial number in hexadecimal (colons allowed).
        #[arg(long)]
        serial: Option<String>,
    },
    /// The certificates issued, their centres, serials, expiry and revocation.
    List {
        #[arg(long)]
        pki: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct Days {
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

fn date(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init {
            out,
            federation,
            server_name,
            server_ips,
        } => {
            let pki = Pki::init(&out, &federation, &server_name, &server_ips)?;
            println!(
                "federation {federation}: CA and server certificate written to {}",
                out.display()
            );
            println!("  {}  give to every centre", pki.ca_cert_path().display());
            println!(
                "  {}  keep private: it signs every certificate",
                out.join("ca.key").display()
            );
        }
        CertsCommand::Request { center, out } => {
            let files = request(&center, &out)?;
            println!("private key: {}  (stays at this site)", files.key.display());
            println!(
                "request:     {}  (send to the coordinating centre)",
                files.csr.display()
            );
        }
        CertsCommand::Sign {
            pki,
            csr,
            center,
            out,
            days,
        } => {
            let pki = Pki::open(&pki)?;
            let signed = pki.sign_csr(&csr, &center, &out, IssueOptions::days(days.days)?)?;
            if let Some(asked) = &signed.requested_center {
                eprintln!("warning: the request asked for centre {asked}; the certificate is issued to {center}");
            }
            println!(
                "certificate for centre {center}, serial {}, valid until {}: {}",
                signed.issued.serial,
                date(signed.issued.not_after),
                out.display()
            );
            println!("send it back with {}", pki.ca_cert_path().display());
        }
        CertsCommand::Issue {
            pki,
            center,
            out,
            days,
        } => {
            let pki = Pki::open(&pki)?;
            let files = pki.issue(&center, &out, IssueOptions::days(days.days)?)?;
            println!(
                "centre {center}: serial {}, valid until {}",
                files.issued.serial,
                date(files.issued.not_after)
            );
            for p in [&files.cert, &files.key, &files.ca] {
                println!("  {}", p.display());
            }
        }
        CertsCommand::Revoke {
            pki,
            center,
            serial,
        } => {
            let pki = Pki::open(&pki)?;
            let target = match (center, serial) {
                (Some(c), None) => RevokeTarget::Center(c),
                (None, Some(s)) => RevokeTarget::Serial(s),
                _ => bail!("give exactly one of --center and --serial"),
            };
            for c in pki.revoke(&target)? {
                println!("revoked centre {} serial {}", c.center, c.serial);
            }
            println!("CRL updated: {}", pki.crl_path().display());
        }
        CertsCommand::List { pki } => {
            let pki = Pki::open(&pki)?;
            let certs = pki.list().context("cannot list the issued certificates")?;
            if certs.is_empty() {
                println!("no centre certificate issued yet");
                return Ok(());
            }
            let now = OffsetDateTime::now_utc();
            println!("{:<20} {:<34} {:<22} status", "centre", "serial", "expires");
            for c in certs {
                let left = (c.not_after - now).whole_days();
                let status = match c.revoked_at {
                    Some(t) => format!("revoked {}", date(t)),
                    None if c.not_after <= now => "EXPIRED".to_string(),
                    None if left < 30 => format!("valid, WARNING: expires in {left} days"),
                    None => "valid".to_string(),
                };
                println!(
                    "{:<20} {:<34} {:<22} {status}",
                    c.center,
                    c.serial,
                    date(c.not_after)
                );
            }
        }
    }
    Ok(())
}
