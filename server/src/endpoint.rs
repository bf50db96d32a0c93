//! The QUIC endpoint: accepts connections, identifies each peer by its certificate, runs admission on its
//! Hello and keeps the admitted centres. One task per connection: whatever one peer does, the others are
//! served.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedslm_certs::{
    alert_name, connection_center, quic_server_config, server_config, tls_alert, CertError,
};
use fedslm_protocol::io::{read_message, write_message};
use fedslm_protocol::{
    close, ByteBudget, CenterId, ErrorCode, Limits, Message, ProtocolError, Role,
};
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::broadcast;

use crate::admission::admit;
use crate::config::ServerConfig;

/// How long a refused peer has to read its Error before the connection is closed.
const ERROR_LINGER: Duration = Duration::from_secs(2);

/// What the server saw, for logs, tests and (later) the round state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// TLS or QUIC handshake failed (no, unknown, expired, revoked or misused certificate; wrong ALPN).
    HandshakeFailed {
        remote: SocketAddr,
        alert: Option<u8>,
        reason: String,
    },
    /// A verified peer was refused admission, with the code and message it was sent.
    Refused {
        remote: SocketAddr,
        center: CenterId,
        code: ErrorCode,
        reason: String,
    },
    Admitted {
        remote: SocketAddr,
        center: CenterId,
        role: Role,
    },
    Disconnected {
        center: CenterId,
        reason: String,
    },
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Admitted {
    connection: Connection,
}

struct Shared {
    config: ServerConfig,
    limits: Limits,
    events: broadcast::Sender<ServerEvent>,
    peers: Mutex<HashMap<CenterId, Admitted>>,
}

impl Shared {
    fn emit(&self, event: ServerEvent) {
        match &event {
            ServerEvent::HandshakeFailed {
                remote,
                alert,
                reason,
            } => {
                tracing::warn!(%remote, alert = alert.map(alert_name), %reason, "handshake failed")
            }
            ServerEvent::Refused {
                remote,
                center,
                reason,
                ..
            } => {
                tracing::warn!(%remote, %center, %reason, "refused")
            }
            ServerEvent::Admitted {
                remote,
                center,
                role,
            } => {
                tracing::info!(%remote, %center, ?role, "admitted")
            }
            ServerEvent::Disconnected { center, reason } => {
                tracing::info!(%center, %reason, "disconnected")
            }
        }
        // No subscriber is fine: events are also logged.
        let _ = self.events.send(event);
    }
}

/// The coordinating server's endpoint.
pub struct Server {
    endpoint: Endpoint,
    shared: Arc<Shared>,
}

impl Server {
    /// Loads the TLS files and binds the UDP socket. Must be called within a tokio runtime.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let quic = quic_server_config(server_config(&config.tls)?)?;
        let endpoint =
            Endpoint::server(quic, config.listen).map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let (events, _) = broadcast::channel(1024);
        Ok(Server {
            endpoint,
            shared: Arc::new(Shared {
                config,
                limits: Limits::default(),
                events,
                peers: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.shared.events.subscribe()
    }

    /// The centres admitted and still connected.
    pub fn connected(&self) -> Vec<CenterId> {
        let mut ids: Vec<CenterId> = lock(&self.shared.peers).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = self.shared.clone();
                    tokio::spawn(async move { serve(shared, incoming).await });
                }
                () = &mut shutdown => break,
            }
        }
        self.endpoint
            .close(VarInt::from_u32(close::SHUTDOWN), b"server shutting down");
        // Give the close frames a moment to leave; peers time out otherwise.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not stop the server from serving the other centres.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            shared.emit(ServerEvent::HandshakeFailed {
                remote,
                alert: tls_alert(&e),
                reason: e.to_string(),
            });
            return;
        }
    };
    // The verifier accepted the chain; the id comes from the certificate, never from a message.
    let center = match connection_center(&connection) {
        Ok(c) => c,
        Err(e) => {
            connection.close(VarInt::from_u32(close::REFUSED), e.to_string().as_bytes());
            shared.emit(ServerEvent::HandshakeFailed {
                remote,
                alert: None,
                reason: e.to_string(),
            });
            return;
        }
    };
    let budget = ByteBudget::new(shared.config.connection_budget);
    let timeout = shared.config.hello_timeout;
    let hello = tokio::time::timeout(timeout, async {
        let (send, mut recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let msg = read_message(&mut recv, &shared.limits, &budget).await;
        Ok::<_, String>((send, recv, msg))
    })
    .await;
    let (mut send, mut recv, msg) = match hello {
        Ok(Ok(x)) => x,
        Ok(Err(reason)) => {
            shared.emit(ServerEvent::Disconnected { center, reason });
            return;
        }
        Err(_) => {
            let reason = format!("no Hello within {} s", timeout.as_secs());
            connection.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
            shared.emit(ServerEvent::Disconnected { center, reason });
            return;
        }
    };
    let admitted = match msg {
        Ok(Message::Hello(hello)) => {
            admit(&shared.config.enrolment, &center, &hello).map_err(|r| (r.code(), r.to_string()))
        }
        Ok(other) => Err((
            ErrorCode::Unexpected,
            format!("expected Hello, got {}", other.kind()),
        )),
        Err(ProtocolError::UnsupportedVersion { got, supported }) => Err((
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {got} is not supported; this server speaks version {supported}"
            ),
        )),
        Err(e) => Err((ErrorCode::Malformed, format!("bad Hello: {e}"))),
    };
    let welcome = match admitted {
        Ok(w) => w,
        Err((code, reason)) => {
            let _ = write_message(
                &mut send,
                &Message::error(code, reason.clone()),
                &shared.limits,
            )
            .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(ERROR_LINGER, send.stopped()).await;
            connection.close(VarInt::from_u32(close::REFUSED), reason.as_bytes());
            shared.emit(ServerEvent::Refused {
                remote,
                center,
                code,
                reason,
            });
            return;
        }
    };
    let role = welcome.role;
    if let Err(e) = write_message(&mut send, &Message::Welcome(welcome), &shared.limits).await {
        shared.emit(ServerEvent::Disconnected {
            center,
            reason: format!("cannot send Welcome: {e}"),
        });
        return;
    }
    let previous = lock(&shared.peers).insert(
        center.clone(),
        Admitted {
            connection: connection.clone(),
        },
    );
    if let Some(old) = previous {
        old.connection.close(
            VarInt::from_u32(close::SUPERSEDED),
            b"a newer connection of this centre took over",
        );
    }
    shared.emit(ServerEvent::Admitted {
        remote,
        center: center.clone(),
        role,
    });

    // Until rounds exist, the only message a centre may send after Welcome is an Error (it aborts).
    let reason = tokio::select! {
        msg = read_message(&mut recv, &shared.limits, &budget) => match msg {
            Ok(Message::Error(e)) => format!("centre aborted: {:?}: {}", e.code, e.message),
            Ok(other) => {
                let reason = format!("unexpected {} on the control stream", other.kind());
                connection.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
                reason
            }
            // The client finished its side of the control stream; the connection may live on.
            Err(ProtocolError::Closed) => connection.closed().await.to_string(),
            Err(e) => match connection.close_reason() {
                Some(closed) => closed.to_string(),
                None => {
                    let reason = e.to_string();
                    connection.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
                    reason
                }
            },
        },
        e = connection.closed() => e.to_string(),
    };
    {
        let mut peers = lock(&shared.peers);
        if peers
            .get(&center)
            .is_some_and(|p| p.connection.stable_id() == connection.stable_id())
        {
            peers.remove(&center);
        }
    }
    shared.emit(ServerEvent::Disconnected { center, reason });
}
