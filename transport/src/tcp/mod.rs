//! TLS 1.3 over TCP, multiplexed by yamux: the transport for networks where QUIC's UDP does not pass.
//!
//! Why a multiplexer and not one TCP connection per stream: the server opens a task stream whenever a round
//! needs one, and a node behind a firewall or a proxy accepts no connections; one outbound connection that
//! carries streams both ways keeps the protocol exactly as it is over QUIC. yamux gives each stream its own
//! flow-control window (a waiting answer does not block the others), as QUIC does; it is Parity's
//! implementation of the protocol libp2p uses, maintained and widely deployed.

mod counted;
mod mux;
mod session;

pub(crate) use mux::Mux;
pub use mux::MuxStream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::proxy::{Proxy, ProxyError};
use crate::{alert_of_io, Link};
use counted::Counted;

/// Keep-alive probes begin after this long without traffic; with their interval and count a vanished peer
/// is noticed within about a minute, as QUIC's idle timeout does.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 9;
/// How long a refused connection is drained before it is dropped.
const LINGER: Duration = Duration::from_secs(2);
/// Data unacknowledged this long ends the connection.
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a TCP connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("cannot resolve {server}: {reason}")]
    Resolve { server: String, reason: String },
    #[error("cannot connect to {server} over TCP: {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("TLS with {server} failed: {reason}")]
    Tls {
        server: String,
        /// The TLS alert received or sent, if the failure was one.
        alert: Option<u8>,
        reason: String,
    },
    #[error("no TLS connection with {server} within {} s", after.as_secs())]
    Timeout { server: String, after: Duration },
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Connects to `server` (`host:port`) over TCP, through `proxy` if given, then TLS with `tls` for
/// `server_name`: all within `within`.
pub async fn connect(
    server: &str,
    proxy: Option<&Proxy>,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    within: Duration,
) -> Result<Link, TcpError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TcpError::ServerName(server_name.to_string()))?;
    let attempt = async {
        let stream = match proxy {
            Some(proxy) => proxy.tunnel(server).await?,
            None => {
                let addr = resolve(server).await?;
                TcpStream::connect(addr)
                    .await
                    .map_err(|source| TcpError::Connect {
                        server: server.to_string(),
                        source,
                    })?
            }
        };
        let remote = stream.peer_addr().map_err(|source| TcpError::Connect {
            server: server.to_string(),
            source,
        })?;
        tune(&stream);
        let state = mux::State::new();
        let counted = Counted::new(stream, state.clone());
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, counted)
            .await
            .map_err(|e| TcpError::Tls {
                server: server.to_string(),
                alert: alert_of_io(&e),
                reason: e.to_string(),
            })?;
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        Ok::<_, TcpError>(Link::tcp(Mux::start(
            tls.compat(),
            yamux::Mode::Client,
            remote,
            chain,
            state,
        )))
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| TcpError::Timeout {
            server: server.to_string(),
            after: within,
        })?
}

/// Why an incoming TCP connection did not become a [`Link`]: the TLS alert, if any, and the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptFailure {
    pub alert: Option<u8>,
    pub reason: String,
}

/// The server's TLS configuration for TCP (the same one QUIC uses). Cheap to clone.
#[derive(Clone)]
pub struct Acceptor(Arc<rustls::ServerConfig>);

/// An [`Acceptor`] for the federation's server configuration.
pub fn acceptor(tls: rustls::ServerConfig) -> Acceptor {
    Acceptor(Arc::new(tls))
}

/// TLS 1.3's `no_application_protocol` alert as a plaintext record (before any ServerHello): type 21, legacy
/// version 3.3, length 2, level fatal (2), description 120.
const NO_APPLICATION_PROTOCOL: [u8; 7] = [21, 3, 3, 0, 2, 2, 120];

/// The server's side: TLS with `acceptor` on an accepted socket, then yamux. The caller bounds its time.
/// ALPN is strict, as QUIC's (RFC 9001 §8.1): a client that offers none of the server's protocols gets
/// `no_application_protocol` before the ServerHello (rustls alone would let a client offering none through,
/// and would queue that alert behind its ServerHello, where a failed handshake's last write leaves it).
pub async fn accept(stream: TcpStream, acceptor: &Acceptor) -> Result<Link, AcceptFailure> {
    let remote = stream.peer_addr().map_err(|e| AcceptFailure {
        alert: None,
        reason: e.to_string(),
    })?;
    tune(&stream);
    let state = mux::State::new();
    let hello = tokio_rustls::LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        Counted::new(stream, state.clone()),
    )
    .await;
    let mut start = hello.map_err(|e| AcceptFailure {
        alert: alert_of_io(&e),
        reason: e.to_string(),
    })?;
    let ours = &acceptor.0.alpn_protocols;
    let offered: Vec<Vec<u8>> = start
        .client_hello()
        .alpn()
        .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    if !ours.is_empty() && !offered.iter().any(|p| ours.contains(p)) {
        use tokio::io::AsyncWriteExt;
        let _ = start.io.write_all(&NO_APPLICATION_PROTOCOL).await;
        tokio::spawn(linger(start.io.into_inner()));
        return Err(AcceptFailure {
            alert: Some(120),
            reason: rustls::Error::NoApplicationProtocol.to_string(),
        });
    }
    let tls = match start.into_stream(acceptor.0.clone()).into_fallible().await {
        Ok(tls) => tls,
        Err((e, socket)) => {
            // The alert is written; the client may still be sending. Closing now, with its bytes unread, would
            // reset the connection and could discard the alert before the client reads it.
            tokio::spawn(linger(socket.into_inner()));
            return Err(AcceptFailure {
                alert: alert_of_io(&e),
                reason: e.to_string(),
            });
        }
    };
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.to_vec())
        .unwrap_or_default();
    Ok(Link::tcp(Mux::start(
        tls.compat(),
        yamux::Mode::Server,
        remote,
        chain,
        state,
    )))
}

/// Closes a socket the polite way: our side ends (FIN after what was written), the peer's bytes are read and
/// dropped until it closes too or a moment passes.
async fn linger(mut socket: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = socket.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The first address of `server` (`host:port`).
pub async fn resolve(server: &str) -> Result<SocketAddr, TcpError> {
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| TcpError::Resolve {
            server: server.to_string(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| TcpError::Resolve {
            server: server.to_string(),
            reason: "no address".into(),
        })
}

/// No Nagle delay (frames are written whole), keep-alive and a user timeout: a best effort, as the
/// kernel may refuse an option.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = socket.set_tcp_user_timeout(Some(USER_TIMEOUT));
}
