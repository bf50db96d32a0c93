//! The rustls configurations wrapped for QUIC, with the transport settings both ends share.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportConfig, VarInt};

use crate::error::CertError;

/// How long a silent connection lives; keep-alives go out well within it. They also bound how long a client
/// takes to learn that its server restarted: the new process answers them with a stateless reset.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Connections still in their handshake that the server holds at once.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Per stream, at the server: enough to keep a 1 Gbit/s, 15 ms path busy.
const SERVER_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// What a centre may send the server that the server has not read yet, on the whole connection, while the
/// server reads none of its answers: small, so that the answers of fifty centres waiting their turn cost the
/// server fifty times this, not fifty windows of megabytes (ResNet-18 among 50 centres: 316 -> 249-255 MiB).
pub const SERVER_IDLE_WINDOW: u32 = 256 * 1024;
/// The same while the server reads one of the centre's answers (it holds a reading permit): the stream's
/// whole window and as much again, enough for a 1 Gbit/s, 15 ms path.
pub const SERVER_READING_WINDOW: u32 = 2 * SERVER_STREAM_WINDOW;

fn transport(incoming_bidi_streams: u32, stream_window: u32, window: u32) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    // Infallible: 60 s is far below QUIC's limit on idle timeouts.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // Control stream and task streams only; fedslm never uses unidirectional streams.
    t.max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(stream_window));
    t.receive_window(VarInt::from_u32(window));
    Arc::new(t)
}

/// The server's QUIC endpoint settings. Its stateless-reset key is derived from the server's private key, so
/// that a server started again after a crash answers the packets of connections it lost with resets that their
/// clients accept: they learn at their next keep-alive that the connection is gone and reconnect, instead of
/// waiting out the idle timeout.
pub fn server_endpoint_config(
    files: &crate::ServerTlsFiles,
) -> Result<quinn::EndpointConfig, CertError> {
    use ring::digest::{Context, SHA256};
    let key = std::fs::read(&files.key).map_err(CertError::read(&files.key))?;
    let mut secret = Context::new(&SHA256);
    // Domain-separated: the key itself is never used as anything but a signing key.
    secret.update(b"fedslm quic stateless reset v1\0");
    secret.update(&key);
    let secret = secret.finish();
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // The connection ids carry a keyed hash that the endpoint checks before anything else; a key of this
    // process alone would make the next one drop the old connections' packets instead of resetting them.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&secret.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// A QUIC server configuration from [`crate::server_config`]'s TLS configuration. Each client may open one
/// bidirectional stream at a time (its control stream).
pub fn quic_server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, CertError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // What a centre may have sent that the server has not read yet stays small: the server reads one answer
    // at a time, with that centre's window opened to SERVER_READING_WINDOW while it does, and the others wait
    // in flow control, so its memory does not grow with the centres.
    config.transport_config(transport(1, SERVER_STREAM_WINDOW, SERVER_IDLE_WINDOW));
    // A federation has a handful of centres: a flood of unauthenticated handshakes is refused, not queued
    // (quinn's default allows 65,536 pending).
    config.max_incoming(MAX_PENDING_HANDSHAKES);
    // Datagrams held for connection attempts not yet decided on (quinn's defaults: 10 MiB each, 100 MiB in all).
    config.incoming_buffer_size(64 * 1024);
    config.incoming_buffer_size_total(4 * 1024 * 1024);
    Ok(config)
}

/// A QUIC client configuration from [`crate::client_config`]'s TLS configuration. The server may open a few
/// task streams at once.
pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, CertError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| CertError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // Models of tens of MB: larger windows than quinn's defaults, still bounded per connection.
    config.transport_config(transport(4, 8 * 1024 * 1024, 32 * 1024 * 1024));
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
    // Lazily: `then_some` would compute `code - 0x100` for every code and overflow below 0x100.
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// The centre of a QUIC connection's verified peer certificate.
pub fn connection_center(conn: &quinn::Connection) -> Result<fedslm_protocol::CenterId, CertError> {
    crate::peer_center(&connection_chain(conn)?)
}

/// A QUIC connection's verified peer certificate chain, its end entity first.
pub fn connection_chain(
    conn: &quinn::Connection,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, CertError> {
    let identity = conn.peer_identity().ok_or(CertError::NoCenterIdentity)?;
    identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map(|chain| *chain)
        .map_err(|_| CertError::NoCenterIdentity)
}

/// A TLS alert's name as the TLS specification spells it in CamelCase, e.g. `CertificateRevoked`.
pub fn alert_name(alert: u8) -> String {
    format!("{:?}", rustls::AlertDescription::from(alert))
}

/// UDP socket buffers asked of the kernel (Linux caps them at `net.core.rmem_max`/`wmem_max`, 4 MiB on
/// common systems). With the default 208 KiB, ten centres sending models at once overflow the server's
/// socket and drop packets, and QUIC's congestion control then slows every transfer down.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// A UDP socket bound to `addr` with large buffers, for a quinn endpoint.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too when bound to [::], as quinn's own sockets do.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer than asked for still works, only slower under load.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ConnectionClose, TransportErrorCode};

    #[test]
    fn a_tls_alert_is_read_from_crypto_codes_only() {
        let err = |code| {
            ConnectionError::ConnectionClosed(ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: Default::default(),
            })
        };
        assert_eq!(tls_alert(&err(TransportErrorCode::crypto(44))), Some(44));
        assert_eq!(
            tls_alert(&err(TransportErrorCode::PROTOCOL_VIOLATION)),
            None
        );
        assert_eq!(tls_alert(&err(TransportErrorCode::NO_ERROR)), None);
        assert_eq!(tls_alert(&ConnectionError::TimedOut), None);
    }
}
