//! What a hospital's machine computes: the study's models, their local training and inference, and model files.
//!
//! Built so far: the clinical logistic model (`clinical`, in f64 through the metrics crate) and the model file
//! (safetensors plus a JSON model card). The candle networks (`mri`, `combined`) come with the rest of the model
//! issue.

pub mod clinical;
mod error;
pub mod file;

pub use error::ModelError;
pub use file::{load, save, ClinicalTable, ModelCard};
