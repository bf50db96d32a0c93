//! `fedslm server`: the coordinating centre. With `initial_model` in its configuration it runs the rounds,
//! committing each to the run's store in `output` (checkpoints named by their hash, records and the audit log in
//! sled), resumes a stored run after a crash, and writes the final model; without, it only admits centres.
//! `server verify` and `server status` read a run's store.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fedslm_certs::Signer;
use fedslm_metrics::ScoreHistograms;
use fedslm_model::{clinical, load, save, ClinicalTable, ModelCard};
use fedslm_protocol::{CenterId, ModelKind, PlacementTask, Role};
use fedslm_server::evaluation::{histograms_from_json, paired_comparison, Evaluation};
use fedslm_server::store::sha256_file;
use fedslm_server::{
    Committed, Coordinator, Opening, Outcome, RoundRecord, RoundSettings, Server, ServerConfig,
    ServerEvent, Store, StoreError,
};
use serde_json::json;

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
        /// The federation CA certificate: also check that the head's signer was issued by it.
        #[arg(long)]
        ca: Option<PathBuf>,
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

/// Run ids, pooled histograms and evaluating centres of one side of a comparison, from the runs' stores.
fn evaluations(
    dirs: &[PathBuf],
    role: Role,
    model: &str,
) -> anyhow::Result<(Vec<String>, ScoreHistograms, BTreeSet<CenterId>)> {
    let mut runs = Vec::new();
    let mut pooled: Option<ScoreHistograms> = None;
    let mut centres = BTreeSet::new();
    for dir in dirs {
        let at = || format!("model {model}: {}", dir.display());
        let store = Store::open_existing(dir).with_context(at)?;
        let meta = store
            .meta()
            .with_context(at)?
            .with_context(|| format!("{}: no run recorded", at()))?;
        let record = store
            .rounds()
            .with_context(at)?
            .into_iter()
            .rev()
            .find(|r| !r.evaluation.is_null())
            .with_context(|| format!("{}: run {} has no stored evaluation", at(), meta.run_id))?
            .evaluation;
        let hs =
            histograms_from_json(&record, role).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        if hs.is_empty() {
            bail!("{}: no {role:?} centre evaluated run {}", at(), meta.run_id);
        }
        for (c, h) in hs {
            centres.insert(c);
            match &mut pooled {
                Some(p) => p.merge(&h).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?,
                None => pooled = Some(h),
            }
        }
        runs.push(meta.run_id);
    }
    let pooled = pooled.with_context(|| format!("model {model}: no run named"))?;
    Ok((runs, pooled, centres))
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
    let (a_runs, pooled_a, centres_a) = evaluations(a, role, "A")?;
    let (b_runs, pooled_b, centres_b) = evaluations(b, role, "B")?;
    if centres_a != centres_b {
        bail!(
            "model A was evaluated at {:?} and model B at {:?}: a paired test needs the same patients",
            centres_a,
            centres_b
        );
    }
    if pooled_a.bins() != pooled_b.bins() {
        bail!(
            "model A's histograms have {} bins, model B's {}",
            pooled_a.bins(),
            pooled_b.bins()
        );
    }
    for c in &centres_a {
        if !config.enrolment.centers.contains_key(c) {
            bail!(
                "{c} evaluated the runs but is not enrolled in {}",
                config_path.display()
            );
        }
    }
    let centres: Vec<CenterId> = centres_a.into_iter().collect();
    let tasks: Vec<(CenterId, PlacementTask)> = centres
        .iter()
        .map(|c| {
            (
                c.clone(),
                PlacementTask::new(a_runs.clone(), b_runs.clone(), &pooled_a, &pooled_b),
            )
        })
        .collect();
    let deadline = config.run.deadline;
    let answers = super::runtime()?.block_on(async {
        let server = Server::bind(config)?;
        let addr = server.local_addr().context("no local address")?;
        println!(
            "listening on {addr}: paired comparison of {} runs of A and {} of B at {}",
            a_runs.len(),
            b_runs.len(),
            centres
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok::<_, anyhow::Error>(server.run_placements(tasks, deadline).await)
    })?;
    let mut reports = Vec::new();
    for (c, answer) in centres.iter().zip(answers) {
        match answer {
            Ok(r) => reports.push((c.clone(), r)),
            Err(e) => bail!("no paired comparison: {e}"),
        }
    }
    let c = paired_comparison(&pooled_a, &pooled_b, &reports)
        .map_err(|e| anyhow::anyhow!("no paired comparison: {e}"))?;
    println!(
        "paired DeLong ({side:?}): AUC A {:.3} vs B {:.3}, difference {:.3}, z = {:.3}, p = {:.4}",
        c.auc_a,
        c.auc_b,
        c.auc_a - c.auc_b,
        c.z,
        c.p
    );
    if let Some(path) = json_out {
        let v = json!({
            "side": format!("{side:?}").to_lowercase(), "a_runs": a_runs, "b_runs": b_runs,
            "centres": centres.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            "auc_a": c.auc_a, "auc_b": c.auc_b, "z": c.z, "p": c.p,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
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
    match args.command {
        Some(ServerCommand::Verify { out, ca }) => return verify(&out, ca.as_deref()),
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
        Some(path) => Some(open_run(&config, path, args.new_run)?),
    };
    super::runtime()?.block_on(async {
        let server = Server::bind(config)?;
        let addr = server.local_addr().context("no local address")?;
        tracing::info!(%addr, centres = %enrolled.join(", "), "listening");
        let Some(run) = federation else {
            server
                .run(async {
                    super::shutdown_signal().await;
                    tracing::info!("shutting down");
                })
                .await;
            return Ok(());
        };
        let Run {
            coordinator,
            card,
            store,
            settings,
            committed,
        } = run;
        println!(
            "listening on {addr}: {} model, strategy {}, {} rounds, quorum {} of {}",
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
        let bar = indicatif::ProgressBar::new(u64::from(settings.rounds));
        bar.set_style(
            indicatif::ProgressStyle::with_template("round {pos}/{len} [{bar:30}] {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_position(u64::from(committed));
        let progress = bar.clone();
        let writer = tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    ServerEvent::RoundCommitted(record) => {
                        progress.set_position(u64::from(record.round));
                        progress.set_message(round_line(&record));
                    }
                    // Printed also when the bar is hidden (not a terminal): these lines are the run's log.
                    ServerEvent::Admitted { center, .. } => {
                        progress.suspend(|| println!("centre {center} joined"))
                    }
                    ServerEvent::Evaluated(e) => {
                        progress.suspend(|| println!("{}", evaluation_line(&e)))
                    }
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
                let final_checkpoint = store
                    .meta()?
                    .and_then(|m| m.final_checkpoint)
                    .unwrap_or_default();
                let mut final_card = ModelCard {
                    training: json!({
                        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
                        "mode": "federated",
                        "run_id": store.meta()?.map(|m| m.run_id).unwrap_or_default(),
                        "strategy": settings.strategy.name(),
                        "rounds": rounds,
                        "seed": settings.seed,
                        "centers": enrolled,
                        "checkpoint_sha256": final_checkpoint,
                        "audit_head": store.head().hex(),
                    }),
                    ..card.clone()
                };
                // The final model's evaluation (internal: the training centres' held-out fold under
                // cross-validation, else their own patients; external: the validation centres).
                if let Some(last) = store.rounds()?.last() {
                    if let Some(ev) = last.evaluation.as_object() {
                        final_card.metrics = json!({
                            "round": last.round,
                            "internal": ev.get("internal"),
                            "external": ev.get("external"),
                            "fold": ev.get("fold"),
                        });
                    }
                }
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

/// Writes each round's model file with `card` (the round in its provenance).
pub fn checkpoint_writer(card: ModelCard) -> fedslm_server::CheckpointWriter {
    Box::new(move |record, weights, path| {
        // Nothing in the card that differs between two runs with the same seeds: equal models, equal hashes.
        let card = ModelCard {
            training: json!({"mode": "federated", "round": record.round}),
            ..card.clone()
        };
        save(path, weights, &card).map_err(|e| format!("{e:#}"))
    })
}

pub struct Run {
    pub coordinator: Coordinator,
    pub card: ModelCard,
    pub store: Arc<Store>,
    pub settings: RoundSettings,
    pub committed: u32,
}

/// The run to carry out: a new one, or the stored one after its last committed round.
pub fn open_run(config: &ServerConfig, initial_path: &Path, new_run: bool) -> anyhow::Result<Run> {
    let (initial, card) =
        load(initial_path).with_context(|| format!("initial model {}", initial_path.display()))?;
    let kind = kind_of(&card, initial_path)?;
    let settings = config.round_settings(kind)?;
    let names = clinical::names();
    let names: &[&str] = if kind == ModelKind::Clinical {
        &names
    } else {
        &[]
    };
    let out = &config.run.output;
    let signer = Signer::from_files(&config.tls.cert, &config.tls.key)
        .context("the server's key signs the audit log")?;
    let mut store = Store::open(out, Some(signer))?;
    let fingerprint = config.fingerprint(&settings, &sha256_file(initial_path)?);
    let opening = store.begin(
        &config.enrolment.run_id,
        &fingerprint,
        settings.rounds,
        new_run,
    )?;
    let centers = config.enrolment.centers.clone();
    let (coordinator, committed) = match opening {
        Opening::New => (
            Coordinator::new(settings.clone(), centers, initial, names),
            0,
        ),
        Opening::Resume { rounds, .. } | Opening::Completed { rounds, .. } => match rounds.last() {
            None => (
                Coordinator::new(settings.clone(), centers, initial, names),
                0,
            ),
            Some(last) => {
                let path = store.checked_checkpoint(&last.checkpoint)?;
                let (global, _) =
                    load(&path).with_context(|| format!("round {}'s checkpoint", last.round))?;
                let history: Vec<_> = rounds.iter().filter_map(|r| r.newton_stats()).collect();
                (
                    Coordinator::resume(
                        settings.clone(),
                        centers,
                        initial,
                        names,
                        Committed {
                            round: last.round,
                            global,
                            newton_history: history,
                            evaluated: !last.evaluation.is_null(),
                        },
                    ),
                    last.round,
                )
            }
        },
    };
    let coordinator = coordinator.with_context(|| format!("{}", config.path().display()))?;
    if coordinator.is_finished() {
        println!(
            "run {} already ended after round {committed}; telling centres that reconnect. \
             Start with --new-run for another run.",
            config.enrolment.run_id
        );
    }
    Ok(Run {
        coordinator,
        card,
        store: Arc::new(store),
        settings,
        committed,
    })
}

/// `round 5 evaluated: internal AUC 0.812 (0.702-0.922; 25+/95-), external AUC 0.790 (...)`.
pub fn evaluation_line(e: &Evaluation) -> String {
    let side = |role| match e
        .pooled(role)
        .map(|h| (h.delong(), h.n_positive(), h.n_negative()))
    {
        None => "none reported".to_string(),
        Some((Ok(a), p, n)) => {
            let (lo, hi) = a.ci95();
            format!("AUC {:.3} ({lo:.3}-{hi:.3}; {p}+/{n}-)", a.auc)
        }
        Some((Err(_), p, n)) => format!("no AUC ({p}+/{n}-)"),
    };
    let mut line = format!(
        "round {} evaluated{}: internal {}, external {}",
        e.round,
        e.fold
            .map(|f| format!(" (fold {} of {})", f.index + 1, f.count))
            .unwrap_or_default(),
        side(Role::Train),
        side(Role::Validate)
    );
    for (c, why) in &e.missing {
        line.push_str(&format!("; {c}: {why}"));
    }
    line
}

/// `3 centres, 120 patients, loss 0.5123` (and who was silent or refused).
pub fn round_line(r: &RoundRecord) -> String {
    let examples: u64 = r.contributions.iter().map(|c| c.examples).sum();
    let loss = r.train_loss();
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

/// `fedslm server verify`.
fn verify(out: &Path, ca: Option<&Path>) -> anyhow::Result<()> {
    let store = Store::open_existing(out)?;
    let r = store.verify(ca)?;
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
            println!("signed head covers {n} entries; signer {who}, issued by the CA")
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
    let (status, live) = match Store::open_existing(out) {
        Ok(store) => (store.status()?, false),
        Err(StoreError::Locked { .. }) => {
            let path = out.join(fedslm_server::store::STATUS_FILE);
            let bytes = std::fs::read(&path).with_context(|| {
                format!("the server runs but {} cannot be read", path.display())
            })?;
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))?;
            (v, true)
        }
        Err(e) => return Err(e.into()),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let s = &status;
    println!(
        "run {}: {}{}, {} of {} rounds committed{}",
        s["run_id"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        if live { " (server running)" } else { "" },
        s["rounds_committed"],
        s["rounds_planned"],
        match s["resumes"].as_u64() {
            Some(n) if n > 0 => format!(", resumed {n} time(s)"),
            _ => String::new(),
        }
    );
    if let Some(reason) = s["reason"].as_str() {
        println!("  {reason}");
    }
    println!("centres:");
    for c in s["centres"].as_array().into_iter().flatten() {
        let last = match c["last_round"].as_u64() {
            Some(r) => format!(
                "{} rounds, last round {r}: {} patients, loss {:.4}",
                c["rounds_contributed"],
                c["last_examples"],
                c["last_train_loss"].as_f64().unwrap_or(f64::NAN)
            ),
            None => "no contribution".into(),
        };
        println!(
            "  {:<16} {:<9} {last}",
            c["center"].as_str().unwrap_or("?"),
            c["role"].as_str().unwrap_or("?")
        );
    }
    if let Some(r) = s["last_round"].as_object() {
        println!(
            "last round {}: {} centres, {} patients, loss {:.4}, {:.1} s, checkpoint {}",
            r["round"],
            r["centres"],
            r["examples"],
            r["train_loss"].as_f64().unwrap_or(f64::NAN),
            r["seconds"].as_f64().unwrap_or(f64::NAN),
            r["checkpoint"].as_str().unwrap_or("?")
        );
    }
    println!(
        "audit: {} entries, head {}",
        s["audit"]["entries"],
        s["audit"]["head"].as_str().unwrap_or("?")
    );
    if live {
        let age = s["updated_unix_ms"]
            .as_u64()
            .map(|t| fedslm_server::store::now_ms().saturating_sub(t) / 1000);
        println!(
            "(from {} written {} s ago by server pid {})",
            fedslm_server::store::STATUS_FILE,
            age.map_or("?".into(), |a| a.to_string()),
            s["server_pid"]
        );
    }
    Ok(())
}

/// This process's peak resident memory.
pub fn peak_rss_mib() -> f64 {
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
