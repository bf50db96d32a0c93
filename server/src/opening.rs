//! Opening a run: a new one, or the stored one after its last committed round, as a [`Coordinator`] over the
//! run's [`Store`]. The model files themselves are the caller's (this crate never reads candle's formats): it
//! hands over the initial model's weights and a reader for stored checkpoints.

use std::path::Path;
use std::sync::Arc;

use fedslm_certs::{CertError, Signer};
use fedslm_protocol::{ModelKind, Weights};

use crate::round::{Committed, Coordinator, RoundSettings, SetupError};
use crate::store::{Opening, Store, StoreError};
use crate::{ConfigError, ServerConfig};

/// The run's initial global model, as the caller read it.
#[derive(Debug, Clone)]
pub struct InitialModel {
    pub weights: Weights,
    pub kind: ModelKind,
    /// The file's SHA-256 (hex): part of the run's fingerprint.
    pub sha256: String,
    /// The clinical model's coefficient names (intercept first); empty for a network.
    pub names: Vec<String>,
}

/// An opened run: the round machine at its starting point and the store it commits to.
pub struct OpenedRun {
    pub coordinator: Coordinator,
    pub store: Arc<Store>,
    pub settings: RoundSettings,
    /// The last committed round (0 for a new run).
    pub committed: u32,
}

/// A reader of stored checkpoints (model files named by their hash).
pub type CheckpointReader<'a> =
    &'a dyn Fn(&Path) -> Result<Weights, Box<dyn std::error::Error + Send + Sync>>;

/// Why a run cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the server's key signs the audit log: {0}")]
    Signer(#[source] CertError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("round {round}'s checkpoint: {reason}")]
    Checkpoint { round: u32, reason: String },
    #[error("{}: {source}", path.display())]
    Setup {
        path: std::path::PathBuf,
        source: SetupError,
    },
}

/// Opens the run `config` names: new (or moved aside and new, with `new_run`), or resumed after its last
/// committed round with the same settings; a stored run with other settings is refused by the store, naming
/// what changed.
pub fn open_run(
    config: &ServerConfig,
    initial: InitialModel,
    new_run: bool,
    read_checkpoint: CheckpointReader<'_>,
) -> Result<OpenedRun, OpenError> {
    let settings = config.round_settings(initial.kind)?;
    let names: Vec<&str> = initial.names.iter().map(String::as_str).collect();
    let signer =
        Signer::from_files(&config.tls.cert, &config.tls.key).map_err(OpenError::Signer)?;
    let mut store = Store::open(&config.run.output, Some(signer))?;
    let fingerprint = config.fingerprint(&settings, &initial.sha256);
    let opening = store.begin(
        &config.enrolment.run_id,
        &fingerprint,
        settings.rounds,
        new_run,
    )?;
    let centers = config.enrolment.centers.clone();
    let last = match opening {
        Opening::New => None,
        Opening::Resume { rounds, .. } | Opening::Completed { rounds, .. } => {
            let history: Vec<_> = rounds.iter().filter_map(|r| r.newton_stats()).collect();
            match rounds.last() {
                None => None,
                Some(last) => {
                    let path = store.checked_checkpoint(&last.checkpoint)?;
                    let global = read_checkpoint(&path).map_err(|e| OpenError::Checkpoint {
                        round: last.round,
                        reason: e.to_string(),
                    })?;
                    Some(Committed {
                        round: last.round,
                        global,
                        newton_history: history,
                        evaluated: last.evaluation.is_some(),
                    })
                }
            }
        }
    };
    let committed = last.as_ref().map_or(0, |c| c.round);
    let coordinator = match last {
        None => Coordinator::new(settings.clone(), centers, initial.weights, &names),
        Some(last) => Coordinator::resume(settings.clone(), centers, initial.weights, &names, last),
    }
    .map_err(|source| OpenError::Setup {
        path: config.path().to_path_buf(),
        source,
    })?;
    Ok(OpenedRun {
        coordinator,
        store: Arc::new(store),
        settings,
        committed,
    })
}
