//! The hospital node. It connects to the coordinating server with its centre certificate, says Hello, and
//! counts itself admitted only on Welcome: in TLS 1.3 a refused client certificate shows only after the
//! client's side of the handshake has finished.

pub mod config;
pub mod diagnose;
mod node;
pub mod policy;
pub mod secure;

pub use fedslm_certs::client_config;

use std::net::SocketAddr;
use std::time::Duration;

use fedslm_certs::{alert_name, quic_client_config, CertError};
use fedslm_protocol::io::{read_message, write_message};
use fedslm_protocol::text::escape_peer;
use fedslm_protocol::{
    close, ByteBudget, ErrorCode, Finish, Hello, Limits, Message, ProtocolError, SampleCounts,
    Welcome, PROTOCOL_VERSION,
};
use fedslm_transport::{tcp::TcpError, Closed, Link, ProxyError, RecvHalf, SendHalf, Transport};
use quinn::Endpoint;

pub use config::{ClientConfig, ConfigError, Route, TransportChoice};
pub use node::{run, Backoff, Declined, LocalTrainer, NodeEvent};
pub use policy::{Budget, Policy, PolicyRefusal, TaskKind};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a client could not join, or left.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("cannot resolve server {server}: {reason}")]
    Resolve { server: String, reason: String },
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("{server} ended the TLS handshake with alert {name} ({alert}): {reason}")]
    TlsAlert {
        server: String,
        alert: u8,
        name: String,
        reason: String,
    },
    #[error("{server} refused this centre ({code:?}): {message}")]
    Refused {
        server: String,
        code: ErrorCode,
        message: String,
    },
    #[error("{server} closed the connection (code {code}): {reason}")]
    Closed {
        server: String,
        code: u64,
        reason: String,
    },
    #[error("connection to {server} lost: {source}")]
    Connection { server: String, source: Closed },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("{server}: {source}")]
    Protocol {
        server: String,
        source: ProtocolError,
    },
    #[error("{server} sent {got} where {expected} was due")]
    Unexpected {
        server: String,
        expected: &'static str,
        got: String,
    },
    #[error("{server} did not answer within {} s", after.as_secs())]
    Timeout { server: String, after: Duration },
}

/// An admitted connection to the coordinating server.
pub struct Session {
    link: Link,
    /// Kept open for the run: dropping the send half would end the control stream.
    _control_send: SendHalf,
    control_recv: RecvHalf,
    server: String,
    limits: Limits,
    budget: ByteBudget,
    /// `record` of the configuration: where a copy of every frame sent is kept.
    record: Option<std::path::PathBuf>,
    pub welcome: Welcome,
}

impl Session {
    /// Waits for the server to end the run with Finish on the control stream.
    pub async fn wait_finish(mut self) -> Result<Finish, ClientError> {
        let msg = read_message(&mut self.control_recv, &self.limits, &self.budget).await;
        let result = match msg {
            Ok(Message::Finish(f)) => Ok(f),
            Ok(Message::Error(e)) => Err(ClientError::Refused {
                server: self.server.clone(),
                code: e.code,
                message: escape_peer(&e.message),
            }),
            Ok(other) => Err(ClientError::Unexpected {
                server: self.server.clone(),
                expected: "Finish",
                got: other.kind().to_string(),
            }),
            Err(e) => Err(lost(&self.server, &self.link, e).await),
        };
        self.close(close::DONE, "done").await;
        result
    }

    /// Closes the connection and waits briefly for the close to reach the server.
    pub async fn close(self, code: u32, reason: &str) {
        self.link
            .close_and_wait(code, reason.as_bytes(), Duration::from_secs(2))
            .await;
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.link.remote_address()
    }

    /// The transport this session uses.
    pub fn transport(&self) -> Transport {
        self.link.transport()
    }
}

/// The Hello this node sends: counts only, never a patient row.
pub fn hello(config: &ClientConfig, counts: SampleCounts) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: env!("CARGO_PKG_VERSION").to_string(),
        center: config.center.clone(),
        settings_hash: config.settings_hash(),
        policy_hash: config.privacy.hash(),
        requires_dp: config.privacy.dp_budget.is_some(),
        counts,
    }
}

/// Connects with the node's certificate files, says Hello and waits for Welcome.
pub async fn connect(config: &ClientConfig, counts: SampleCounts) -> Result<Session, ClientError> {
    connect_with(config, client_config(&config.tls)?, counts).await
}

