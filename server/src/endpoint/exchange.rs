//! One task's exchange on its own stream: the task out, the answer in, the verdict back.

use std::sync::Arc;

use fedslm_protocol::io::{read_header, read_payload, write_message, Expect};
use fedslm_protocol::{ByteBudget, CenterId, ErrorCode, Message, MessageKind};
use fedslm_transport::Link;
use tokio::sync::{oneshot, Semaphore};

use super::{Envelope, Shared, Verdict, ERROR_LINGER, TASK_CANCELLED};
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

/// A centre's receive window opened for the answer the server reads (it holds a reading permit), wide enough
/// for the answer's bytes up to [`fedslm_certs::SERVER_READING_WINDOW`], and closed again once the rest of
/// the answer fits in the window already granted: what QUIC has granted cannot be taken back, so closing it
/// after the answer would leave the centre a wide window for its next one, and fifty centres' next answers
/// would wait in the server's memory (ResNet-18 among 50 centres: 316 MiB, against 249 without widening).
struct WindowOpen<'a, R> {
    inner: &'a mut R,
    link: Option<Link>,
    read: u64,
    close_at: u64,
}

impl<'a, R> WindowOpen<'a, R> {
    /// Reads the `len` bytes of a payload from `inner`, the window widened for them.
    fn around(inner: &'a mut R, link: &Link, len: u64) -> WindowOpen<'a, R> {
        let (link, close_at) = match reading_window(len) {
            Some((window, close_at)) => {
                link.set_receive_window(window);
                (Some(link.clone()), close_at)
            }
            None => (None, 0),
        };
        WindowOpen {
            inner,
            link,
            read: 0,
            close_at,
        }
    }

    fn close(&mut self) {
        if let Some(link) = self.link.take() {
            link.set_receive_window(fedslm_certs::SERVER_IDLE_WINDOW);
        }
    }
}

/// For a payload of `len` bytes larger than the idle window: the window to open (the payload's size, at most
/// the reading window) and after how many bytes read to close it again (when the rest is within the window).
fn reading_window(len: u64) -> Option<(u32, u64)> {
    let idle = fedslm_certs::SERVER_IDLE_WINDOW;
    let reading = fedslm_certs::SERVER_READING_WINDOW;
    if len <= u64::from(idle) {
        return None;
    }
    let window = u32::try_from(len).map_or(reading, |l| l.min(reading));
    Some((window, len - u64::from(window)))
}

impl<R> Drop for WindowOpen<'_, R> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WindowOpen<'_, R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        if this.read >= this.close_at {
            this.close();
        }
        polled
    }
}

/// A fresh stream for `task`, or its failure told to the coordinator.
async fn open_stream(
    shared: &Shared,
    connection: &Link,
    center: &CenterId,
    task: TaskId,
) -> Option<(fedslm_transport::SendHalf, fedslm_transport::RecvHalf)> {
    match connection.open_bi().await {
        Ok(s) => Some(s),
        Err(e) => {
            shared.tell(Input::TaskFailed {
                center: center.clone(),
                task,
                reason: format!("cannot open a task stream: {e}"),
            });
            None
        }
    }
}

