//! `fedslm server`: the coordinating centre. With `initial_model` in its configuration it runs the rounds,
//! committing each to the run's store in `output` (checkpoints named by their hash, records and the audit log in
//! sled), resumes a stored run after a crash, and writes the final model; without, it only admits centres.
//! `server verify` and `server status` read a run's store.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fedslm_protocol::Role;
use fedslm_server::{
    OpenedRun, Outcome, Server, ServerConfig, ServerEvent, Store, StoreError, Strategy,
};
use fedslm_study::compare::compare_stored;
use fedslm_study::runs::{
    checkpoint_writer, open_run_from_files, peak_rss_mib, verify_run, write_final_model,
};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    command: Option<ServerCommand>,
    /// Server configuration (TOML): listen address, PKI folder, run, enrolled centres, rounds.
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// Begin a new run although the output folder holds one with other settings (or a completed one); the
    /// stored run is moved aside to `store-<start time>`, never deleted.
    #[arg(long)]
    new_run: bool,
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Check a run's audit chain, its signed head and every checkpoint's hash; names the first bad entry.
    /// The server must be stopped (it holds the store).
    Verify {
        /// The run's output folder (`output` in server.toml).
        #[arg(long)]
        out: PathBuf,
        /// The federation CA certificate: also check that the server signed the head (a certificate the CA
        /// issued for server authentication, valid when it signed, naming the server).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The server's name its certificate must carry (default: the one in the PKI folder holding --ca).
        #[arg(long, requires = "ca")]
        server_name: Option<String>,
    },
    /// Paired DeLong test of two models' evaluations (the second pass): each centre that evaluated both is
    /// sent the pooled histograms and returns sums of its patients' placements, from the scores it kept
    /// (client.toml's `scores` folder). Uses the configuration's listen address, PKI, centres and run_id.
    Compare {
        #[arg(long)]
        config: PathBuf,
        /// Output folders of model A's runs: its cross-validation folds' (internal), or its final run's.
        #[arg(long, value_delimiter = ',', required = true)]
        a: Vec<PathBuf>,
        /// Output folders of model B's runs, the same patients as A's.
        #[arg(long, value_delimiter = ',', required = true)]
        b: Vec<PathBuf>,
        /// internal: the training centres' evaluations; external: the validation centres'.
        #[arg(long, value_enum, default_value = "internal")]
        side: Side,
        /// Also write the result as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A run's rounds, centres, last metrics and audit head; while the server runs, from its status file.
    Status {
        /// The run's output folder (`output` in server.toml).
        #[arg(long)]
        out: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    Internal,
    External,
}

fn compare(
    config_path: &Path,
    a: &[PathBuf],
    b: &[PathBuf],
    side: Side,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    let config = ServerConfig::load(config_path)?;
    let role = match side {
        Side::Internal => Role::Train,
        Side::External => Role::Validate,
    };
    let (c, record) = compare_stored(config, config_path, a, b, role, |addr, sa, sb| {
        println!(
            "listening on {addr}: paired comparison of {} runs of A and {} of B at {}",
            sa.runs.len(),
            sb.runs.len(),
            sa.centers
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    })?;
    println!(
        "paired DeLong ({side:?}): AUC A {:.3} vs B {:.3}, difference {:.3}, z = {:.3}, p = {:.4}",
        c.auc_a,
        c.auc_b,
        c.auc_a - c.auc_b,
        c.z,
        c.p
    );
    if let Some(path) = json_out {
        fedslm_files::write_atomic(path, serde_json::to_string_pretty(&record)?.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    match args.command {
        Some(ServerCommand::Verify {
            out,
            ca,
            server_name,
        }) => return verify(&out, ca.as_deref(), server_name.as_deref()),
        Some(ServerCommand::Status { out, json }) => return status(&out, json),
        Some(ServerCommand::Compare {
            config,
            a,
            b,
            side,
            json,
        }) => return compare(&config, &a, &b, side, json.as_deref()),
        None => {}
    }
    let Some(config_path) = args.config else {
        bail!("--config is required");
    };
    let config = ServerConfig::load(&config_path)?;
    let enrolled: Vec<String> = config
        .enrolment
        .centers
        .iter()
        .map(|(c, r)| format!("{c} ({r:?})"))
        .collect();
    // The model, the rounds and the stored run are checked before anything listens.
    let federation = match &config.run.initial_model {
        None => None,
        Some(path) => Some(open_run_from_files(&config, path, args.new_run)?),
    };
    super::runtime()?.block_on(async {
        let server = Server::bind(config)?;
        let addr = server.local_addr().context("no local address")?;
        tracing::info!(%addr, centers = %enrolled.join(", "), "listening");
        let Some(run) = federation else {
            server
                .run(async {
                    super::shutdown_signal().await;
                    tracing::info!("shutting down");
                })
                .await;
            return Ok(());
        };
        let (
            OpenedRun {
                coordinator,
                store,
                settings,
                committed,
            },
            card,
        ) = run;
        if coordinator.is_finished() {
            println!(
                "run {} already ended after round {committed}; telling centres that reconnect. \
                 Start with --new-run for another run.",
                store.meta()?.map(|m| m.run_id).unwrap_or_default()
            );
        }
        let tcp = server
            .tcp_addr()
            .map_or(String::new(), |a| format!(" (UDP) and {a} (TCP)"));
        println!(
            "listening on {addr}{tcp}: {} model, strategy {}, {} rounds, quorum {} of {}",
            card.model,
            settings.strategy.name(),
            settings.rounds,
            settings.quorum,
            enrolled.len()
        );
        if committed > 0 {
            println!("resuming after round {committed} (its checkpoint verified)");
        }
        let out = store.out().to_path_buf();
        let mut events = server.subscribe();
        // The one-line status on a terminal; the log lines go above it.
        let bar =
            super::console::console().add(super::progress::rounds_bar("server", settings.rounds));
        bar.set_position(u64::from(committed));
        let progress = bar.clone();
        let writer = tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    ServerEvent::RoundCommitted(record) => {
                        progress.set_position(u64::from(record.round));
                        progress.set_message(record.summary());
                    }
                    // Printed also when the bar is hidden (not a terminal): these lines are the run's log.
                    ServerEvent::Admitted { center, .. } => {
                        progress.suspend(|| println!("centre {center} joined"))
                    }
                    ServerEvent::Evaluated(e) => progress.suspend(|| println!("{}", e.summary())),
                    ServerEvent::Finished(_) => break,
                    _ => {}
                }
            }
        });
        let checkpoint = checkpoint_writer(card.clone());
        let outcome = server
            .run_rounds(coordinator, store.clone(), checkpoint, async {
                super::shutdown_signal().await;
                tracing::info!("shutting down");
            })
            .await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
        bar.finish_and_clear();
        if let Err(e) = store.seal() {
            tracing::error!(error = %e, "cannot sign the audit log's last entries");
        }
        println!("server peak memory: {:.0} MiB", peak_rss_mib());
        match outcome {
            Some(Outcome::Completed {
                rounds,
                weights,
                fit,
            }) => {
                let path = out.join(format!("{}.safetensors", card.model));
                write_final_model(
                    &path,
                    &store,
                    &card,
                    &settings,
                    &enrolled,
                    &weights,
                    fit.as_ref(),
                )?;
                println!(
                    "run completed after {rounds} rounds; model: {}",
                    path.display()
                );
                if settings.strategy == Strategy::Landmarks {
                    // The consortium's intensity scale, for every centre's client.toml.
                    let (file, toml) = fedslm_study::scale::write_agreed_scale(&out, &weights)?;
                    println!(
                        "the agreed intensity scale, for every client.toml ({}):\n{toml}",
                        file.display()
                    );
                }
                println!(
                    "audit head: {} ({} entries)",
                    store.head().hex(),
                    store.head().entries
                );
                if let Some(fit) = &fit {
                    super::train::print_table(fit);
                }
                Ok(())
            }
            Some(Outcome::Failed { rounds, reason }) => {
                bail!("the run failed after {rounds} committed rounds: {reason}")
            }
            None => {
                println!("stopped; start the server again to resume the run");
                Ok(())
            }
        }
    })
}

