//! What a hospital's machine computes: the study's three models, their local training and inference, and model
//! files.
//!
//! - `clinical`: logistic regression on the coded clinical factors, in f64 through the metrics crate (locally,
//!   or federated from centres' gradients and Hessians).
//! - `net` + `network`: the candle ResNets (`mri`, `combined`), seeded initialisation, the bridge to
//!   `protocol::Weights`; `train`: local training (augmentation: `cohort::augment`).
//! - `file`: safetensors plus a JSON model card.

pub mod clinical;
pub mod dp;
mod error;
pub mod file;
pub mod kernels;
pub mod net;
pub mod network;
pub mod train;

pub use dp::DpTraining;
pub use error::ModelError;
pub use fedslm_cohort::augment::{self, Augmentation, ScannerStyle};
pub use fedslm_protocol::ModelKind;
pub use file::{load, save, write_model, ClinicalTable, ModelCard};
pub use kernels::Kernels;
pub use net::{ArchitectureError, NetConfig, Stem};
pub use network::{Network, Standardisation};
pub use train::{EpochReport, Forward, Optimizer, TrainConfig, Trainer};
