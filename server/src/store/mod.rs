//! The run's durable record (DESIGN.md §8). sled 0.34 holds the run (its settings' fingerprint, software, state),
//! each committed round and the audit log; model checkpoints are files named by the SHA-256 of their bytes,
//! fsynced and renamed into place before the round's record names them. A round is committed when the batch
//! that writes its record and its audit entry is flushed, and only then announced. Files for people and for a
//! running server's readers (`rounds.jsonl`, `status.json`, `audit-head.json`) are derived from sled and
//! rewritten whole, atomically, after each commit.
//!
//! One sled tree, three key spaces: `run` (the [`RunMeta`]), `round/` + round (big-endian u32) and `audit/` +
//! sequence number (big-endian u64), so that a round's record and its audit entry go into one atomic batch.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use fedslm_certs::Signer;
use fedslm_metrics::LogisticStats;
use fedslm_protocol::hex::to_hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod status;
mod verify;

use status::run_status;
pub use status::{center_status, AuditStatus, CenterStatus, LastRound, RunStatus};
pub use verify::{SignerCheck, VerifyReport};

use crate::audit::{AuditEvent, Head};
use crate::evaluation::EvaluationRecord;
use crate::failpoint;
use crate::round::{weighted_loss, RoundRecord};

/// The sled database, inside the output folder.
pub const STORE_DIR: &str = "store";
/// Content-addressed model checkpoints: `<sha256>.safetensors`.
pub const CHECKPOINT_DIR: &str = "checkpoints";
/// The run's state for readers while the server holds sled's lock.
pub const STATUS_FILE: &str = "status.json";
/// The audit log's head, signed with the server's key.
pub const HEAD_FILE: &str = "audit-head.json";
/// One committed round per line, for people and scripts.
pub const ROUNDS_FILE: &str = "rounds.jsonl";
pub const SOFTWARE: &str = concat!("fedslm ", env!("CARGO_PKG_VERSION"));

const RUN_KEY: &[u8] = b"run";
const ROUND_PREFIX: &[u8] = b"round/";
const AUDIT_PREFIX: &[u8] = b"audit/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path} is held by another fedslm server (one server per output folder); \
         `fedslm server status --out {out}` reads its status file"
    )]
    Locked { path: PathBuf, out: PathBuf },
    #[error("{path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no run is stored in {0}")]
    NoRun(PathBuf),
    #[error(
        "{path} holds run {run_id} with other settings: {changes}. Start it with the settings it had, or \
         with --new-run to begin another run (the stored one is kept as {archive})"
    )]
    ConfigChanged {
        path: PathBuf,
        run_id: String,
        changes: String,
        archive: String,
    },
    #[error("cannot sign the audit head: {0}")]
    Sign(#[from] fedslm_certs::CertError),
}

fn sled_err(path: &Path) -> impl FnOnce(sled::Error) -> StoreError + '_ {
    move |source| StoreError::Sled {
        path: path.to_path_buf(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Completed,
    Failed,
}

impl RunState {
    pub fn name(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
        }
    }
}

/// What a run is: stored when it starts, updated when it resumes or ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub run_id: String,
    /// The settings that decide the run's result, by name (seeds included).
    pub fingerprint: BTreeMap<String, String>,
    /// The software that started the run.
    pub software: String,
    pub started_unix_ms: u64,
    pub rounds_planned: u32,
    pub state: RunState,
    #[serde(default)]
    pub reason: Option<String>,
    /// The final model's checkpoint, once completed.
    #[serde(default)]
    pub final_checkpoint: Option<String>,
    /// How often a server started again on this run.
    #[serde(default)]
    pub resumes: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredContribution {
    pub center: String,
    pub examples: u64,
    /// NaN (JSON null) where the centre did not release it (differential privacy).
    #[serde(deserialize_with = "f64_or_nan")]
    pub train_loss: f64,
}

