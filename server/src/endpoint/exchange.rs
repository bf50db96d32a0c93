//! One task's exchange on its own stream: the task out, the answer in, the verdict back.

use std::sync::Arc;

use fedslm_protocol::io::{read_header, read_payload, write_message, Expect};
use fedslm_protocol::{ByteBudget, CenterId, ErrorCode, Message, MessageKind};
use fedslm_transport::Link;
use tokio::sync::{oneshot, Semaphore};

use super::{Envelope, Shared, ERROR_LINGER, TASK_CANCELLED};
use crate::round::{Input, TaskId};

pub(super) fn bytes_of(frame: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(frame)
}

/// What may come back on a task's stream, checked from the frame's header: the task's answer or an Error, no
/// larger than the task allows, its payload within a time that grows with its size.
#[derive(Debug, Clone, Copy)]
pub(super) struct Answer {
    pub(super) kinds: &'static [MessageKind],
    pub(super) max_payload: u64,
}

/// The slowest a centre may send its answer once it has begun: the answer's time limit is
/// [`ANSWER_BASE_TIME`] plus one second per this many bytes.
const ANSWER_MIN_RATE: u64 = 1024 * 1024;
const ANSWER_BASE_TIME: u64 = 30;

impl Answer {
    /// The answer to a task of `kind` sent as a frame of `task_frame` bytes: a fit result carries the task's
    /// tensors (of the same shapes and dtypes, or it is refused) and a few fields; an evaluation report two
    /// histograms of the task's bins; placement sums a control frame's size.
    pub(super) fn to(kind: MessageKind, task_frame: u64, bins: u32) -> Answer {
        const SLACK: u64 = 64 * 1024;
        match kind {
            MessageKind::FitTask => Answer {
                kinds: &[MessageKind::FitResult, MessageKind::Error],
                max_payload: task_frame + SLACK,
            },
            MessageKind::EvaluateTask => Answer {
                kinds: &[MessageKind::EvalReport, MessageKind::Error],
                max_payload: 2 * 9 * u64::from(bins) + SLACK,
            },
            _ => Answer {
                kinds: &[MessageKind::PlacementReport, MessageKind::Error],
                max_payload: SLACK,
            },
        }
    }

    fn expect(&self) -> Expect<'static> {
        let secs = ANSWER_BASE_TIME + self.max_payload / ANSWER_MIN_RATE;
        Expect::only(self.kinds)
            .at_most(self.max_payload)
            .within(std::time::Duration::from_secs(secs))
    }
}

pub(super) struct TaskExchange {
    pub(super) shared: Arc<Shared>,
    pub(super) connection: Link,
    pub(super) budget: ByteBudget,
    /// The encoded task, one allocation shared by every centre's stream.
    pub(super) frame: bytes::Bytes,
    pub(super) center: CenterId,
    pub(super) task: TaskId,
    pub(super) answer: Answer,
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
        answer,
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
        // Every centre's answer is awaited at once; one that has begun to come (its header is in, its kind and
        // size allowed) takes a permit, held until the coordinator has folded it in (or refused it). The
        // others wait in QUIC's flow control: memory stays a few answers, and a silent centre holds no
        // permit, so it cannot keep an honest answer unread.
        let expect = answer.expect();
        let header = read_header(&mut recv, &shared.limits, expect)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let permit = results.acquire().await.map_err(|e| e.to_string())?;
        let reply = read_payload(&mut recv, header, &shared.limits, &budget, expect).await;
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
        send.finish().await;
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
            send.reset(TASK_CANCELLED);
            recv.stop(TASK_CANCELLED);
        }
    }
}
