//! A federation's model files around the server crate (which never reads them itself): the run opened from
//! the initial model file, each round's checkpoint written as a model file, and peak memory for reports.

use std::path::Path;

use fedslm_model::{clinical, load, save, ModelCard, ModelKind};
use fedslm_server::{open_run, CheckpointWriter, InitialModel, OpenedRun, ServerConfig};
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