/// An f64 that JSON may hold as null: serde_json writes a NaN (a loss not released) so.
pub(crate) fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRefusal {
    pub center: String,
    pub reason: String,
}

/// Federated Newton: the round's summed statistics, from which a resumed server replays its solver exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewtonSums {
    pub gradient: Vec<f64>,
    pub hessian: Vec<f64>,
    pub log_likelihood: f64,
    pub n: u64,
    pub fitted_exactly: u64,
}

/// A committed round as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRound {
    pub round: u32,
    /// Hex SHA-256 of the checkpoint file of the global model after the round.
    pub checkpoint: String,
    pub retries: u32,
    pub contributions: Vec<StoredContribution>,
    pub refused: Vec<StoredRefusal>,
    pub silent: Vec<String>,
    pub seconds: f64,
    pub log_likelihood: Option<f64>,
    #[serde(default)]
    pub newton: Option<NewtonSums>,
    /// Under secure aggregation, the round's totals (its contributions name the centres only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<crate::round::SecureTotals>,
    /// Evaluation aggregates of the round's model; null until then.
    #[serde(default)]
    pub evaluation: Option<EvaluationRecord>,
    pub committed_unix_ms: u64,
}

impl StoredRound {
    pub fn new(r: &RoundRecord, checkpoint: String) -> StoredRound {
        StoredRound {
            round: r.round,
            checkpoint,
            retries: r.retries,
            contributions: r
                .contributions
                .iter()
                .map(|c| StoredContribution {
                    center: c.center.to_string(),
                    examples: c.examples,
                    train_loss: c.train_loss,
                })
                .collect(),
            refused: r
                .refused
                .iter()
                .map(|(c, why)| StoredRefusal {
                    center: c.to_string(),
                    reason: why.clone(),
                })
                .collect(),
            silent: r.silent.iter().map(|c| c.to_string()).collect(),
            seconds: r.duration.as_secs_f64(),
            log_likelihood: r.log_likelihood,
            newton: r.newton.as_ref().map(|s| NewtonSums {
                gradient: s.gradient.clone(),
                hessian: s.hessian.clone(),
                log_likelihood: s.log_likelihood,
                n: s.n,
                fitted_exactly: s.fitted_exactly,
            }),
            secure: r.secure,
            evaluation: None,
            committed_unix_ms: now_ms(),
        }
    }

    pub fn newton_stats(&self) -> Option<LogisticStats> {
        self.newton.as_ref().map(|s| LogisticStats {
            gradient: s.gradient.clone(),
            hessian: s.hessian.clone(),
            log_likelihood: s.log_likelihood,
            n: s.n,
            fitted_exactly: s.fitted_exactly,
        })
    }

    /// The patients behind the round's model: the contributions', or under secure aggregation the total.
    pub fn examples(&self) -> u64 {
        match self.secure {
            Some(s) => s.examples,
            None => self.contributions.iter().map(|c| c.examples).sum(),
        }
    }

    /// The example-weighted mean training loss.
    pub fn train_loss(&self) -> f64 {
        if let Some(s) = self.secure {
            return s.train_loss;
        }
        weighted_loss(
            self.contributions
                .iter()
                .map(|c| (c.examples, c.train_loss)),
        )
    }
}

/// What [`Store::begin`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Opening {
    /// A new run, nothing committed.
    New,
    /// A run that had not finished (or had failed) goes on after its last committed round.
    Resume {
        meta: RunMeta,
        rounds: Vec<StoredRound>,
    },
    /// The run completed before; nothing is left to do.
    Completed {
        meta: RunMeta,
        rounds: Vec<StoredRound>,
    },
}

/// `audit-head.json`: the head of the audit log, signed with the server's TLS key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedHead {
    pub run_id: String,
    pub entries: u64,
    pub head: String,
    pub scheme: String,
    /// Hex DER ECDSA signature of [`head_message`].
    pub signature: String,
    /// The signer's certificate (PEM).
    pub certificate: String,
    pub signed_unix_ms: u64,
}

