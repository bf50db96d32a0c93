//! One task's exchange on its own stream: the task out, the answer in, the verdict back.

use std::sync::Arc;

use fedslm_protocol::io::{read_message, write_message};
use fedslm_protocol::{ByteBudget, CenterId, ErrorCode, Message};
use quinn::{Connection, VarInt};
use tokio::sync::{oneshot, Semaphore};

use super::{Envelope, Shared, ERROR_LINGER, TASK_CANCELLED};
use crate::round::{Input, TaskId};

pub(super) fn bytes_of(frame: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(frame)
}

pub(super) struct TaskExchange {
    pub(super) shared: Arc<Shared>,
    pub(super) connection: Connection,
    pub(super) budget: ByteBudget,
    /// The encoded task, one allocation shared by every centre's stream.
    pub(super) frame: bytes::Bytes,
    pub(super) center: CenterId,
    pub(super) task: TaskId,
    pub(super) results: Arc<Semaphore>,
    pub(super) cancelled: oneshot::Receiver<()>,
}

/// One task on a fresh stream: send the task, read the answer (a fit result, an evaluation report or
/// placement sums), hand it to the coordinator, tell the centre the verdict. A cancelled task's stream is reset.
pub(super) async fn task_exchange(x: TaskExchange) {
    let TaskExchange {
        shared,
        connection,
        budget,
        frame,
        center,
        task,
        results,
        mut cancelled,
    } = x;
    let (mut send, mut recv) = match connection.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            shared.tell(Input::TaskFailed {
                center,
                task,
                reason: format!("cannot open a task stream: {e}"),
            });
            return;
        }
    };
    let work = async {
        // The shared frame itself, not a copy, waits in each stream's send buffer.
        send.write_chunk(frame)
            .await
            .map_err(|e| format!("cannot send the task: {e}"))?;
        // Held until the coordinator has folded the update in (or refused it): bounds memory.
        let permit = results.acquire().await.map_err(|e| e.to_string())?;
        let reply = read_message(&mut recv, &shared.limits, &budget).await;
        let input = match reply {
            Ok(Message::FitResult(result)) => Input::FitAnswered {
                center: center.clone(),
                task,
                result,
            },
            Ok(Message::EvalReport(report)) => Input::EvalAnswered {
                center: center.clone(),
                task,
                report,
            },
            Ok(Message::PlacementReport(report)) => Input::PlacementAnswered {
                center: center.clone(),
                task,
                report,
            },
            Ok(Message::Error(e)) => {
                return Err(format!(
                    "the centre could not do the task ({:?}): {}",
                    e.code, e.message
                ))
            }
            Ok(other) => {
                return Err(format!(
                    "expected FitResult, EvalReport or PlacementReport, got {}",
                    other.kind()
                ))
            }
            Err(e) => return Err(format!("no answer: {e}")),
        };
        let (verdict, decided) = oneshot::channel();
        let _ = shared.inputs.send(Envelope {
            input,
            verdict: Some(verdict),
        });
        let verdict = decided.await.map_err(|_| "the run ended".to_string())?;
        drop(permit);
        if let Err(refusal) = verdict {
            let msg = Message::error(ErrorCode::UpdateRefused, refusal.to_string());
            let _ = write_message(&mut send, &msg, &shared.limits).await;
        }
        let _ = send.finish();
        let _ = tokio::time::timeout(ERROR_LINGER, send.stopped()).await;
        Ok::<(), String>(())
    };
    let outcome = tokio::select! {
        outcome = work => Some(outcome),
        // A dropped sender (the verdict is in) is not a cancellation.
        Ok(()) = &mut cancelled => None,
    };
    match outcome {
        Some(Ok(())) => {}
        Some(Err(reason)) => shared.tell(Input::TaskFailed {
            center,
            task,
            reason,
        }),
        None => {
            let _ = send.reset(VarInt::from_u32(TASK_CANCELLED));
            let _ = recv.stop(VarInt::from_u32(TASK_CANCELLED));
        }
    }
}
