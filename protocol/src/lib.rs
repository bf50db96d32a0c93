//! The wire contract between fedslm's coordinating server and its hospital clients.
//!
//! Messages ([`Message`]), named tensors ([`Weights`]), the frame codec ([`codec`]), the limits every
//! received size is checked against ([`Limits`], [`ByteBudget`]), and the cross-validation folds every centre
//! deals alike ([`folds`], with the seeded generator [`rng`]). Pure: no runtime, no sockets (the statistics
//! crate, pure f64, only for the aggregates' conversions); the async
//! helpers in [`io`] work over any `AsyncRead`/`AsyncWrite`. PROTOCOL.md at the repository root describes the
//! bytes for implementers in other languages.

pub mod center;
pub mod clinical;
pub mod codec;
mod convert;
mod error;
pub mod folds;
pub mod hex;
pub mod io;
pub mod landmarks;
mod limits;
mod message;
pub mod rng;
pub mod secure;
pub mod text;
mod weights;

pub use center::{CenterId, CenterIdError};
pub use error::ProtocolError;
pub use limits::{ByteBudget, Limits, DEFAULT_CONNECTION_BUDGET};
pub use message::*;
pub use weights::{DType, Tensor, TensorRole, Weights, WeightsError};

/// Version of the frame format and message set; both sides must speak the same.
pub const PROTOCOL_VERSION: u16 = 5;

/// TLS application protocol (ALPN) of fedslm over QUIC.
pub const ALPN: &[u8] = b"fedslm/1";

/// QUIC application close codes (the CONNECTION_CLOSE frame's error code, with a reason phrase for people).
pub mod close {
    /// The run is over, or the peer is done.
    pub const DONE: u32 = 0;
    /// Admission refused; an Error message on the control stream says why.
    pub const REFUSED: u32 = 1;
    /// The peer broke the protocol (malformed frame, unexpected message, limit exceeded, timeout).
    pub const PROTOCOL: u32 = 2;
    /// A newer connection of the same centre took this one's place.
    pub const SUPERSEDED: u32 = 3;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// The centre's certificate was revoked while it was connected.
    pub const REVOKED: u32 = 5;
}