/// The statement the server signs.
pub fn head_message(run_id: &str, entries: u64, head: &str) -> Vec<u8> {
    format!("fedslm audit head\nrun {run_id}\nentries {entries}\nsha256 {head}\n").into_bytes()
}

/// A centre's last admission as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastJoin {
    /// `quic` or `tcp`.
    pub transport: String,
    /// Its disclosure policy's SHA-256 (hex), as its Hello said.
    pub policy_hash: String,
}

/// The durable record of one run in an output folder.
pub struct Store {
    out: PathBuf,
    path: PathBuf,
    db: sled::Db,
    head: Mutex<Head>,
    signer: Option<Signer>,
    /// A copy of the store made to read it ([`Store::open_copy`]), removed with the store.
    copy: Option<PathBuf>,
    /// Each centre's last admission, read from the audit log once and then kept up to date as entries are
    /// appended (the status is rewritten at every commit; the log grows with every task).
    joins: Mutex<Option<BTreeMap<String, LastJoin>>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(copy) = &self.copy {
            let _ = std::fs::remove_dir_all(copy);
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn round_key(round: u32) -> Vec<u8> {
    [ROUND_PREFIX, &round.to_be_bytes()[..]].concat()
}

fn audit_key(seq: u64) -> Vec<u8> {
    [AUDIT_PREFIX, &seq.to_be_bytes()[..]].concat()
}

/// Hex SHA-256 of a file's bytes, read in pieces.
pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let mut file = std::fs::File::open(path).map_err(read_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Writes `bytes` to `path` whole or not at all, durably (`fedslm_files`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    fedslm_files::write_atomic(path, bytes).map_err(write_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fedslm_files::sync_dir(dir).map_err(write_err(dir))
}

fn open_db(path: &Path, out: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new().path(path).open().map_err(|e| match e {
        sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked {
            path: path.to_path_buf(),
            out: out.to_path_buf(),
        },
        other => StoreError::Sled {
            path: path.to_path_buf(),
            source: other,
        },
    })
}

impl Store {
    /// Opens (or creates) the store of the output folder `out`. `signer` signs the audit head at each commit.
    pub fn open(out: &Path, signer: Option<Signer>) -> Result<Store, StoreError> {
        let checkpoints = out.join(CHECKPOINT_DIR);
        std::fs::create_dir_all(&checkpoints).map_err(write_err(&checkpoints))?;
        let path = out.join(STORE_DIR);
        let db = open_db(&path, out)?;
        let store = Store {
            out: out.to_path_buf(),
            head: Mutex::new(Head::EMPTY),
            path,
            db,
            signer,
            copy: None,
            joins: Mutex::new(None),
        };
        *store.lock_head() = store.stored_head()?;
        // Checkpoints half-written by a process that was killed: never named by any record.
        if let Ok(dir) = std::fs::read_dir(&checkpoints) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(store)
    }

    /// Opens the store of `out` for reading; there must be one.
    pub fn open_existing(out: &Path) -> Result<Store, StoreError> {
        if !out.join(STORE_DIR).is_dir() {
            return Err(StoreError::NoRun(out.to_path_buf()));
        }
        Store::open(out, None)
    }

    /// Opens a copy of the store of `out`, made in a new folder under `scratch`, to read it where it cannot
    /// be opened in place: sled writes when it opens, which fails on a full or read-only disk. The copy is
    /// removed when the store is dropped; the run's other files (checkpoints, the signed head) are read where
    /// they are.
    pub fn open_copy(out: &Path, scratch: &Path) -> Result<Store, StoreError> {
        let source = out.join(STORE_DIR);
        if !source.is_dir() {
            return Err(StoreError::NoRun(out.to_path_buf()));
        }
        let copy = scratch.join(format!(
            "fedslm-store-copy-{}-{}",
            std::process::id(),
            now_ms()
        ));
        copy_dir(&source, &copy).map_err(|source| StoreError::Write {
            path: copy.clone(),
            source,
        })?;
        let db = match open_db(&copy, out) {
            Ok(db) => db,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&copy);
                return Err(e);
            }
        };
        let store = Store {
            out: out.to_path_buf(),
            head: Mutex::new(Head::EMPTY),
            path: copy.clone(),
            db,
            signer: None,
            copy: Some(copy),
            joins: Mutex::new(None),
        };
        *store.lock_head() = store.stored_head()?;
        Ok(store)
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    fn lock_head(&self) -> std::sync::MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stored_head(&self) -> Result<Head, StoreError> {
        let last = self
            .db
            .scan_prefix(AUDIT_PREFIX)
            .next_back()
            .transpose()
            .map_err(sled_err(&self.path))?;
        Ok(match last {
            None => Head::EMPTY,
            Some((key, bytes)) => {
                let seq = key
                    .get(AUDIT_PREFIX.len()..)
                    .and_then(|k| <[u8; 8]>::try_from(k).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| self.corrupt("an audit key that is not a sequence number"))?;
                Head {
                    entries: seq + 1,
                    hash: Sha256::digest(&bytes).into(),
                }
            }
        })
    }

    fn corrupt(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The stored run, if any.
    pub fn meta(&self) -> Result<Option<RunMeta>, StoreError> {
        match self.db.get(RUN_KEY).map_err(sled_err(&self.path))? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(format!("run record: {e}"))),
        }
    }

    /// Every committed round, in order.
    pub fn rounds(&self) -> Result<Vec<StoredRound>, StoreError> {
        self.db
            .scan_prefix(ROUND_PREFIX)
            .map(|kv| {
                let (_, v) = kv.map_err(sled_err(&self.path))?;
                serde_json::from_slice(&v).map_err(|e| self.corrupt(format!("round record: {e}")))
            })
            .collect()
    }

    /// Every audit entry's key and bytes, in order.
    pub fn audit_entries(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.db
            .scan_prefix(AUDIT_PREFIX)
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err(&self.path))?;
                let seq = k
                    .get(AUDIT_PREFIX.len()..)
                    .and_then(|k| <[u8; 8]>::try_from(k).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| self.corrupt("an audit key that is not a sequence number"))?;
                Ok((seq, v.to_vec()))
            })
            .collect()
    }

    pub fn head(&self) -> Head {
        *self.lock_head()
    }

    /// Starts run `run_id` with `fingerprint`, or goes on with the stored one if its settings are the same. A
    /// stored run with other settings is refused, naming each difference, unless `new_run`: then it is moved
    /// aside (`store-<start time>`; checkpoints stay) and a new one begins.
    pub fn begin(
        &mut self,
        run_id: &str,
        fingerprint: &BTreeMap<String, String>,
        rounds_planned: u32,
        new_run: bool,
    ) -> Result<Opening, StoreError> {
        if let Some(meta) = self.meta()? {
            let archive = format!("{STORE_DIR}-{}", meta.started_unix_ms);
            let changes = differences(&meta.fingerprint, fingerprint);
            if !new_run && !changes.is_empty() {
                return Err(StoreError::ConfigChanged {
                    path: self.path.clone(),
                    run_id: meta.run_id,
                    changes: changes.join("; "),
                    archive,
                });
            }
            if !new_run {
                let rounds = self.rounds()?;
                if meta.state == RunState::Completed {
                    self.write_derived()?;
                    return Ok(Opening::Completed { meta, rounds });
                }
                let previous_state = meta.state.name().to_string();
                let resumed = RunMeta {
                    state: RunState::Running,
                    reason: None,
                    resumes: meta.resumes + 1,
                    ..meta
                };
                self.write_with_audit(
                    &[(RUN_KEY.to_vec(), json_bytes(&resumed))],
                    AuditEvent::RunResumed {
                        software: SOFTWARE.into(),
                        committed_rounds: rounds.last().map_or(0, |r| r.round),
                        previous_state,
                    },
                )?;
                self.flush()?;
                self.write_derived()?;
                return Ok(Opening::Resume {
                    meta: resumed,
                    rounds,
                });
            }
            // Moved aside, never deleted: a run's record is not lost to a restart's flag.
            self.db.flush().map_err(sled_err(&self.path))?;
            let placeholder = sled::Config::new()
                .temporary(true)
                .open()
                .map_err(sled_err(&self.path))?;
            drop(std::mem::replace(&mut self.db, placeholder));
            let to = self.out.join(&archive);
            std::fs::rename(&self.path, &to).map_err(write_err(&to))?;
            self.db = open_db(&self.path, &self.out)?;
            *self.lock_head() = Head::EMPTY;
            tracing::info!(previous = %to.display(), "the stored run was moved aside for a new one");
        }
        let meta = RunMeta {
            run_id: run_id.to_string(),
            fingerprint: fingerprint.clone(),
            software: SOFTWARE.into(),
            started_unix_ms: now_ms(),
            rounds_planned,
            state: RunState::Running,
            reason: None,
            final_checkpoint: None,
            resumes: 0,
        };
        self.write_with_audit(
            &[(RUN_KEY.to_vec(), json_bytes(&meta))],
            AuditEvent::RunStarted {
                run_id: run_id.to_string(),
                software: SOFTWARE.into(),
                fingerprint: fingerprint.clone(),
            },
        )?;
        self.flush()?;
        self.write_derived()?;
        Ok(Opening::New)
    }

    /// Appends `event` to the audit log. Durable at the next flush (each commit, or sled's own within half a
    /// second).
    pub fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.write_with_audit(&[], event).map(|_| ())
    }

    /// Writes `records` and the audit entry of `event` in one atomic batch (not yet flushed).
    fn write_with_audit(
        &self,
        records: &[(Vec<u8>, Vec<u8>)],
        event: AuditEvent,
    ) -> Result<Head, StoreError> {
        let mut head = self.lock_head();
        let joined = match &event {
            AuditEvent::CenterJoined {
                center,
                transport,
                policy_hash,
                ..
            } => Some((
                center.clone(),
                LastJoin {
                    transport: transport.clone(),
                    policy_hash: policy_hash.clone(),
                },
            )),
            _ => None,
        };
        let (bytes, next) = head.append(event, now_ms());
        let mut batch = sled::Batch::default();
        for (k, v) in records {
            batch.insert(k.as_slice(), v.as_slice());
        }
        batch.insert(audit_key(head.entries), bytes);
        self.db.apply_batch(batch).map_err(sled_err(&self.path))?;
        *head = next;
        if let Some((center, join)) = joined {
            if let Some(joins) = self
                .joins
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                joins.insert(center, join);
            }
        }
        Ok(next)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(sled_err(&self.path))
    }

    /// The path a checkpoint is written to before [`Store::put_checkpoint`] names it by its hash.
    pub fn pending_checkpoint(&self, round: u32) -> PathBuf {
        self.out
            .join(CHECKPOINT_DIR)
            .join(format!(".round-{round:04}.pending"))
    }

    pub fn checkpoint_path(&self, hash: &str) -> PathBuf {
        checkpoint_path(&self.out, hash)
    }

    /// Hashes the file at `written`, makes it durable and renames it to its hash. Returns the hash.
    pub fn put_checkpoint(&self, written: &Path) -> Result<String, StoreError> {
        let hash = sha256_file(written)?;
        std::fs::File::open(written)
            .and_then(|f| f.sync_all())
            .map_err(write_err(written))?;
        let to = self.checkpoint_path(&hash);
        std::fs::rename(written, &to).map_err(write_err(&to))?;
        sync_dir(&self.out.join(CHECKPOINT_DIR))?;
        Ok(hash)
    }

    /// The checkpoint named `hash`, after checking that its bytes still hash to it.
    pub fn checked_checkpoint(&self, hash: &str) -> Result<PathBuf, StoreError> {
        let path = self.checkpoint_path(hash);
        let got = sha256_file(&path)?;
        if got != hash {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("its bytes hash to {got}, not to its name"),
            });
        }
        Ok(path)
    }

    /// Commits a round: its record and audit entry in one batch, flushed; then the derived files.
    pub fn commit_round(&self, round: &StoredRound) -> Result<(), StoreError> {
        self.write_with_audit(
            &[(round_key(round.round), json_bytes(round))],
            AuditEvent::RoundCommitted {
                round: round.round,
                checkpoint: round.checkpoint.clone(),
            },
        )?;
        failpoint::hit(failpoint::SLED_COMMIT, round.round);
        self.flush()?;
        self.write_derived()
    }

    /// Stores an evaluation round's aggregates with the round they evaluate, and its audit entry; flushed.
    pub fn record_evaluation(
        &self,
        round: u32,
        evaluation: EvaluationRecord,
    ) -> Result<(), StoreError> {
        let key = round_key(round);
        let bytes = self
            .db
            .get(&key)
            .map_err(sled_err(&self.path))?
            .ok_or_else(|| self.corrupt(format!("no record of round {round} to evaluate")))?;
        let mut stored: StoredRound = serde_json::from_slice(&bytes)
            .map_err(|e| self.corrupt(format!("round record: {e}")))?;
        let event = AuditEvent::RoundEvaluated {
            round,
            internal_auc: evaluation.internal.and_then(|a| a.auc),
            external_auc: evaluation.external.and_then(|a| a.auc),
            centers: evaluation.centers.len(),
            adapted_batch_norm: evaluation
                .centers
                .iter()
                .filter(|c| c.adapted_batch_norm)
                .map(|c| c.center.clone())
                .collect(),
        };
        stored.evaluation = Some(evaluation);
        self.write_with_audit(&[(key, json_bytes(&stored))], event)?;
        self.flush()?;
        self.write_derived()
    }

    /// Records how the run ended, after what each centre released under differential privacy (`privacy`,
    /// from [`crate::privacy::released`]; empty for a run in the clear).
    pub fn finish(
        &self,
        state: RunState,
        reason: &str,
        privacy: &BTreeMap<String, crate::privacy::Released>,
    ) -> Result<(), StoreError> {
        let meta = self
            .meta()?
            .ok_or_else(|| StoreError::NoRun(self.out.clone()))?;
        if meta.state == RunState::Completed && state == RunState::Completed {
            // A completed run started again: its end is on record already.
            return Ok(());
        }
        let rounds = self.rounds()?;
        let last = rounds.last();
        let checkpoint = match state {
            RunState::Completed => last.map(|r| r.checkpoint.clone()),
            _ => None,
        };
        for (center, r) in privacy {
            self.write_with_audit(
                &[],
                AuditEvent::PrivacySpent {
                    center: center.clone(),
                    fits: r.fits,
                    evaluations: r.evaluations,
                    epsilon: r.epsilon,
                    delta: crate::privacy::DELTA,
                },
            )?;
        }
        let meta = RunMeta {
            state,
            reason: Some(reason.to_string()),
            final_checkpoint: checkpoint.clone(),
            ..meta
        };
        self.write_with_audit(
            &[(RUN_KEY.to_vec(), json_bytes(&meta))],
            AuditEvent::RunFinished {
                state: state.name().into(),
                rounds: last.map_or(0, |r| r.round),
                reason: reason.to_string(),
                checkpoint,
            },
        )?;
        self.flush()?;
        self.write_derived()
    }

    /// Flushes what was appended since the last commit and signs the head again: when the server stops, so that
    /// the last entries (centres leaving after Finish) are covered by the signature too.
    pub fn seal(&self) -> Result<(), StoreError> {
        self.flush()?;
        self.write_derived()
    }

    /// The run's state for `fedslm server status` (and the status file).
    pub fn status(&self) -> Result<RunStatus, StoreError> {
        let meta = self
            .meta()?
            .ok_or_else(|| StoreError::NoRun(self.out.clone()))?;
        let rounds = self.rounds()?;
        Ok(run_status(&meta, &rounds, self.head(), &self.joins()?))
    }

    /// Each centre's last admission (its transport and its policy's hash), from the audit log's
    /// `center_joined` entries.
    pub fn joins(&self) -> Result<BTreeMap<String, LastJoin>, StoreError> {
        let mut cached = self.joins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(joins) = cached.as_ref() {
            return Ok(joins.clone());
        }
        let joins = self.scan_joins()?;
        *cached = Some(joins.clone());
        Ok(joins)
    }

    /// [`Store::joins`] from the audit log itself.
    fn scan_joins(&self) -> Result<BTreeMap<String, LastJoin>, StoreError> {
        let mut last = BTreeMap::new();
        for (_, bytes) in self.audit_entries()? {
            if let Ok(entry) = serde_json::from_slice::<crate::audit::Entry>(&bytes) {
                if let AuditEvent::CenterJoined {
                    center,
                    transport,
                    policy_hash,
                    ..
                } = entry.event
                {
                    last.insert(
                        center,
                        LastJoin {
                            transport,
                            policy_hash,
                        },
                    );
                }
            }
        }
        Ok(last)
    }

    /// The status a running server last wrote to `out/status.json` (its store is locked while it runs).
    pub fn read_status(out: &Path) -> Result<RunStatus, StoreError> {
        let path = out.join(STATUS_FILE);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// `rounds.jsonl`, `status.json` and the signed `audit-head.json`, from sled.
    fn write_derived(&self) -> Result<(), StoreError> {
        let Some(meta) = self.meta()? else {
            return Ok(());
        };
        let rounds = self.rounds()?;
        let mut lines = Vec::new();
        for r in &rounds {
            lines.extend(json_bytes(r));
            lines.push(b'\n');
        }
        write_atomic(&self.out.join(ROUNDS_FILE), &lines)?;
        let head = self.head();
        let status = RunStatus {
            server_pid: Some(std::process::id()),
            ..run_status(&meta, &rounds, head, &self.joins()?)
        };
        write_atomic(&self.out.join(STATUS_FILE), &json_pretty(&status))?;
        if let Some(signer) = &self.signer {
            let signature = signer.sign(&head_message(&meta.run_id, head.entries, &head.hex()))?;
            let signed = SignedHead {
                run_id: meta.run_id.clone(),
                entries: head.entries,
                head: head.hex(),
                scheme: fedslm_certs::SIGNATURE_SCHEME.into(),
                signature: to_hex(&signature),
                certificate: signer.certificate_pem().to_string(),
                signed_unix_ms: now_ms(),
            };
            write_atomic(&self.out.join(HEAD_FILE), &json_pretty(&signed))?;
        }
        Ok(())
    }
}

