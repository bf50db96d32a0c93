//! A federation's model files around the server crate (which never reads them itself): the run opened from
//! the initial model file, each round's checkpoint written as a model file, and peak memory for reports.

use std::path::Path;

use fedslm_metrics::LogisticFit;
use fedslm_model::{clinical, load, save, ClinicalTable, ModelCard, ModelKind};
use fedslm_protocol::Weights;
use fedslm_server::{
    open_run, CheckpointWriter, InitialModel, OpenedRun, RoundSettings, ServerConfig, SignerCheck,
    Store, StoreError, VerifyReport,
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
/// (run id, strategy, rounds, seed, the `enrolled` centres, the final checkpoint's hash, the audit head, each
/// centre's policy hash), its
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
            "policies": policies(store)?,
            "privacy": privacy(store, settings)?,
        }),
        ..card.clone()
    };
    if let Some(metrics) = final_metrics(store)? {
        final_card.metrics = metrics;
    }
    if let Some(fit) = fit {
        final_card.clinical = Some(ClinicalTable::from_fit(fit));
        final_card.training["patients"] = json!(fit.n);
        final_card.training["newton_iterations"] = json!(fit.iterations);
    }
    Ok(save(path, weights, &final_card)?)
}

/// Under differential privacy: the run's noise, and what each centre released as the server received it with
/// its ε by the accountant (`fedslm_server::privacy`); null for a run in the clear.
pub fn privacy(store: &Store, settings: &RoundSettings) -> Result<serde_json::Value, StudyError> {
    let Some(dp) = settings.dp else {
        return Ok(serde_json::Value::Null);
    };
    Ok(json!({
        "noise_multiplier": dp.noise_multiplier,
        "clip": dp.clip,
        "newton_clip": dp.newton_clip,
        "sample_rate": dp.sample_rate,
        "delta": fedslm_server::privacy::DELTA,
        "by_center": fedslm_server::privacy::released(settings, &store.rounds()?),
    }))
}

/// Each centre's disclosure policy (its SHA-256, as its last Hello said), from the audit log.
pub fn policies(store: &Store) -> Result<serde_json::Value, StudyError> {
    let joins = store.joins()?;
    Ok(json!(joins
        .into_iter()
        .map(|(center, join)| (center, join.policy_hash))
        .collect::<std::collections::BTreeMap<_, _>>()))
}

/// The final model's evaluation as its card states it (internal: the training centres' held-out fold under
/// cross-validation, else their own patients; external: the validation centres): the last round's.
fn final_metrics(store: &Store) -> Result<Option<serde_json::Value>, StudyError> {
    let rounds = store.rounds()?;
    Ok(rounds.last().and_then(|last| {
        last.evaluation.as_ref().map(|ev| {
            json!({
                "round": last.round,
                "internal": ev.internal,
                "external": ev.external,
                "fold": ev.fold,
            })
        })
    }))
}

/// What `fedslm server verify` found.
#[derive(Debug)]
pub struct Verified {
    pub report: VerifyReport,
    /// Where the store could not be opened in place (a full or read-only disk): why; it was read from a copy.
    pub read_from_copy: Option<String>,
}

/// Verifies the run in `out`: the store's audit chain, signed head and checkpoints ([`Store::verify`]; with
/// `ca`, that the server signed the head, naming `server_name` or, by default, the server name of the PKI
/// folder holding `ca`), and a completed run's final model file against its card and its last checkpoint.
/// A store that cannot be opened in place is read from a copy in the system's temporary folder.
pub fn verify_run(
    out: &Path,
    ca: Option<&Path>,
    server_name: Option<&str>,
) -> Result<Verified, StudyError> {
    let (store, read_from_copy) = match Store::open_existing(out) {
        Ok(store) => (store, None),
        Err(e @ StoreError::Sled { .. }) => {
            let why = e.to_string();
            (Store::open_copy(out, &std::env::temp_dir())?, Some(why))
        }
        Err(e) => return Err(e.into()),
    };
    let pki_name = ca
        .and_then(Path::parent)
        .and_then(fedslm_certs::federation_server_name);
    let check = ca.map(|ca| SignerCheck {
        ca,
        server_name: server_name.or(pki_name.as_deref()),
    });
    let mut report = store.verify(check)?;
    let final_problems = check_final_model(out, &store, &report)?;
    report.problems.extend(final_problems);
    Ok(Verified {
        report,
        read_from_copy,
    })
}

/// A completed run's final model file (`<model>.safetensors` in `out`) against the store: its card names the
/// run and the last checkpoint, states the last round's evaluation, and its tensors are the checkpoint's.
fn check_final_model(
    out: &Path,
    store: &Store,
    report: &VerifyReport,
) -> Result<Vec<String>, StudyError> {
    let (Some(model), Some(hash)) = (&report.model, &report.final_checkpoint) else {
        return Ok(Vec::new());
    };
    let path = out.join(format!("{model}.safetensors"));
    let shown = path.display();
    let (weights, card) = match load(&path) {
        Ok(x) => x,
        Err(e) => return Ok(vec![format!("the final model {shown}: {e}")]),
    };
    let mut problems = Vec::new();
    let named = card.training["checkpoint_sha256"]
        .as_str()
        .unwrap_or("none");
    if named != hash {
        problems.push(format!(
            "the final model {shown} names checkpoint {named}; the run's last is {hash}"
        ));
    }
    let run = card.training["run_id"].as_str().unwrap_or("none");
    if run != report.run_id {
        problems.push(format!(
            "the final model {shown} is of run {run}; the store holds run {}",
            report.run_id
        ));
    }
    let metrics = final_metrics(store)?.unwrap_or(serde_json::Value::Null);
    if !card.metrics.is_null() && card.metrics != metrics {
        problems.push(format!(
            "the final model {shown} states an evaluation other than the run's last: {} (stored: {})",
            card.metrics, metrics
        ));
    }
    let checkpoint = fedslm_server::store::checkpoint_path(out, hash);
    match load(&checkpoint) {
        Err(e) => problems.push(format!("the last checkpoint {}: {e}", checkpoint.display())),
        Ok((last, _)) => {
            if let Some(why) = tensors_differ(&weights, &last) {
                problems.push(format!(
                    "the final model {shown} differs from the last checkpoint: {why}"
                ));
            }
        }
    }
    Ok(problems)
}

/// Where two models' tensors differ (names, shapes, dtypes or bytes), if they do.
fn tensors_differ(a: &Weights, b: &Weights) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} tensors against {}", a.len(), b.len()));
    }
    for t in a.tensors() {
        let Some(u) = b.get(t.name()) else {
            return Some(format!("tensor {} is not in the checkpoint", t.name()));
        };
        if t.shape() != u.shape() || t.dtype() != u.dtype() || t.bytes() != u.bytes() {
            return Some(format!("tensor {} was altered", t.name()));
        }
    }
    None
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
