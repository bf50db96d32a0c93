use std::path::PathBuf;

/// Why a model could not be fitted, saved, loaded or applied.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Logistic(#[from] fedslm_metrics::LogisticError),
    #[error("no patient with a known SLM outcome to fit on")]
    NoLabels,
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
    #[error("{path} is not a fedslm model file: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{name} holds {got} values where {expected} were expected")]
    Shape {
        name: &'static str,
        got: usize,
        expected: usize,
    },
    #[error(transparent)]
    Weights(#[from] fedslm_protocol::WeightsError),
    #[error("network architecture: {0}")]
    Architecture(String),
    #[error("the weights do not fit the network: {0}")]
    WeightsMismatch(String),
    #[error("patient {patient} of {center}: {reason}")]
    Input {
        patient: String,
        center: String,
        reason: String,
    },
    #[error("training: {0}")]
    Training(String),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}
