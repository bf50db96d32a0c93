//! A federation's model files around the server crate (which never reads them itself): the run opened from
//! the initial model file, each round's checkpoint written as a model file, and peak memory for reports.

use std::path::Path;

use fedslm_metrics::LogisticFit;
use fedslm_model::{clinical, load, save, ClinicalTable, ModelCard, ModelKind};
use fedslm_protocol::Weights;
use fedslm_server::{
    open_run, CheckpointWriter, InitialModel, OpenedRun, RoundSettings, ServerConfig, Store,
};
use serde_json::json;

use crate::{Context, StudyError};

/// The run that `config` names, opened (new, or resumed after its last committed round) from the initial
/// model file at `initial_path`; with that file's card.
pub fn open_run_from_files(
    config: &ServerConfig,
    initial_path: &Path,
    new_run: bool,
) -> Result<(OpenedRun, ModelCard), StudyError> {
    let what = || format!("initial model {}", initial_path.display());
    let (weights, card) = load(initial_path).context(what)?;
    let kind = card
        .model
        .parse::<ModelKind>()
        .map_err(|e| StudyError::Refused(format!("{}: {e}", initial_path.display())))?;
    let sha256 = fedslm_server::store::sha256_file(initial_path).context(what)?;
    let names = if kind == ModelKind::Clinical {
        clinical::names().into_iter().map(String::from).collect()
    } else {
        Vec::new()
    };
    let initial = InitialModel {
        weights,
        kind,
        sha256,
        names,
    };
    let read =
        |path: &Path| -> Result<_, Box<dyn std::error::Error + Send + Sync>> { Ok(load(path)?.0) };
    let opened = open_run(config, initial, new_run, &read)?;
    Ok((opened, card))
}

/// Writes each round's model file with `card` (the round in its provenance).
pub fn checkpoint_writer(card: ModelCard) -> CheckpointWriter {
    Box::new(move |record, weights, path| {
        // Nothing in the card that differs between two runs with the same seeds: equal models, equal hashes.
        let card = ModelCard {
            training: json!({"mode": "federated", "round": record.round}),
            ..card.clone()
        };
        save(path, weights, &card).map_err(Into::into)
    })
}

/// Writes a completed run's final model to `path`: the initial model's `card` with the run's provenance
/// (run id, strategy, rounds, seed, the `enrolled` centres, the final checkpoint's hash, the audit head), its
/// last stored evaluation, and for the clinical model its fit's table.
pub fn write_final_model(
    path: &Path,
    store: &Store,
    card: &ModelCard,
    settings: &RoundSettings,
    enrolled: &[String],
    weights: &Weights,
    fit: Option<&LogisticFit>,
) -> Result<(), StudyError> {
    let meta = store.meta()?;
    let mut final_card = ModelCard {
        training: json!({
            "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
            "mode": "federated",
            "run_id": meta.as_ref().map(|m| m.run_id.clone()).unwrap_or_default(),
            "strategy": settings.strategy.name(),
            "rounds": store.rounds()?.last().map_or(0, |r| r.round),
            "seed": settings.seed,
            "centers": enrolled,
            "checkpoint_sha256": meta.and_then(|m| m.final_checkpoint).unwrap_or_default(),
            "audit_head": store.head().hex(),
        }),
        ..card.clone()
    };
    // The final model's evaluation (internal: the training centres' held-out fold under cross-validation,
    // else their own patients; external: the validation centres).
    if let Some(last) = store.rounds()?.last() {
        if let Some(ev) = &last.evaluation {
            final_card.metrics = json!({
                "round": last.round,
                "internal": ev.internal,
                "external": ev.external,
                "fold": ev.fold,
            });
        }
    }
    if let Some(fit) = fit {
        final_card.clinical = Some(ClinicalTable::from_fit(fit));
        final_card.training["patients"] = json!(fit.n);
        final_card.training["newton_iterations"] = json!(fit.iterations);
    }
    Ok(save(path, weights, &final_card)?)
}

/// This process's peak resident memory, in MiB.
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