/// With `record` set: a copy of a frame this node sends, byte for byte, in `record/frames/` (named by time,
/// sequence and message kind), so that a hospital can see exactly what left it.
pub(crate) fn keep_copy(record: Option<&std::path::Path>, msg: &Message, limits: &Limits) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = record else { return };
    let dir = dir.join("frames");
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!(
        "{ms}-{:06}-{}.frame",
        SEQ.fetch_add(1, Ordering::Relaxed),
        msg.kind()
    );
    let written = fedslm_protocol::codec::encode(msg, limits)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            std::fs::create_dir_all(&dir)
                .and_then(|_| fedslm_files::write_atomic(&dir.join(&name), &bytes))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot keep a copy of a frame sent");
    }
}

/// [`connect`] with a TLS configuration built by the caller (tests of the server's refusals build odd ones).
pub async fn connect_with(
    config: &ClientConfig,
    tls: rustls::ClientConfig,
    counts: SampleCounts,
) -> Result<Session, ClientError> {
    let server = config.server.clone();
    let link = open(config, tls).await?;
    let limits = Limits::default();
    let budget = ByteBudget::default();
    let hello = Message::Hello(hello(config, counts));
    keep_copy(config.record.as_deref(), &hello, &limits);
    let (send, recv, reply) = first_exchange(&link, &server, &hello, &limits, &budget).await?;
    match reply {
        Message::Welcome(welcome) => {
            let transport = link.transport();
            tracing::info!(%server, %transport, run = %welcome.run_id, role = ?welcome.role, "admitted");
            Ok(Session {
                link,
                _control_send: send,
                control_recv: recv,
                server,
                limits,
                budget,
                record: config.record.clone(),
                welcome,
            })
        }
        Message::Error(e) => Err(ClientError::Refused {
            server,
            code: e.code,
            message: escape_peer(&e.message),
        }),
        other => Err(ClientError::Unexpected {
            server,
            expected: "Welcome",
            got: other.kind().to_string(),
        }),
    }
}

/// The first frame of a connection's control stream, `first`, and the server's answer, within
/// [`WELCOME_TIMEOUT`]: the stream's halves are returned with it.
async fn first_exchange(
    link: &Link,
    server: &str,
    first: &Message,
    limits: &Limits,
    budget: &ByteBudget,
) -> Result<(SendHalf, RecvHalf, Message), ClientError> {
    let exchange = async {
        let (mut send, mut recv) = link
            .open_bi()
            .await
            .map_err(|e| connection_error(server, e))?;
        if let Err(e) = write_message(&mut send, first, limits).await {
            return Err(lost(server, link, e).await);
        }
        let reply = match read_message(&mut recv, limits, budget).await {
            Ok(reply) => reply,
            Err(e) => return Err(lost(server, link, e).await),
        };
        Ok::<_, ClientError>((send, recv, reply))
    };
    tokio::time::timeout(WELCOME_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            server: server.to_string(),
            after: WELCOME_TIMEOUT,
        })?
}

/// The run's status and this centre's part in it, asked of the server over the centre's own authenticated
/// connection (`fedslm client --status`). The server answers and closes; it never admits this connection, so
/// a node of the centre that is running keeps its place.
pub async fn status(
    config: &ClientConfig,
) -> Result<(fedslm_protocol::StatusReport, Transport), ClientError> {
    let server = config.server.clone();
    let link = open(config, client_config(&config.tls)?).await?;
    let limits = Limits::default();
    let ask = Message::StatusRequest(fedslm_protocol::StatusRequest {
        protocol_version: fedslm_protocol::PROTOCOL_VERSION,
        center: config.center.clone(),
    });
    let (_, _, reply) =
        first_exchange(&link, &server, &ask, &limits, &ByteBudget::default()).await?;
    link.close_and_wait(
        fedslm_protocol::close::DONE,
        b"status read",
        Duration::from_secs(2),
    )
    .await;
    match reply {
        Message::StatusReport(report) => Ok((report, link.transport())),
        Message::Error(e) => Err(ClientError::Refused {
            server,
            code: e.code,
            message: escape_peer(&e.message),
        }),
        other => Err(ClientError::Unexpected {
            server,
            expected: "StatusReport",
            got: other.kind().to_string(),
        }),
    }
}

