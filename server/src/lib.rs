//! The coordinating server. It never sees an image or a patient row: only certificates, counts, weights and
//! aggregates. This crate never depends on `model`, `cohort` or candle.
//!
//! [`admission`] is pure (who may join, from the certificate's centre and the Hello); [`Server`] is the thin
//! async layer around it: QUIC with mutual TLS, one task per connection.

pub mod admission;
pub mod config;
mod endpoint;

pub use admission::{admit, Enrolment, Refusal};
pub use config::{ConfigError, ServerConfig};
pub use endpoint::{Server, ServerError, ServerEvent};