pub(super) struct TaskExchange {
    pub(super) shared: Arc<Shared>,
    pub(super) connection: Link,
    pub(super) budget: ByteBudget,
    /// The encoded task, its chunks shared by every centre's stream (and its tensors with the global model).
    pub(super) frame: fedslm_protocol::codec::Frame,
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
    let Some((mut send, mut recv)) = open_stream(&shared, &connection, &center, task).await else {
        return;
    };
    let work = async {
        // The shared frame itself, not a copy, waits in each stream's send buffer.
        send.write_chunks(frame.chunks())
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
        let mut windowed = WindowOpen::around(&mut recv, &connection, header.payload_len);
        let reply = read_payload(
            &mut windowed,
            header,
            &shared.limits,
            &budget,
            expect.reserved(),
        )
        .await;
        drop(windowed);
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
        tell_verdict(&mut send, verdict, &shared).await;
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

/// Tells the centre the verdict on its answer (nothing more if taken, why if refused), ends the stream and
/// waits a moment for the centre to read it.
async fn tell_verdict(send: &mut fedslm_transport::SendHalf, verdict: Verdict, shared: &Shared) {
    if let Err(refusal) = verdict {
        let msg = Message::error(ErrorCode::UpdateRefused, refusal.to_string());
        let _ = write_message(send, &msg, &shared.limits).await;
    }
    send.finish().await;
    let _ = tokio::time::timeout(ERROR_LINGER, send.stopped()).await;
}

/// The frames a centre may send in a secure sum of `length` elements: each step's message, or an Error.
fn secure_answer(length: u64) -> Answer {
    const SLACK: u64 = 64 * 1024;
    Answer {
        kinds: &[MessageKind::Secure, MessageKind::Error],
        // A masked input is the largest: 16 bytes an element; a roster of certificates is not sent by centres.
        max_payload: (16 * length + SLACK).max(512 * 1024),
    }
}

/// A task of a secure sum on its own stream: the Begin, the task, then the conversation: each frame from the
/// centre goes to the coordinator as [`Input::Secure`], each message of the coordinator's for this task is
/// written as it comes, until the verdict (the sum is over) or the task is cancelled.
pub(super) async fn secure_exchange(
    x: TaskExchange,
    begin: bytes::Bytes,
    length: u64,
    mut outbox: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
    verdict: oneshot::Receiver<Verdict>,
) {
    let TaskExchange {
        shared,
        connection,
        budget,
        frame,
        center,
        task,
        answer: _,
        results,
        mut cancelled,
    } = x;
    let Some((mut send, recv)) = open_stream(&shared, &connection, &center, task).await else {
        return;
    };
    // The centre's frames are read on their own task, so that a frame half read is never dropped for a write.
    let reader = tokio::spawn(read_secure(
        SecureReading {
            shared: shared.clone(),
            connection: connection.clone(),
            budget,
            center: center.clone(),
            task,
            answer: secure_answer(length),
            results,
        },
        recv,
    ));
    let work = async {
        send.write_chunk(begin)
            .await
            .map_err(|e| format!("cannot send the sum's Begin: {e}"))?;
        send.write_chunks(frame.chunks())
            .await
            .map_err(|e| format!("cannot send the task: {e}"))?;
        // Every step the coordinator queued for this task is written before its verdict: the outbox closes
        // when the task is settled, and only then is the verdict read.
        while let Some(frame) = outbox.recv().await {
            send.write_chunk(frame)
                .await
                .map_err(|e| format!("cannot send a step of the sum: {e}"))?;
        }
        match verdict.await {
            Ok(verdict) => tell_verdict(&mut send, verdict, &shared).await,
            // No verdict: the task was dropped (its sum closed without it) or the run ended.
            Err(_) => send.reset(TASK_CANCELLED),
        }
        Ok::<(), String>(())
    };
    let outcome = tokio::select! {
        outcome = work => Some(outcome),
        Ok(()) = &mut cancelled => None,
    };
    reader.abort();
    match outcome {
        Some(Ok(())) => {}
        Some(Err(reason)) => shared.tell(Input::TaskFailed {
            center,
            task,
            reason,
        }),
        None => send.reset(TASK_CANCELLED),
    }
}

/// A step this large is a masked input.
const LARGE_STEP: u64 = 1024 * 1024;

/// Whose frames a secure task's reader reads, how large they may be, and the permits to read them.
struct SecureReading {
    shared: Arc<Shared>,
    connection: Link,
    budget: ByteBudget,
    center: CenterId,
    task: TaskId,
    answer: Answer,
    results: Arc<Semaphore>,
}

/// Reads a secure task's frames until the stream ends: each step to the coordinator, an Error as the task's
/// failure.
async fn read_secure(reading: SecureReading, mut recv: fedslm_transport::RecvHalf) {
    let SecureReading {
        shared,
        connection,
        budget,
        center,
        task,
        answer,
        results,
    } = reading;
    let expect = answer.expect();
    loop {
        let read = async {
            let header = read_header(&mut recv, &shared.limits, expect).await?;
            // A permit per frame read and handed over, and every permit for a masked input (four times the
            // f32 model, in the ring of 2^128): one at a time is read and folded into the sum.
            let permits = if header.payload_len > LARGE_STEP {
                super::driver::RESULTS_IN_FLIGHT as u32
            } else {
                1
            };
            let permit = results.acquire_many(permits).await.ok();
            let msg = if permit.is_some() {
                let mut windowed = WindowOpen::around(&mut recv, &connection, header.payload_len);
                let reserved = expect.reserved();
                read_payload(&mut windowed, header, &shared.limits, &budget, reserved).await
            } else {
                read_payload(&mut recv, header, &shared.limits, &budget, expect).await
            };
            Ok::<_, fedslm_protocol::ProtocolError>((msg?, permit))
        };
        let reason = match read.await {
            Ok((Message::Secure(message), permit)) => {
                let (handled, done) = oneshot::channel();
                let _ = shared.inputs.send(Envelope {
                    input: Input::Secure {
                        center: center.clone(),
                        task,
                        message,
                    },
                    verdict: Some(handled),
                });
                // The driver drops the sender once the machine has taken the step: a permit then covers a
                // masked input until it is folded in.
                let _ = done.await;
                drop(permit);
                continue;
            }
            Ok((Message::Error(e), _)) => format!(
                "the centre could not take part ({:?}): {}",
                e.code, e.message
            ),
            Ok((other, _)) => format!("expected a step of the secure sum, got {}", other.kind()),
            Err(fedslm_protocol::ProtocolError::Closed) => return,
            Err(e) => format!("the secure sum's stream failed: {e}"),
        };
        shared.tell(Input::TaskFailed {
            center,
            task,
            reason,
        });
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::reading_window;
    use fedslm_certs::{SERVER_IDLE_WINDOW, SERVER_READING_WINDOW};

    #[test]
    fn a_window_is_opened_for_an_answer_larger_than_the_idle_one_and_closed_before_its_last_window()
    {
        let (idle, reading) = (
            u64::from(SERVER_IDLE_WINDOW),
            u64::from(SERVER_READING_WINDOW),
        );
        assert_eq!(reading_window(100), None);
        assert_eq!(reading_window(idle), None);
        // Smaller than the reading window: exactly its own size, closed at once (all of it is granted).
        assert_eq!(reading_window(idle + 1), Some((SERVER_IDLE_WINDOW + 1, 0)));
        // A model: the reading window, closed when what is left of it fits in what is granted.
        let model = 44_746_500;
        assert_eq!(
            reading_window(model),
            Some((SERVER_READING_WINDOW, model - reading))
        );
        assert_eq!(
            reading_window(u64::MAX),
            Some((SERVER_READING_WINDOW, u64::MAX - reading))
        );
    }
}
