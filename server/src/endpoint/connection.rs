//! One connection: the handshake's outcome, the centre from its certificate, Hello and admission, then the
//! control stream until the run's Finish or the connection's end. Tasks travel on streams the server opens.
//! Both transports end their handshake here and share everything after it ([`serve`]).

use std::net::SocketAddr;
use std::sync::Arc;

use fedslm_certs::{peer_center, tls_alert};
use fedslm_protocol::io::{read_expected, write_message, Expect};
use fedslm_protocol::{
    close, ByteBudget, ErrorCode, Message, MessageKind, ProtocolError, SampleCounts,
};
use fedslm_transport::{tcp, Link};
use tokio::sync::mpsc;

use super::strangers::Slot;
use super::{
    lock, Admitted, ServerEvent, Shared, CONTROL_FRAME_WITHIN, ERROR_LINGER, FINISH_LINGER,
};
use crate::admission::admit;
use crate::round::Input;

/// After Welcome, a centre may send only an Error on its control stream (it aborts), within the time a control
/// frame has once its header is in.
const AFTER_WELCOME: Expect<'static> =
    Expect::only(&[MessageKind::Error]).within(CONTROL_FRAME_WITHIN);

/// A QUIC connection attempt that passed the screening: its handshake, then [`serve`].
pub(super) async fn serve_quic(shared: Arc<Shared>, incoming: quinn::Incoming, slot: Slot) {
    let remote = incoming.remote_address();
    // The handshake holds its slot in the limits until it ends; one that does not end in time is dropped
    // (and its connection closed).
    let within = shared.config.hello_timeout;
    let handshake = tokio::time::timeout(within, incoming).await;
    drop(slot);
    let handshake = handshake.map(|h| h.map_err(|e| (tls_alert(&e), e.to_string())));
    if let Some(connection) = handshake_done(&shared, remote, within, handshake) {
        serve(shared, Link::quic(connection, None), remote).await
    }
}

/// A TCP connection that passed the screening: its TLS handshake (the same configuration and verifier as
/// QUIC's, within the same time), then [`serve`].
pub(super) async fn serve_tcp(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tcp::Acceptor,
    slot: Slot,
) {
    let within = shared.config.hello_timeout;
    let handshake = tokio::time::timeout(within, tcp::accept(stream, &acceptor)).await;
    drop(slot);
    let handshake = handshake.map(|h| h.map_err(|f| (f.alert, f.reason)));
    if let Some(link) = handshake_done(&shared, remote, within, handshake) {
        serve(shared, link, remote).await
    }
}

/// A handshake's outcome within `within`: its connection, or the failure (its alert and why, or the
/// timeout) emitted.
fn handshake_done<C>(
    shared: &Shared,
    remote: SocketAddr,
    within: std::time::Duration,
    handshake: Result<Result<C, (Option<u8>, String)>, tokio::time::error::Elapsed>,
) -> Option<C> {
    let (alert, reason) = match handshake {
        Ok(Ok(connection)) => return Some(connection),
        Ok(Err(failure)) => failure,
        Err(_) => (None, format!("no handshake within {} s", within.as_secs())),
    };
    shared.emit(ServerEvent::HandshakeFailed {
        remote,
        alert,
        reason,
    });
    None
}

