//! The rustls configurations wrapped for QUIC, with the transport settings both ends share.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportConfig, VarInt};

use crate::error::CertError;

/// How long a silent connection lives; keep-alives go out well within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Connections still in their handshake that the server holds at once.
const MAX_PENDING_HANDSHAKES: usize = 256;

fn transport(incoming_bidi_streams: u32) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    // Infallible: 60 s is far below QUIC's limit on idle timeouts.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // Control stream and task streams only; fedslm never uses unidirectional streams.
    t.max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Models of tens of MB: larger windows than quinn's defaults, still bounded per connection.
    t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    Arc::new(t)
}

/// A QUIC server configuration from [`crate::server_config`]'s TLS configuration. Each client may open one
/// bidirectional stream at a time (its control stream).
pub fn quic_server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, CertError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(1));
    // A federation has a handful of centres: a flood of unauthenticated handshakes is refused, not queued
    // (quinn's default allows 65,536 pending).
    config.max_incoming(MAX_PENDING_HANDSHAKES);
    Ok(config)
}

/// A QUIC client configuration from [`crate::client_config`]'s TLS configuration. The server may open a few
/// task streams at once.
pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, CertError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(4));
    Ok(config)
}

/// The TLS alert behind a QUIC connection error, whichever side raised it (RFC 9001 §4.8: crypto errors are
/// transport codes 0x100 + alert).
pub fn tls_alert(e: &ConnectionError) -> Option<u8> {
    let code = match e {
        ConnectionError::TransportError(t) => t.code,
        ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return None,
    };
    let code = u64::from(code);
    (0x100..0x200)
        .contains(&code)
        .then_some((code - 0x100) as u8)
}

/// The centre of a QUIC connection's verified peer certificate.
pub fn connection_center(conn: &quinn::Connection) -> Result<fedslm_protocol::CenterId, CertError> {
    let identity = conn.peer_identity().ok_or(CertError::NoCenterIdentity)?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| CertError::NoCenterIdentity)?;
    crate::peer_center(&chain)
}

/// A TLS alert's name as the TLS specification spells it in CamelCase, e.g. `CertificateRevoked`.
pub fn alert_name(alert: u8) -> String {
    format!("{:?}", rustls::AlertDescription::from(alert))
}
