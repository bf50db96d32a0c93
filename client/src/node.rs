//! A node's life in a run: connect, take the server's tasks one at a time on the streams it opens, answer
//! them, and end on Finish. A lost connection is retried with exponential backoff and jitter; a refusal is
//! not (it would be refused again).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedslm_protocol::io::{read_message, write_message};
use fedslm_protocol::text::escape_peer;
use fedslm_protocol::{
    close, ErrorCode, EvalReport, EvaluateTask, Finish, FitResult, FitTask, Message,
    PlacementReport, PlacementTask, ProtocolError, SampleCounts,
};
use fedslm_protocol::{codec, Limits};
use fedslm_transport::{RecvHalf, SendHalf};

use crate::{connect, lost, ClientConfig, ClientError, Session};

/// What a node does with its data when the server asks. Runs on a blocking thread.
pub trait LocalTrainer: Send + 'static {
    /// Why a task cannot be carried out; its text is told to the server in an `Error` frame.
    type Error: std::error::Error + Send + 'static;

    /// Trains from the task's weights (or computes the clinical model's Newton statistics) for run `run_id`
    /// and returns only weights, a count and a loss.
    fn fit(&mut self, run_id: &str, task: &FitTask) -> Result<FitResult, Self::Error>;

    /// Evaluates the task's weights on local patients and returns only counts, a loss and per-class score
    /// histograms. A node that takes part in paired comparisons keeps the scores, by `run_id`, for
    /// [`LocalTrainer::placements`].
    fn evaluate(&mut self, run_id: &str, task: &EvaluateTask) -> Result<EvalReport, Self::Error>;

    /// The second pass of a paired DeLong test: placement sums of the kept scores of the runs named.
    fn placements(&mut self, task: &PlacementTask) -> Result<PlacementReport, Self::Error>;

    /// The code the server is told with `error`'s text (a site policy's refusal has its own).
    fn code(error: &Self::Error) -> ErrorCode {
        let _ = error;
        ErrorCode::Internal
    }
}

/// A task a trainer does not take (a benchmark's echoing centre does not evaluate, say): its text is what the
/// node declines to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this node does not {0}")]
pub struct Declined(pub &'static str);

/// Reconnection: waits grow from `initial` by doubling to `max`, each drawn uniformly from half to one and a
/// half times the nominal wait, so that centres cut off together do not come back together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Consecutive failed connection attempts before giving up; `None`: never give up.
    pub attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempts: None,
        }
    }
}

impl Backoff {
    /// The wait before attempt `n` (1 = the first retry), with `unit` in [0, 1) drawn for the jitter.
    pub fn wait(&self, n: u32, unit: f64) -> Duration {
        let nominal = self
            .initial
            .saturating_mul(2u32.saturating_pow(n.saturating_sub(1)))
            .min(self.max);
        nominal.mul_f64(0.5 + unit.clamp(0.0, 1.0))
    }
}

/// What a node reports while it runs, for logs, progress and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    Admitted {
        run_id: String,
    },
    Trained {
        round: u32,
        examples: u64,
        loss: f64,
    },
    Accepted {
        round: u32,
    },
    Refused {
        round: u32,
        reason: String,
    },
    /// The server dropped the task (its round closed first).
    Void {
        round: u32,
    },
    Reconnecting {
        after: Duration,
        reason: String,
    },
}

/// Whether retrying can help: a refusal or a bad certificate will be the same next time.
fn is_final(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { .. } | ClientError::TlsAlert { .. } | ClientError::Certs(_) => true,
        ClientError::Closed { code, .. } => {
            *code == u64::from(close::REFUSED) || *code == u64::from(close::REVOKED)
        }
        _ => false,
    }
}

/// Whether another connection with this centre's certificate took this one's place at the server.
fn is_superseded(e: &ClientError) -> bool {
    matches!(e, ClientError::Closed { code, .. } if *code == u64::from(close::SUPERSEDED))
}