/// `fedslm server verify`.
fn verify(out: &Path, ca: Option<&Path>, server_name: Option<&str>) -> anyhow::Result<()> {
    let verified = verify_run(out, ca, server_name)?;
    if let Some(why) = &verified.read_from_copy {
        println!("the store cannot be opened in place ({why}); read from a copy");
    }
    let r = verified.report;
    println!(
        "run {}: {} audit entries, head {}; {} rounds, {} checkpoints intact",
        r.run_id,
        r.entries,
        if r.head.is_empty() {
            "unknown (the chain is broken)"
        } else {
            &r.head
        },
        r.rounds,
        r.checkpoints
    );
    match (r.signed_entries, &r.signer) {
        (Some(n), Some(who)) => {
            println!("signed head covers {n} entries; signer {who}, the server's certificate")
        }
        (Some(n), None) => {
            println!("signed head covers {n} entries (signer not checked against a CA: pass --ca)")
        }
        _ => {}
    }
    if let Some(n) = r.signed_entries {
        if n < r.entries {
            println!(
                "{} entries after the signed head (written after the last commit) are not signed",
                r.entries - n
            );
        }
    }
    if r.problems.is_empty() {
        println!("verified");
        return Ok(());
    }
    for p in &r.problems {
        println!("BAD: {p}");
    }
    bail!(
        "{} problem(s); the first: {}",
        r.problems.len(),
        r.problems[0]
    )
}

/// `fedslm server status`.
fn status(out: &Path, as_json: bool) -> anyhow::Result<()> {
    let (s, live) = match Store::open_existing(out) {
        Ok(store) => (store.status()?, false),
        Err(StoreError::Locked { .. }) => (Store::read_status(out)?, true),
        Err(e) => return Err(e.into()),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "run {}: {}{}, {} of {} rounds committed{}",
        s.run_id,
        s.state,
        if live { " (server running)" } else { "" },
        s.rounds_committed,
        s.rounds_planned,
        if s.resumes > 0 {
            format!(", resumed {} time(s)", s.resumes)
        } else {
            String::new()
        }
    );
    if let Some(reason) = &s.reason {
        println!("  {reason}");
    }
    println!("centres:");
    for c in &s.centers {
        let last = match (c.last_round, c.last_examples, c.last_train_loss) {
            (Some(r), Some(n), Some(loss)) => format!(
                "{} rounds, last round {r}: {n} patients, loss {loss:.4}",
                c.rounds_contributed
            ),
            _ => "no contribution".into(),
        };
        let over = c.transport.as_deref().unwrap_or("-");
        println!("  {:<16} {:<9} {over:<5} {last}", c.center, c.role);
    }
    if let Some(r) = &s.last_round {
        println!(
            "last round {}: {} centres, {} patients, loss {}, {:.1} s, checkpoint {}",
            r.round,
            r.centers,
            r.examples,
            r.train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            r.seconds,
            r.checkpoint
        );
    }
    println!("audit: {} entries, head {}", s.audit.entries, s.audit.head);
    if live {
        let age = fedslm_server::store::now_ms().saturating_sub(s.updated_unix_ms) / 1000;
        println!(
            "(from {} written {age} s ago by server pid {})",
            fedslm_server::store::STATUS_FILE,
            s.server_pid.map_or("?".into(), |p| p.to_string())
        );
    }
    Ok(())
}
