//! The coordinating server. It never sees an image or a patient row: only certificates, counts, weights and
//! aggregates. This crate never depends on `model`, `cohort` or candle.
//!
//! [`admission`] is pure (who may join, from the certificate's centre and the Hello); [`aggregate`] is pure (the
//! checks an update must pass, FedAvg folded in as updates arrive); [`Server`] is the thin async layer around
//! them: QUIC with mutual TLS, one task per connection.

pub mod admission;
pub mod aggregate;
pub mod audit;
pub mod config;
mod endpoint;
pub mod evaluation;
pub use fedslm_files::failpoint;
pub mod metrics;
mod opening;
pub mod privacy;
pub mod round;
pub mod store;

pub use admission::{admit, Enrolment, Refusal};
pub use aggregate::{check_update, FedAvg, UpdateRefusal};
pub use config::{ConfigError, ServerConfig};
pub use endpoint::{CheckpointWriter, HandshakeLimits, Server, ServerError, ServerEvent};
pub use opening::{open_run, CheckpointReader, InitialModel, OpenError, OpenedRun};
pub use round::{
    Action, Committed, Contribution, Coordinator, Input, Outcome, RoundRecord, RoundSettings,
    SetupError, Strategy,
};
pub use store::{
    Opening, RunState, RunStatus, SignerCheck, Store, StoreError, StoredRound, VerifyReport,
};