/// Copies the folder `from` (files and folders, recursively) to `to`, which must not exist.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub fn checkpoint_path(out: &Path, hash: &str) -> PathBuf {
    out.join(CHECKPOINT_DIR).join(format!("{hash}.safetensors"))
}

fn json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the store's records are plain data with string keys")
}

fn json_pretty<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("the store's records are plain data with string keys")
}

/// Each setting whose value differs, as `name: stored -> now`.
fn differences(stored: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    let mut keys: Vec<&String> = stored.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (stored.get(k), now.get(k));
            (a != b).then(|| {
                format!(
                    "{k}: {} -> {}",
                    a.map_or("(none)", String::as_str),
                    b.map_or("(none)", String::as_str)
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_protocol::CenterId;

    #[test]
    fn a_loss_not_released_is_stored_as_null_and_read_back_as_nan() {
        let c = StoredContribution {
            center: "a".into(),
            examples: 3,
            train_loss: f64::NAN,
        };
        let bytes = json_bytes(&c);
        assert!(String::from_utf8_lossy(&bytes).contains("\"train_loss\":null"));
        let back: StoredContribution = serde_json::from_slice(&bytes).unwrap();
        assert!(back.train_loss.is_nan());
    }

    pub(super) fn fingerprint(rounds: u32) -> BTreeMap<String, String> {
        [
            ("run_id".to_string(), "r1".to_string()),
            ("rounds".to_string(), rounds.to_string()),
            ("center.center-a".to_string(), "train".to_string()),
        ]
        .into()
    }

    fn record(round: u32) -> RoundRecord {
        RoundRecord {
            round,
            retries: 0,
            contributions: vec![crate::round::Contribution {
                center: CenterId::new("center-a").unwrap(),
                examples: 10,
                train_loss: 0.5,
            }],
            refused: vec![],
            silent: vec![],
            duration: std::time::Duration::from_millis(10),
            log_likelihood: None,
            newton: None,
            secure: None,
        }
    }

    pub(super) fn commit(store: &Store, round: u32, bytes: &[u8]) -> String {
        let pending = store.pending_checkpoint(round);
        std::fs::write(&pending, bytes).unwrap();
        let hash = store.put_checkpoint(&pending).unwrap();
        store
            .commit_round(&StoredRound::new(&record(round), hash.clone()))
            .unwrap();
        hash
    }

    #[test]
    fn a_run_is_resumed_refused_with_other_settings_and_moved_aside_for_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        {
            let mut store = Store::open(out, None).unwrap();
            assert_eq!(
                store.begin("r1", &fingerprint(3), 3, false).unwrap(),
                Opening::New
            );
            let h1 = commit(&store, 1, b"model one");
            assert_eq!(h1, to_hex(&Sha256::digest(b"model one")));
            assert_eq!(
                std::fs::read(store.checkpoint_path(&h1)).unwrap(),
                b"model one"
            );
            // Held: a second server on the same folder is told so.
            let err = Store::open(out, None).err().unwrap().to_string();
            assert!(err.contains("held by another fedslm server"), "{err}");
            let status: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join(STATUS_FILE)).unwrap()).unwrap();
            assert_eq!(status["rounds_committed"], 1);
            assert_eq!(status["centers"][0]["center"], "center-a");
        }
        {
            let mut store = Store::open(out, None).unwrap();
            let err = store
                .begin("r1", &fingerprint(5), 5, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("rounds: 3 -> 5"), "{err}");
            match store.begin("r1", &fingerprint(3), 3, false).unwrap() {
                Opening::Resume { rounds, meta } => {
                    assert_eq!(rounds.len(), 1);
                    assert_eq!(meta.resumes, 1);
                }
                other => panic!("{other:?}"),
            }
            commit(&store, 2, b"model two");
            store
                .finish(RunState::Completed, "completed 2 rounds", &BTreeMap::new())
                .unwrap();
            let report = store.verify(None).unwrap();
            // Unsigned here: the chain and checkpoints hold, the signature is missing.
            assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
            assert!(
                report.problems[0].contains(HEAD_FILE),
                "{:?}",
                report.problems
            );
            assert_eq!((report.rounds, report.checkpoints), (2, 2));
        }
        {
            let mut store = Store::open(out, None).unwrap();
            assert!(matches!(
                store.begin("r1", &fingerprint(3), 3, false).unwrap(),
                Opening::Completed { .. }
            ));
            assert_eq!(
                store.begin("r1", &fingerprint(5), 5, true).unwrap(),
                Opening::New
            );
            assert!(store.rounds().unwrap().is_empty());
            assert_eq!(store.head().entries, 1);
        }
        let archived: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("store-"))
            .collect();
        assert_eq!(archived.len(), 1, "the old run is kept");
    }
}
