//! `fedslm client`: a hospital node (the `fedslm_node` library). It loads and checks its cohort before it
//! connects (nothing leaves the site on bad data), then trains on the server's request and sends only weights,
//! counts and losses.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use fedslm_client::{connect, Backoff, ClientConfig, NodeEvent, TransportChoice};
use fedslm_node::{check, release, Node};
use fedslm_protocol::close;
use fedslm_transport::Transport;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Client configuration (TOML): centre, server, certificate files, cohort, coding and preprocessing.
    #[arg(long)]
    config: PathBuf,
    /// Check the certificate (identity, validity, expiry), the cohort, and that the server admits this centre;
    /// then exit.
    #[arg(long, conflicts_with = "dry_run")]
    check: bool,
    /// Load the cohort and print what would leave the site each round (message kinds and sizes); connect to
    /// nothing.
    #[arg(long)]
    dry_run: bool,
    /// Ask the server how far the run is and what this centre's part in it was (over this centre's own
    /// connection; a running node of the centre keeps its place); then exit. No cohort is loaded.
    #[arg(long, conflicts_with_all = ["check", "dry_run"])]
    status: bool,
    /// Give up after this many failed connection attempts in a row (default: keep trying).
    #[arg(long)]
    max_attempts: Option<u32>,
}

pub fn run(args: ClientArgs) -> anyhow::Result<()> {
    let config = ClientConfig::load(&args.config)?;
    if let Some(n) = config.threads {
        // Before any pool exists: candle's kernels and the loaders size theirs from it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if args.status {
        let (report, transport) = super::runtime()?.block_on(fedslm_client::status(&config))?;
        println!("asked {} over {transport}", config.server);
        print_status(&config, &report);
        return Ok(());
    }
    if args.check {
        let c = check::certificate(&config, &args.config)?;
        println!(
            "certificate: centre {}, valid for {} more days ({}){}",
            c.center,
            c.days_left,
            c.path.display(),
            if c.renew_soon() {
                ": renew it soon"
            } else {
                ""
            }
        );
    }
    // Looking (--dry-run, --check) does not hold the privacy ledger: the site's running node may.
    let node = if args.dry_run || args.check {
        Node::inspect(&config)?
    } else {
        Node::load(&config)?
    };
    let counts = node.counts();
    println!(
        "cohort: centre {}, {} patients ({} with SLM), {} with images",
        node.cohort().center,
        counts.patients,
        counts.positives,
        counts.with_images
    );
    if args.dry_run {
        println!(
            "privacy policy: {} (sha256 {}, sent in the Hello)",
            config.privacy,
            fedslm_protocol::hex::to_hex(&config.privacy.hash())
        );
        if let (Some(ledger), Some(budget)) = (node.ledger(), &config.privacy.dp_budget) {
            let s = ledger.spending(Some(budget))?;
            println!(
                "privacy ledger {}: ε {:.4} spent over {} runs (δ = {:e}){}; a run may spend ε {}",
                ledger.path().display(),
                s.lifetime_epsilon,
                s.runs.len(),
                s.delta,
                s.lifetime_remaining
                    .map_or(String::new(), |l| format!(", {l:.4} left over all runs")),
                budget.epsilon
            );
            println!(
                "under DP each release below is noised as the task asks (DP-SGD, noised Newton statistics, \
                 noised histogram counts; losses not released), and a task without DP is refused"
            );
        }
        for r in release::releases(&config, node.cohort())? {
            println!("{}: {}, {} bytes ({})", r.when, r.message, r.bytes, r.holds);
        }
        println!(
            "never: images, patient ids, clinical rows or predictions ({} patients' data stay at {})",
            node.cohort().manifest.patients.len(),
            node.cohort().center
        );
        return Ok(());
    }
    super::runtime()?.block_on(async {
        if args.check {
            // Each path on its own, then the configured route with a Hello.
            for c in fedslm_client::diagnose::probe(&config, config.route.quic_fallback).await {
                match c.failed {
                    None => println!("path: {}: ok", c.path),
                    Some(f) => println!("path: {}: failed at {}: {}", c.path, f.step, f.fix),
                }
            }
            let session = match connect(&config, counts).await {
                Ok(s) => s,
                Err(e) => {
                    let (transport, server) = match (&e, config.route.transport) {
                        (_, TransportChoice::Quic) => (Transport::Quic, &config.server),
                        _ => (Transport::Tcp, &config.route.tcp_server),
                    };
                    let f = fedslm_client::diagnose::explain(
                        &e,
                        transport,
                        server,
                        &config.server_name,
                    );
                    bail!("{e}\n{}: {}", f.step, f.fix)
                }
            };
            let w = session.welcome.clone();
            println!(
                "server: {} over {} admitted centre {} to run {} as {:?}, {} rounds",
                session.remote_address(),
                session.transport(),
                w.center,
                w.run_id,
                w.role,
                w.rounds
            );
            session.close(close::DONE, "check done").await;
            return Ok(());
        }
        let backoff = Backoff {
            attempts: args.max_attempts,
            ..Backoff::default()
        };
        // On a terminal, one status line (the log lines go above it); elsewhere, one line per event.
        let status = super::console::console().add(super::progress::status_line());
        let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let finish = fedslm_client::run(&config, counts, node, backoff, |e| {
            let line = match e {
                NodeEvent::Admitted { run_id } => format!("admitted to run {run_id}"),
                NodeEvent::Trained {
                    round,
                    examples,
                    loss,
                } => format!("round {round}: trained on {examples} patients, loss {loss:.4}"),
                NodeEvent::Refused { round, reason } => {
                    format!("round {round}: the server refused this update: {reason}")
                }
                NodeEvent::Void { round } => format!("round {round}: closed before this update"),
                NodeEvent::Reconnecting { after, reason } => {
                    format!("{reason}; reconnecting in {:.1} s", after.as_secs_f64())
                }
                NodeEvent::Accepted { round } => format!("round {round}: update accepted"),
            };
            if on_terminal {
                status.set_message(line);
            } else {
                println!("{line}");
            }
        })
        .await?;
        status.finish_and_clear();
        println!(
            "run {} finished after {} rounds: {}",
            finish.run_id, finish.rounds_completed, finish.reason
        );
        Ok(())
    })
}

/// `fedslm client --status`: the run, this centre's part in its latest rounds, the last evaluation.
fn print_status(config: &ClientConfig, r: &fedslm_protocol::StatusReport) {
    use fedslm_protocol::RoundOutcome;
    println!(
        "run {}: {}, {} of {} rounds committed",
        r.run_id, r.state, r.rounds_committed, r.rounds_planned
    );
    for part in &r.rounds {
        let what = match part.outcome {
            RoundOutcome::Contributed => format!(
                "contributed {} examples, loss {:.4}",
                part.examples, part.train_loss
            ),
            RoundOutcome::Refused => format!("refused: {}", part.reason),
            RoundOutcome::Silent => "no answer".to_string(),
            RoundOutcome::NotAsked => "not asked".to_string(),
        };
        println!("round {}: {} {what}", part.round, config.center);
    }
    if let Some(e) = &r.evaluation {
        let auc = |a: Option<f64>| a.map_or("not told".to_string(), |a| format!("{a:.3}"));
        println!(
            "last evaluation (round {}): internal AUC {}, external AUC {}",
            e.round,
            auc(e.internal_auc),
            auc(e.external_auc)
        );
    }
}
