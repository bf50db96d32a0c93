//! A centre's status query (`fedslm client --status`): a `StatusRequest` instead of a Hello, answered on the
//! control stream from the store and closed. It is never admitted, so it replaces no node's connection.

use std::net::SocketAddr;

use fedslm_protocol::io::write_message;
use fedslm_protocol::{close, CenterId, Message, StatusReport, StatusRequest};
use fedslm_transport::{Link, SendHalf};

use super::{ServerEvent, Shared, ERROR_LINGER};
use crate::admission::admit_status;
use crate::audit::AuditEvent;
use crate::store::center_status;

pub(super) async fn answer(
    shared: &Shared,
    connection: &Link,
    mut send: SendHalf,
    remote: SocketAddr,
    center: CenterId,
    request: StatusRequest,
) {
    let reply = match admit_status(&shared.config.enrolment, &center, &request) {
        Err(refusal) => {
            let (code, reason) = (refusal.code(), refusal.to_string());
            shared.emit(ServerEvent::Refused {
                remote,
                center,
                code,
                reason: reason.clone(),
            });
            Message::error(code, reason)
        }
        Ok(()) => {
            shared.audit(AuditEvent::StatusAsked {
                center: center.to_string(),
                remote: remote.to_string(),
            });
            tracing::info!(%center, %remote, "status asked");
            Message::StatusReport(report(shared, &center).await)
        }
    };
    let _ = write_message(&mut send, &reply, &shared.limits).await;
    send.finish().await;
    let _ = tokio::time::timeout(ERROR_LINGER, send.stopped()).await;
    connection.close(close::DONE, b"status sent");
}

/// The run as the store holds it now, and `center`'s part in it.
async fn report(shared: &Shared, center: &CenterId) -> StatusReport {
    let store = shared.store.get().cloned();
    let center = center.to_string();
    let read = tokio::task::spawn_blocking(move || {
        let (meta, rounds) = match &store {
            Some(store) => (
                store.meta().ok().flatten(),
                store.rounds().unwrap_or_default(),
            ),
            None => (None, Vec::new()),
        };
        center_status(meta.as_ref(), &rounds, &center)
    })
    .await;
    read.unwrap_or_else(|_| center_status(None, &[], ""))
}
