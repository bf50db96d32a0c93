//! The study as a library: what `fedslm simulate`, `fedslm train`, `fedslm model init` and `fedslm evaluate`
//! do, with typed inputs and results; the binary only parses, calls and prints.
//!
//! - [`simulate`]: the study federated on one machine (servers and nodes in this process over loopback QUIC),
//!   its typed results ([`simulate::results`]) from which results.json, report.md and the printed table are
//!   rendered ([`simulate::report`]).
//! - [`centralised`]: centralised cross-validated training, the baseline federated results are measured
//!   against.
//! - [`bench`]: the round and commit benchmarks' measurements.
//! - [`compare`]: a paired test of two models' runs in a real deployment, from their stores.
//! - [`score`]: the statistics of a set of scores; [`figures`]: ROC, decision and calibration curves.
//! - [`init`], [`net`], [`predict`], [`runs`]: initial models, architectures, scoring a site, a federation's
//!   model files around the server.
//!
//! Invariant: no choice (rounds, cut-off) is made on the held-out centre's results; the Youden cut-off is
//! chosen on the internal scores and applied unchanged externally.

pub mod bench;
pub mod centralised;
pub mod compare;
mod error;
pub mod figures;
pub mod init;
pub mod net;
pub mod predict;
pub mod runs;
pub mod scale;
pub mod score;
pub mod simulate;

pub use error::{Context, StudyError};
pub use net::{Arch, NetSpec};