/// The connection to the server with `tls`, before any message: over the configured transport, or QUIC
/// first and TLS over TCP if QUIC does not connect within the route's fallback time.
pub async fn open(config: &ClientConfig, tls: rustls::ClientConfig) -> Result<Link, ClientError> {
    match config.route.transport {
        TransportChoice::Quic => open_quic(config, tls, CONNECT_TIMEOUT).await,
        TransportChoice::Tcp => open_tcp(config, tls).await,
        TransportChoice::Auto => {
            match open_quic(config, tls.clone(), config.route.quic_fallback).await {
                Err(e) if no_answer(&e) => {
                    tracing::warn!(server = %config.server, error = %e, "QUIC did not connect; trying TLS over TCP");
                    open_tcp(config, tls).await
                }
                other => other,
            }
        }
    }
}

/// Whether a failed QUIC attempt heard nothing from the server (UDP blocked or lost), as opposed to an
/// answer (a TLS alert, a close): only the first makes TCP worth trying.
fn no_answer(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Timeout { .. }
            | ClientError::Socket(_)
            | ClientError::Connect { .. }
            | ClientError::Connection {
                source: Closed::TimedOut | Closed::Reset | Closed::Lost(_),
                ..
            }
    )
}

/// TLS over TCP to the route's `tcp_server`, through its proxy if it has one.
pub async fn open_tcp(
    config: &ClientConfig,
    tls: rustls::ClientConfig,
) -> Result<Link, ClientError> {
    let route = &config.route;
    fedslm_transport::tcp::connect(
        &route.tcp_server,
        route.proxy.as_ref(),
        std::sync::Arc::new(tls),
        &config.server_name,
        CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| tcp_error(&route.tcp_server, e))
}

fn tcp_error(server: &str, e: TcpError) -> ClientError {
    let server = server.to_string();
    match e {
        TcpError::Resolve { reason, .. } => ClientError::Resolve { server, reason },
        TcpError::Connect { source, .. } => ClientError::Connect {
            server,
            reason: source.to_string(),
        },
        TcpError::Proxy(p) => ClientError::Proxy(p),
        TcpError::Tls {
            alert: Some(alert),
            reason,
            ..
        } => ClientError::TlsAlert {
            server,
            alert,
            name: alert_name(alert),
            reason,
        },
        TcpError::Tls { reason, .. } => ClientError::Connect { server, reason },
        TcpError::Timeout { after, .. } => ClientError::Timeout { server, after },
        TcpError::ServerName(name) => ClientError::Connect {
            server,
            reason: format!("{name:?} is not a valid TLS server name"),
        },
    }
}

/// The QUIC connection to `config.server` with `tls`, within `within`.
pub async fn open_quic(
    config: &ClientConfig,
    tls: rustls::ClientConfig,
    within: Duration,
) -> Result<Link, ClientError> {
    let server = config.server.clone();
    let quic = quic_client_config(tls)?;
    let addr = fedslm_transport::tcp::resolve(&server)
        .await
        .map_err(|e| tcp_error(&server, e))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = fedslm_certs::udp_socket(bind).map_err(ClientError::Socket)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        ClientError::Socket(std::io::Error::other(
            "no async runtime to drive the endpoint",
        ))
    })?;
    let endpoint = Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(ClientError::Socket)?;
    let connecting = endpoint
        .connect_with(quic, addr, &config.server_name)
        .map_err(|e| ClientError::Connect {
            server: server.clone(),
            reason: e.to_string(),
        })?;
    let connection = tokio::time::timeout(within, connecting)
        .await
        .map_err(|_| ClientError::Timeout {
            server: server.clone(),
            after: within,
        })?
        .map_err(|e| connection_error(&server, e.into()))?;
    Ok(Link::quic(connection, Some(endpoint)))
}

/// A stream failed: if the connection is gone, its close says why (a TLS alert, a refusal); otherwise it
/// was the stream's own fault.
async fn lost(server: &str, link: &Link, e: ProtocolError) -> ClientError {
    match link.failure().await {
        Some(reason) => connection_error(server, reason),
        None => ClientError::Protocol {
            server: server.to_string(),
            source: e,
        },
    }
}

pub(crate) fn connection_error(server: &str, e: Closed) -> ClientError {
    let server = server.to_string();
    match e {
        Closed::TlsAlert { alert, reason } => ClientError::TlsAlert {
            server,
            alert,
            name: alert_name(alert),
            reason: escape_peer(&reason),
        },
        Closed::Application { code, reason } => ClientError::Closed {
            server,
            code,
            reason: escape_peer(&reason),
        },
        source => ClientError::Connection { server, source },
    }
}
