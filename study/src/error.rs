use std::path::PathBuf;

use fedslm_cohort::{ImageError, LoadError, ManifestError};

/// Why a study step failed: typed at the leaves (the crates' own errors), with the step it happened in.
#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    /// A setting or an input that cannot work, with the reason.
    #[error("{0}")]
    Refused(String),
    /// A step that did not complete (a federation that failed, a server that stopped), with why.
    #[error("{0}")]
    Failed(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] fedslm_model::ModelError),
    #[error(transparent)]
    Manifest(Box<ManifestError>),
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error(transparent)]
    Image(Box<ImageError>),
    #[error(transparent)]
    Metrics(#[from] fedslm_metrics::MetricsError),
    #[error(transparent)]
    Node(Box<fedslm_node::NodeError>),
    #[error(transparent)]
    Certs(#[from] fedslm_certs::CertError),
    #[error(transparent)]
    ClientConfig(#[from] fedslm_client::ConfigError),
    #[error(transparent)]
    Client(Box<fedslm_client::ClientError>),
    #[error(transparent)]
    ServerConfig(#[from] fedslm_server::ConfigError),
    #[error(transparent)]
    Server(Box<fedslm_server::ServerError>),
    #[error(transparent)]
    Open(Box<fedslm_server::OpenError>),
    #[error(transparent)]
    Store(Box<fedslm_server::StoreError>),
    #[error("the server's socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("drawing {}: {reason}", path.display())]
    Figure { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Context {
        context: String,
        source: Box<StudyError>,
    },
}

macro_rules! boxed_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for StudyError {
            fn from(e: $t) -> StudyError {
                StudyError::$v(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    ManifestError => Manifest,
    LoadError => Load,
    ImageError => Image,
    fedslm_node::NodeError => Node,
    fedslm_client::ClientError => Client,
    fedslm_server::ServerError => Server,
    fedslm_server::OpenError => Open,
    fedslm_server::StoreError => Store,
);

/// The step an error happened in, as anyhow's `context` says it, for the study's typed errors.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StudyError>;
}

impl<T, E: Into<StudyError>> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StudyError> {
        self.map_err(|e| StudyError::Context {
            context: what(),
            source: Box::new(e.into()),
        })
    }
}

/// Creates a folder (and its parents), naming it on failure.
pub(crate) fn create_dir(path: &std::path::Path) -> Result<(), StudyError> {
    std::fs::create_dir_all(path).map_err(|source| StudyError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a whole file atomically and durably (`fedslm_files`), naming it on failure.
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), StudyError> {
    fedslm_files::write_atomic(path, bytes).map_err(|source| StudyError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The multi-threaded runtime a study step runs its servers and nodes on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, StudyError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StudyError::Failed(format!("cannot start the async runtime: {e}")))
}
