use std::path::PathBuf;

use fedslm_cohort::{LoadError, ManifestError};
use fedslm_metrics::MetricsError;
use fedslm_model::ModelError;
use fedslm_protocol::WeightsError;

use crate::scores::ScoresError;

/// Why a node could not load its cohort or carry out a task. Told to the server as the task's error text, so
/// it names the rule or the file, never a patient's data.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("client.toml has no cohort: name the folder that holds this centre's manifest.csv")]
    NoCohort,
    #[error("{}: a node holds one centre's cohort, found {found} ({names})", dir.display())]
    NotOneCenter {
        dir: PathBuf,
        found: usize,
        names: String,
    },
    #[error(transparent)]
    Manifest(Box<ManifestError>),
    #[error("cohort {}: {source}", dir.display())]
    Load {
        dir: PathBuf,
        source: Box<LoadError>,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Protocol(#[from] fedslm_protocol::ProtocolError),
    #[error("no patient with a known SLM outcome to evaluate on")]
    NothingToEvaluate,
    #[error("no patient with a known SLM outcome")]
    NoOutcome,
    #[error("{0} patients with images and an outcome: too few to train")]
    TooFewToTrain(usize),
    /// The site's policy (`[privacy]`) does not let this answer leave.
    #[error(transparent)]
    Policy(#[from] fedslm_client::PolicyRefusal),
    #[error("the clinical model is fitted by federated Newton, not trained")]
    ClinicalIsNotTrained,
    #[error("the clinical model is not a network")]
    NotANetwork,
    #[error("this centre's manifest names no images: it can take part in the clinical model only")]
    NoImages,
    #[error("this node's images are already standardised (preprocess.intensity_scale): their landmarks are the scale's, not the scanner's")]
    AlreadyStandardised,
    #[error("the task's network: {0}")]
    TaskNetwork(#[from] fedslm_model::ArchitectureError),
    #[error("the task's network takes {task} channels; this node's preprocessing makes {node}")]
    Channels { task: usize, node: usize },
    #[error("cannot keep a copy of the update: {0}")]
    Record(#[source] ModelError),
    #[error("cannot keep this run's scores: {0}")]
    KeepScores(#[source] ScoresError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("differential privacy: {0}")]
    Privacy(String),
}

/// Why a node cannot answer the second pass of a paired test.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("model {side}: this node has no evaluation of run {run:?}")]
    NoRun { side: &'static str, run: String },
    #[error("model {side}: run {run:?}: {source}")]
    KeptRun {
        side: &'static str,
        run: String,
        source: ScoresError,
    },
    #[error("model {side}: patient {patient} is scored in more than one run")]
    ScoredTwice { side: &'static str, patient: String },
    #[error(
        "model A scored {a} patients here and model B {b}, not all the same: a paired test needs the same patients"
    )]
    DifferentPatients { a: usize, b: usize },
    #[error("patient {0} has different outcomes in the two runs")]
    DifferentOutcomes(String),
}

/// What is wrong with the node's certificate, found before it connects.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read certificate {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("certificate {}: {source}", path.display())]
    Identity {
        path: PathBuf,
        source: fedslm_certs::CertError,
    },
    #[error("{} says centre {said}, but certificate {} is centre {certified}'s", config.display(), path.display())]
    OtherCenter {
        config: PathBuf,
        said: String,
        path: PathBuf,
        certified: String,
    },
    #[error("certificate {} is not valid yet (from {days} days from now): check this machine's clock", path.display())]
    NotYetValid { path: PathBuf, days: i64 },
    #[error("certificate {} expired {days} days ago: ask the coordinating centre for a new one", path.display())]
    Expired { path: PathBuf, days: i64 },
}

impl From<ManifestError> for NodeError {
    fn from(e: ManifestError) -> NodeError {
        NodeError::Manifest(Box::new(e))
    }
}
