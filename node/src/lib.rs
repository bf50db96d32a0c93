//! The hospital node as a library: what a site does with its own data when the coordinating server asks.
//!
//! - [`SiteCohort`]: the centre's manifest and preprocessed images, loaded and checked before anything
//!   connects; its patients selected by the wire contract's folds (`fedslm_protocol::folds`).
//! - [`Node`]: the tasks' answers (`fedslm_client::LocalTrainer`): local training or the clinical model's
//!   Newton statistics, evaluation into per-class histograms, the paired tests' placement sums from
//!   [`scores`] kept at the site.
//! - [`check::certificate`] and [`release::releases`]: what `--check` and `--dry-run` report.
//!
//! Invariant: only weights, counts, losses, histograms and sums leave through here; a patient's score is kept
//! at the node and never sent.

pub mod check;
mod cohort;
mod error;
pub mod fedbn;
pub mod ledger;
pub mod release;
pub mod scores;
mod trainer;

pub use cohort::SiteCohort;
pub use error::{CertificateError, NodeError, PlacementError};
pub use trainer::{Node, SharedNode};
