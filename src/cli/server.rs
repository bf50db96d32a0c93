//! `fedslm server`: the coordinating centre. With `initial_model` in its configuration it runs the rounds and
//! writes each round's global model and the final model to `output`; without, it only admits centres.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use fedslm_model::{clinical, load, save, ClinicalTable, ModelCard};
use fedslm_protocol::{ModelKind, Weights};
use fedslm_server::{Coordinator, Outcome, RoundRecord, Server, ServerConfig, ServerEvent};
use serde_json::json;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Server configuration (TOML): listen address, PKI folder, run, enrolled centres, rounds.
    #[arg(long)]
    config: PathBuf,
}

fn kind_of(card: &ModelCard, path: &Path) -> anyhow::Result<ModelKind> {
    Ok(match card.model.as_str() {
        "clinical" => ModelKind::Clinical,
        "mri" => ModelKind::Mri,
        "combined" => ModelKind::Combined,
        other => bail!(
            "{}: model {other:?} is not clinical, mri or combined",
            path.display()
        ),
    })
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let config = ServerConfig::load(&args.config)?;
    let enrolled: Vec<String> = config
        .enrolment
        .centers
        .iter()
        .map(|(c, r)| format!("{c} ({r:?})"))
        .collect();
    // The model and the rounds are checked before anything listens.
    let federation = match &config.run.initial_model {
        None => None,
        Some(path) => {
            let (weights, card) =
                load(path).with_context(|| format!("initial model {}", path.display()))?;
            let kind = kind_of(&card, path)?;
            let settings = config.round_settings(kind)?;
            let names = clinical::names();
            let coordinator = Coordinator::new(
                settings.clone(),
                config.enrolment.centers.clone(),
                weights,
                if kind == ModelKind::Clinical {
                    &names
                } else {
                    &[]
                },
            )
            .with_context(|| format!("{}", config.path().display()))?;
            let out = config.run.output.clone();
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            // Each run's record starts empty (keeping runs across restarts is Federation II's).
            let log = out.join("rounds.jsonl");
            if log.exists() {
                std::fs::remove_file(&log)
                    .with_context(|| format!("cannot remove {}", log.display()))?;
            }
            Some((coordinator, card, out, settings))
        }
    };
    super::runtime()?.block_on(async {
        let server = Server::bind(config)?;
        let addr = server.local_addr().context("no local address")?;
        tracing::info!(%addr, centres = %enrolled.join(", "), "listening");
        let Some((coordinator, card, out, settings)) = federation else {
            server
                .run(async {
                    super::shutdown_signal().await;
                    tracing::info!("shutting down");
                })
                .await;
            return Ok(());
        };
        println!(
            "listening on {addr}: {} model, strategy {}, {} rounds, quorum {} of {}",
            card.model,
            settings.strategy.name(),
            settings.rounds,
            settings.quorum,
            enrolled.len()
        );
        let mut events = server.subscribe();
        let writer_out = out.clone();
        let writer_card = card.clone();
        let bar = indicatif::ProgressBar::new(u64::from(settings.rounds));
        bar.set_style(
            indicatif::ProgressStyle::with_template("round {pos}/{len} [{bar:30}] {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let progress = bar.clone();
        let writer = tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    ServerEvent::RoundCommitted(record) => {
                        progress.set_position(u64::from(record.round));
                        progress.set_message(round_line(&record));
                    }
                    ServerEvent::Admitted { center, .. } => {
                        progress.println(format!("centre {center} joined"))
                    }
                    ServerEvent::Finished(_) => break,
                    _ => {}
                }
            }
        });
        let commit: fedslm_server::CommitHook = Box::new(move |record, weights| {
            write_round(&writer_out, &writer_card, record, weights).map_err(|e| format!("{e:#}"))
        });
        let outcome = server
            .run_rounds(coordinator, commit, async {
                super::shutdown_signal().await;
                tracing::info!("shutting down");
            })
            .await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
        bar.finish_and_clear();
        println!("server peak memory: {:.0} MiB", peak_rss_mib());
        match outcome {
            Some(Outcome::Completed {
                rounds,
                weights,
                fit,
            }) => {
                let path = out.join(format!("{}.safetensors", card.model));
                let mut final_card = ModelCard {
                    training: json!({
                        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
                        "mode": "federated",
                        "strategy": settings.strategy.name(),
                        "rounds": rounds,
                        "seed": settings.seed,
                        "centers": enrolled,
                    }),
                    ..card.clone()
                };
                if let Some(fit) = &fit {
                    final_card.clinical = Some(ClinicalTable::from_fit(fit));
                    final_card.training["patients"] = json!(fit.n);
                    final_card.training["newton_iterations"] = json!(fit.iterations);
                }
                save(&path, &weights, &final_card)?;
                println!(
                    "run completed after {rounds} rounds; model: {}",
                    path.display()
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
                println!("stopped");
                Ok(())
            }
        }
    })
}

fn round_line(r: &RoundRecord) -> String {
    let examples: u64 = r.contributions.iter().map(|c| c.examples).sum();
    let loss = r
        .contributions
        .iter()
        .map(|c| c.train_loss * c.examples as f64)
        .sum::<f64>()
        / examples.max(1) as f64;
    format!(
        "{} centres, {examples} patients, loss {loss:.4}{}",
        r.contributions.len(),
        if r.silent.is_empty() && r.refused.is_empty() {
            String::new()
        } else {
            format!(", {} silent, {} refused", r.silent.len(), r.refused.len())
        }
    )
}

/// The round's global model as `round-NNNN.safetensors`, and its record as a line of `rounds.jsonl`.
fn write_round(
    out: &Path,
    card: &ModelCard,
    r: &RoundRecord,
    weights: &Weights,
) -> anyhow::Result<()> {
    let card = ModelCard {
        training: json!({"mode": "federated", "round": r.round}),
        ..card.clone()
    };
    save(
        &out.join(format!("round-{:04}.safetensors", r.round)),
        weights,
        &card,
    )?;
    let line = json!({
        "round": r.round,
        "retries": r.retries,
        "seconds": r.duration.as_secs_f64(),
        "contributions": r.contributions.iter().map(|c| json!({
            "center": c.center.as_str(), "examples": c.examples, "train_loss": c.train_loss,
        })).collect::<Vec<_>>(),
        "refused": r.refused.iter().map(|(c, why)| json!({"center": c.as_str(), "reason": why})).collect::<Vec<_>>(),
        "silent": r.silent.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "log_likelihood": r.log_likelihood,
    });
    let path = out.join("rounds.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// This process's peak resident memory.
fn peak_rss_mib() -> f64 {
    // VmHWM is this program's own high-water mark; getrusage's ru_maxrss also counts the parent's memory
    // that a forked child held before it exec'd us (a benchmark harness's, for one).
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        {
            return kib / 1024.0;
        }
    }
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    // Linux reports kibibytes.
    usage.ru_maxrss as f64 / 1024.0
}