/// An established connection, over either transport: identity, Hello, admission, the control stream.
async fn serve(shared: Arc<Shared>, connection: Link, remote: SocketAddr) {
    // The verifier accepted the chain; the id comes from the certificate, never from a message.
    let center = match peer_center(&connection.peer_chain()) {
        Ok(c) => c,
        Err(e) => {
            connection.close(close::REFUSED, e.to_string().as_bytes());
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
        // Before its Hello, a peer may send a Hello (or a status request instead) and nothing else (at most
        // the control frames' 64 KiB).
        let expect = Expect::only(&[MessageKind::Hello, MessageKind::StatusRequest]);
        let msg = read_expected(&mut recv, &shared.limits, &budget, expect).await;
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
            connection.close(close::PROTOCOL, reason.as_bytes());
            shared.emit(ServerEvent::Disconnected { center, reason });
            return;
        }
    };
    let msg = match msg {
        Ok(Message::StatusRequest(request)) => {
            return super::status::answer(&shared, &connection, send, remote, center, request).await
        }
        other => other,
    };
    let mut declared = SampleCounts::default();
    let mut policy_hash = [0; 32];
    let admitted = match msg {
        Ok(Message::Hello(hello)) => {
            declared = hello.counts;
            policy_hash = hello.policy_hash;
            admit(&shared.config.enrolment, &center, &hello).map_err(|r| (r.code(), r.to_string()))
        }
        Ok(other) => Err((
            ErrorCode::Unexpected,
            format!("expected Hello, got {}", other.kind()),
        )),
        Err(e @ ProtocolError::UnexpectedFrame { .. }) => {
            Err((ErrorCode::Unexpected, e.to_string()))
        }
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
            send.finish().await;
            let _ = tokio::time::timeout(ERROR_LINGER, send.stopped()).await;
            connection.close(close::REFUSED, reason.as_bytes());
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
    let (finish_tx, mut finish_rx) = mpsc::channel(1);
    let transport = connection.transport();
    let previous = lock(&shared.peers).insert(
        center.clone(),
        Admitted {
            connection: connection.clone(),
            budget: budget.clone(),
            finish: finish_tx.clone(),
            declared,
        },
    );
    shared.peers_changed();
    // Joined after the run ended (a restarted server with nothing left to do): told at once.
    let over = lock(&shared.finished).clone();
    if let Some(finish) = over {
        if finish_tx.try_send(finish).is_ok() {
            lock(&shared.told).insert(center.clone());
            shared.peers_changed();
        }
    }
    if let Some(old) = previous {
        // The older connection is told why; its node tries again after its backoff (a stolen key shows as
        // connections taking turns, each audited).
        let previous = old.connection.remote_address();
        let why = format!("a newer connection of this centre (from {remote}) took over");
        old.connection.close(close::SUPERSEDED, why.as_bytes());
        shared.emit(ServerEvent::Superseded {
            center: center.clone(),
            previous,
            remote,
        });
    }
    shared.emit(ServerEvent::Admitted {
        remote,
        center: center.clone(),
        role,
        transport,
        policy_hash,
    });
    let connection_id = connection.id();
    shared.tell(Input::Connected {
        center: center.clone(),
        connection: connection_id,
        declared,
    });

    // Tasks travel on streams the server opens; the only message a centre may send on its control stream
    // after Welcome is an Error (it aborts).
    let reason = tokio::select! {
        Some(finish) = finish_rx.recv() => {
            let reason = finish.reason.clone();
            if write_message(&mut send, &Message::Finish(finish), &shared.limits).await.is_ok() {
                send.finish().await;
                // The centre closes once it has read Finish.
                let _ = tokio::time::timeout(FINISH_LINGER, connection.closed()).await;
            }
            format!("run finished: {reason}")
        }
        msg = read_expected(&mut recv, &shared.limits, &budget, AFTER_WELCOME) => match msg {
            Ok(Message::Error(e)) => format!("centre aborted: {:?}: {}", e.code, e.message),
            Ok(other) => {
                let reason = format!("unexpected {} on the control stream", other.kind());
                connection.close(close::PROTOCOL, reason.as_bytes());
                reason
            }
            // The client finished its side of the control stream; the connection may live on.
            Err(ProtocolError::Closed) => connection.closed().await.to_string(),
            Err(e) => match connection.close_reason() {
                Some(closed) => closed.to_string(),
                None => {
                    let reason = e.to_string();
                    connection.close(close::PROTOCOL, reason.as_bytes());
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
            .is_some_and(|p| p.connection.id() == connection.id())
        {
            peers.remove(&center);
        }
    }
    shared.peers_changed();
    let (received, sent) = connection.bytes();
    shared.metrics.connection_closed(received, sent);
    shared.tell(Input::Disconnected {
        center: center.clone(),
        connection: connection_id,
    });
    shared.emit(ServerEvent::Disconnected { center, reason });
}