/// Runs the node until the server's Finish (or a refusal, or `backoff` gives up).
pub async fn run<T: LocalTrainer>(
    config: &ClientConfig,
    counts: SampleCounts,
    trainer: T,
    backoff: Backoff,
    mut on_event: impl FnMut(NodeEvent),
) -> Result<Finish, ClientError> {
    let trainer = Arc::new(Mutex::new(trainer));
    // Loaded once: the key that signs this node's part in secure sums, the CA it checks the others' with,
    // and the site's policy.
    let site = crate::secure::Site::load(config);
    let mut failures = 0u32;
    // Consecutive sessions ended by another connection with this certificate: the node comes back, never
    // faster than its backoff, so that a moment's impersonation does not remove it and two nodes sharing a
    // key take turns slowly (each turn is in the server's audit).
    let mut superseded = 0u32;
    loop {
        let error = match connect(config, counts).await {
            Ok(session) => {
                failures = 0;
                on_event(NodeEvent::Admitted {
                    run_id: session.welcome.run_id.clone(),
                });
                match serve(session, &trainer, &site, &mut on_event).await {
                    Ok(finish) => return Ok(finish),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if is_final(&error) {
            return Err(error);
        }
        if is_superseded(&error) {
            superseded += 1;
            let after = backoff.wait(superseded, jitter());
            tracing::warn!(
                %error,
                ?after,
                "another node with this centre's certificate connected; if it is not yours, revoke the \
                 certificate. Reconnecting"
            );
            on_event(NodeEvent::Reconnecting {
                after,
                reason: error.to_string(),
            });
            tokio::time::sleep(after).await;
            continue;
        }
        superseded = 0;
        failures += 1;
        if backoff.attempts.is_some_and(|max| failures > max) {
            return Err(error);
        }
        let after = backoff.wait(failures, jitter());
        tracing::warn!(%error, ?after, "connection lost; reconnecting");
        on_event(NodeEvent::Reconnecting {
            after,
            reason: error.to_string(),
        });
        tokio::time::sleep(after).await;
    }
}

/// A number in [0, 1) that differs between processes and calls (std's randomly keyed hasher).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn serve<T: LocalTrainer>(
    mut session: Session,
    trainer: &Arc<Mutex<T>>,
    site: &crate::secure::Site,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<Finish, ClientError> {
    loop {
        tokio::select! {
            msg = read_message(&mut session.control_recv, &session.limits, &session.budget) => {
                let result = match msg {
                    Ok(Message::Finish(f)) => Ok(f),
                    Ok(Message::Error(e)) => Err(ClientError::Refused {
                        server: session.server.clone(),
                        code: e.code,
                        message: escape_peer(&e.message),
                    }),
                    Ok(other) => Err(ClientError::Unexpected {
                        server: session.server.clone(),
                        expected: "Finish",
                        got: other.kind().to_string(),
                    }),
                    Err(e) => Err(lost(&session.server, &session.link, e).await),
                };
                if result.is_ok() {
                    session.close(close::DONE, "done").await;
                }
                return result;
            }
            stream = session.link.accept_bi() => {
                let (send, recv) = stream.map_err(|e| crate::connection_error(&session.server, e))?;
                task(&session, send, recv, trainer, site, on_event).await?;
            }
        }
    }
}

/// An evaluation's or a placement's answer (or why there is none): no verdict follows.
async fn answer_once(
    session: &Session,
    mut send: SendHalf,
    round: u32,
    outcome: Result<Message, (ErrorCode, String)>,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<(), ClientError> {
    let answer = outcome.unwrap_or_else(|(code, reason)| {
        tracing::error!(round, %reason, "cannot evaluate");
        Message::error(code, reason)
    });
    crate::keep_copy(session.record.as_deref(), &answer, &session.limits);
    if let Err(e) = send_frame(&mut send, &answer, &session.limits).await {
        if session.link.close_reason().is_some() {
            return Err(lost(&session.server, &session.link, e).await);
        }
        on_event(NodeEvent::Void { round });
    }
    send.finish().await;
    Ok(())
}

/// One task stream: the task, the answer, the server's verdict.
async fn task<T: LocalTrainer>(
    session: &Session,
    mut send: SendHalf,
    mut recv: RecvHalf,
    trainer: &Arc<Mutex<T>>,
    site: &crate::secure::Site,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<(), ClientError> {
    let server = &session.server;
    let msg = match read_message(&mut recv, &session.limits, &session.budget).await {
        Ok(m) => m,
        // A task reset before it arrived whole is void; the connection may be fine.
        Err(ProtocolError::Io(e)) if session.link.close_reason().is_none() => {
            tracing::warn!(%e, "task stream failed");
            return Ok(());
        }
        Err(e) => return Err(lost(server, &session.link, e).await),
    };
    if let Message::Secure(fedslm_protocol::secure::Secure::Begin(begin)) = msg {
        return crate::secure::task(session, send, recv, begin, site, trainer, on_event).await;
    }
    if site.policy.require_secure_aggregation {
        let refusal = crate::policy::PolicyRefusal::NeedsSecureAggregation;
        tracing::warn!(%refusal, "task refused");
        let answer = Message::error(ErrorCode::PolicyRefused, refusal.to_string());
        let _ = send_frame(&mut send, &answer, &session.limits).await;
        send.finish().await;
        return Ok(());
    }
    let fit = match msg {
        Message::FitTask(fit) => fit,
        Message::EvaluateTask(eval) => {
            let run_id = session.welcome.run_id.clone();
            let round = eval.round;
            let outcome = on_worker(trainer, "evaluation", move |t| {
                t.evaluate(&run_id, &eval)
                    .map(Message::EvalReport)
                    .map_err(|e| (T::code(&e), error_text(&e)))
            })
            .await;
            return answer_once(session, send, round, outcome, on_event).await;
        }
        Message::PlacementTask(placement) => {
            let outcome = on_worker(trainer, "placement", move |t| {
                t.placements(&placement)
                    .map(Message::PlacementReport)
                    .map_err(|e| (T::code(&e), error_text(&e)))
            })
            .await;
            return answer_once(session, send, 0, outcome, on_event).await;
        }
        other => {
            return Err(ClientError::Unexpected {
                server: server.clone(),
                expected: "FitTask, EvaluateTask or PlacementTask",
                got: other.kind().to_string(),
            })
        }
    };
    let round = fit.round;
    tracing::info!(round, epochs = fit.local_epochs, "training");
    let run_id = session.welcome.run_id.clone();
    let outcome = on_worker(trainer, "training", move |t| {
        t.fit(&run_id, &fit)
            .map_err(|e| (T::code(&e), error_text(&e)))
    })
    .await;
    let answer = match outcome {
        Ok(result) => {
            on_event(NodeEvent::Trained {
                round,
                examples: result.examples,
                loss: result.train_loss,
            });
            Message::FitResult(result)
        }
        Err((code, reason)) => {
            tracing::error!(round, %reason, "cannot train");
            Message::error(code, reason)
        }
    };
    crate::keep_copy(session.record.as_deref(), &answer, &session.limits);
    if let Err(e) = write_message(&mut send, &answer, &session.limits).await {
        if session.link.close_reason().is_some() {
            return Err(lost(server, &session.link, e).await);
        }
        tracing::warn!(round, %e, "the server dropped the task: its round closed first");
        on_event(NodeEvent::Void { round });
        return Ok(());
    }
    send.finish().await;
    let answered = matches!(answer, Message::FitResult(_));
    read_verdict(session, &mut recv, round, answered, on_event).await
}

/// The server's verdict on the answer to a task of `round`: its stream ends (taken: `Accepted` where
/// `answered`), or an `UpdateRefused` error says why not; a stream reset means the task was dropped.
pub(crate) async fn read_verdict(
    session: &Session,
    recv: &mut RecvHalf,
    round: u32,
    answered: bool,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<(), ClientError> {
    match read_message(recv, &session.limits, &session.budget).await {
        Ok(Message::Error(e)) if e.code == ErrorCode::UpdateRefused => {
            let reason = escape_peer(&e.message);
            tracing::warn!(round, %reason, "the server refused this centre's update");
            on_event(NodeEvent::Refused { round, reason });
        }
        Err(ProtocolError::Closed) => {
            if answered {
                on_event(NodeEvent::Accepted { round });
            }
        }
        Ok(other) => {
            tracing::warn!(round, kind = %other.kind(), "unexpected message after the answer")
        }
        Err(e) => {
            if session.link.close_reason().is_some() {
                return Err(lost(&session.server, &session.link, e).await);
            }
            tracing::warn!(round, %e, "no verdict on the update");
            on_event(NodeEvent::Void { round });
        }
    }
    Ok(())
}

/// An error and its causes, as one line for the server: "outer: inner: innermost".
pub(crate) fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let inner = s.to_string();
        if !text.ends_with(&inner) {
            text = format!("{text}: {inner}");
        }
        source = s.source();
    }
    text
}

/// Runs `work` on the trainer on a blocking thread: training takes seconds to hours of CPU.
pub(crate) async fn on_worker<T: LocalTrainer, R: Send + 'static>(
    trainer: &Arc<Mutex<T>>,
    what: &str,
    work: impl FnOnce(&mut T) -> Result<R, (ErrorCode, String)> + Send + 'static,
) -> Result<R, (ErrorCode, String)> {
    let worker = trainer.clone();
    tokio::task::spawn_blocking(move || {
        let mut t = worker.lock().unwrap_or_else(|p| p.into_inner());
        work(&mut t)
    })
    .await
    .unwrap_or_else(|e| Err((ErrorCode::Internal, format!("{what} stopped: {e}"))))
}

/// Writes `msg` as one frame handed to QUIC in chunks: a model's tensors are sent from their own buffers, not
/// copied into a frame or into the stream's buffer.
async fn send_frame(
    send: &mut SendHalf,
    msg: &Message,
    limits: &Limits,
) -> Result<(), ProtocolError> {
    let frame = codec::encode_frame(msg, limits)?;
    send.write_chunks(frame.chunks())
        .await
        .map_err(ProtocolError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_around_it() {
        let b = Backoff::default();
        assert_eq!(b.wait(1, 0.5), Duration::from_secs(1));
        assert_eq!(b.wait(3, 0.5), Duration::from_secs(4));
        assert_eq!(b.wait(30, 0.5), Duration::from_secs(60));
        assert_eq!(b.wait(3, 0.0), Duration::from_secs(2));
        assert_eq!(
            b.wait(3, 0.999_999),
            Duration::from_secs(4).mul_f64(1.499_999)
        );
        let draws: Vec<f64> = (0..50).map(|_| jitter()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]), "jitter varies");
    }
}
