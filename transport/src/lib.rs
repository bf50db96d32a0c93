//! The two ways a node and the server reach each other, behind one connection type, [`Link`].
//!
//! - **QUIC** (quinn), the first choice: streams, flow control and connection close codes are QUIC's own.
//! - **TLS 1.3 over TCP**, for networks that block UDP or send everything through an HTTP proxy: the same
//!   rustls configurations (certificates, ALPN, the client verifier with its CRL), the TLS stream multiplexed
//!   by yamux into the same bidirectional streams, and a close record that carries QUIC's close code and reason
//!   (`tcp/session.rs`). The proxy's HTTP CONNECT is in `proxy.rs`.
//!
//! Everything above this crate (the node's task loop, the server's connections, exchanges and status) sees
//! only [`Link`], [`SendHalf`] and [`RecvHalf`]: the frames, limits, refusals and round code are one.
//!
//! *Invariant*: every wait that comes from the network has a limit here or at its caller (connect, TLS
//! handshake, proxy answer, close linger), and every size read from a peer is bounded before allocation (the
//! proxy's answer, the close record, yamux's streams and windows).

mod alert;
mod link;
pub mod proxy;
mod quic;
pub mod tcp;

pub use alert::{alert_in_chain, alert_of_io, alert_of_rustls};
pub use link::{Link, RecvHalf, SendHalf};
pub use proxy::{Proxy, ProxyError};

use std::fmt;

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Quic, Transport::Tcp];

    /// Its name in configurations, logs, the audit log and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a connection is over, whichever transport it used (QUIC's `ConnectionError`, made neutral).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    /// The peer closed it with an application code and a reason (its text as sent: escape before logging).
    #[error("closed by peer: {reason} (code {code})")]
    Application { code: u64, reason: String },
    /// This side closed it.
    #[error("closed")]
    Locally,
    /// The TLS handshake failed with this alert, sent or received.
    #[error("TLS alert {alert}: {reason}")]
    TlsAlert { alert: u8, reason: String },
    /// Nothing came back within the idle timeout.
    #[error("timed out")]
    TimedOut,
    /// The peer reset the connection.
    #[error("reset by peer")]
    Reset,
    /// Anything else: a broken pipe, a protocol error below ours.
    #[error("connection lost: {0}")]
    Lost(String),
}
