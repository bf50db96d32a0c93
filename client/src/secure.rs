//! A node's side of a secure sum: the task arrives after the sum's Begin; the node answers with its keys,
//! its sealed shares, its masked answer, its signature over the survivors and its shares for unmasking, each
//! step checked by [`fedslm_secagg::Participant`]. The work (training, evaluation, placement sums) runs
//! meanwhile on the trainer's thread; its answer never leaves the node unmasked.

use std::sync::{Arc, Mutex};

use fedslm_certs::Signer;
use fedslm_protocol::io::{read_message, write_message};
use fedslm_protocol::secure::{Secure, SecureBegin};
use fedslm_protocol::text::escape_peer;
use fedslm_protocol::{ErrorCode, Message, ProtocolError};
use fedslm_secagg::layout::{placement_vector, EvalLayout, FitLayout};
use fedslm_secagg::{Federation, Participant, SecureError};
use fedslm_transport::{RecvHalf, SendHalf};

use crate::node::{error_text, on_worker, read_verdict, LocalTrainer, NodeEvent};
use crate::{lost, ClientConfig, ClientError, Session};

/// What a node signs with and checks against: its certificate's key and the federation's CA.
pub struct Identity {
    signer: Signer,
    federation: Federation,
}

impl Identity {
    /// The node's TLS key and certificate, and the CA, from its configuration.
    pub fn load(config: &ClientConfig) -> Result<Identity, String> {
        let signer = Signer::from_files(&config.tls.cert, &config.tls.key)
            .map_err(|e| format!("cannot sign for secure aggregation: {e}"))?;
        let federation = Federation::from_file(&config.tls.ca).map_err(|e| e.to_string())?;
        Ok(Identity { signer, federation })
    }
}

/// What a node needs for its part in secure sums: its identity (where it loaded) and its site's policy.
pub struct Site {
    pub(crate) identity: Option<Identity>,
    pub(crate) policy: crate::policy::Policy,
}

impl Site {
    /// The node's identity and policy from its configuration; an identity that does not load leaves the node
    /// refusing secure sums, saying why.
    pub fn load(config: &ClientConfig) -> Site {
        let identity = match Identity::load(config) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(error = %e, "secure aggregation unavailable: this node will refuse secure sums");
                None
            }
        };
        Site {
            identity,
            policy: config.privacy.clone(),
        }
    }
}

/// Why a step failed: the server is told, and the node leaves the sum.
enum Stop {
    /// Tell the server this, with this code.
    Refuse(ErrorCode, String),
    /// The stream or the connection failed.
    Stream(ProtocolError),
}

impl From<SecureError> for Stop {
    fn from(e: SecureError) -> Stop {
        Stop::Refuse(ErrorCode::SecureAggregation, e.to_string())
    }
}

/// What a task's work gives the sum: its vector, what it trained (round, examples, loss) where it did, and the
/// figure the site releases in the clear (an evaluation's own AUC), where its policy lets it.
struct Answer {
    vector: Vec<f64>,
    trained: Option<(u32, u64, f64)>,
    own_auc: Option<f64>,
}

/// The work, on the trainer's thread.
type Work = tokio::task::JoinHandle<Result<Answer, (ErrorCode, String)>>;

/// One secure task's stream, after its Begin: the task, then the sum's steps.
pub(crate) async fn task<T: LocalTrainer>(
    session: &Session,
    mut send: SendHalf,
    mut recv: RecvHalf,
    begin: SecureBegin,
    site: &Site,
    trainer: &Arc<Mutex<T>>,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<(), ClientError> {
    let task = match read_message(&mut recv, &session.limits, &session.budget).await {
        Ok(m) => m,
        Err(e) => return stream_failed(session, e, 0, on_event).await,
    };
    let (round, work) = start(session, task, &begin, &site.policy, trainer);
    let outcome = match &site.identity {
        None => Err(Stop::Refuse(
            ErrorCode::SecureAggregation,
            "this node cannot sign for secure aggregation (its key or CA did not load)".into(),
        )),
        Some(id) => converse(session, &mut send, &mut recv, begin, id, work, on_event).await,
    };
    match outcome {
        Ok(()) => read_verdict(session, &mut recv, round, true, on_event).await,
        Err(Stop::Refuse(code, reason)) => {
            tracing::error!(round, %reason, "leaving the secure sum");
            let msg = Message::error(code, reason);
            let _ = write_message(&mut send, &msg, &session.limits).await;
            send.finish().await;
            Ok(())
        }
        Err(Stop::Stream(e)) => stream_failed(session, e, round, on_event).await,
    }
}

/// Starts the task's work on the trainer's thread: its round and the handle to its vector.
fn start<T: LocalTrainer>(
    session: &Session,
    task: Message,
    begin: &SecureBegin,
    policy: &crate::policy::Policy,
    trainer: &Arc<Mutex<T>>,
) -> (u32, Work) {
    let release_own_auc = policy.release_own_auc;
    let run_id = session.welcome.run_id.clone();
    let norm_bound = begin.norm_bound;
    let trainer = trainer.clone();
    let round = match &task {
        Message::FitTask(f) => f.round,
        Message::EvaluateTask(e) => e.round,
        _ => 0,
    };
    let work = tokio::spawn(async move {
        match task {
            Message::FitTask(fit) => {
                let layout = FitLayout::of(&fit).map_err(secure_refusal)?;
                on_worker(&trainer, "training", move |t| {
                    let result = t
                        .fit(&run_id, &fit)
                        .map_err(|e| (T::code(&e), error_text(&e)))?;
                    let vector = layout
                        .vector(&result, &fit.weights, norm_bound)
                        .map_err(secure_refusal)?;
                    Ok(Answer {
                        vector,
                        trained: Some((fit.round, result.examples, result.train_loss)),
                        own_auc: None,
                    })
                })
                .await
            }
            Message::EvaluateTask(eval) => {
                let layout = EvalLayout {
                    bins: eval.histogram_bins,
                };
                on_worker(&trainer, "evaluation", move |t| {
                    let report = t
                        .evaluate(&run_id, &eval)
                        .map_err(|e| (T::code(&e), error_text(&e)))?;
                    let own: fedslm_metrics::ScoreHistograms = (&report.histogram).into();
                    Ok(Answer {
                        vector: layout.vector(&report).map_err(secure_refusal)?,
                        trained: None,
                        own_auc: release_own_auc
                            .then(|| own.delong().ok().map(|e| e.auc))
                            .flatten(),
                    })
                })
                .await
            }
            Message::PlacementTask(p) => {
                on_worker(&trainer, "placement", move |t| {
                    let report = t
                        .placements(&p)
                        .map_err(|e| (T::code(&e), error_text(&e)))?;
                    Ok(Answer {
                        vector: placement_vector(&report),
                        trained: None,
                        own_auc: None,
                    })
                })
                .await
            }
            other => Err((
                ErrorCode::Unexpected,
                format!(
                    "a secure sum's task must be a FitTask, EvaluateTask or PlacementTask, not {}",
                    other.kind()
                ),
            )),
        }
    });
    (round, work)
}

fn secure_refusal(e: SecureError) -> (ErrorCode, String) {
    (ErrorCode::SecureAggregation, e.to_string())
}

/// The sum's steps, in order.
async fn converse(
    session: &Session,
    send: &mut SendHalf,
    recv: &mut RecvHalf,
    begin: SecureBegin,
    id: &Identity,
    work: Work,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<(), Stop> {
    let me = session.welcome.center.clone();
    let run = session.welcome.run_id.clone();
    let (mut p, keys) = Participant::begin(&run, me, begin, id.federation.clone(), &id.signer)?;
    step(session, send, keys).await?;
    let roster = next(session, recv, "Roster", |m| match m {
        Secure::Roster(x) => Some(x),
        _ => None,
    })
    .await?;
    let shares = p.roster(roster)?;
    step(session, send, shares).await?;
    let delivered = next(session, recv, "Delivered", |m| match m {
        Secure::Delivered(x) => Some(x),
        _ => None,
    })
    .await?;
    p.delivered(delivered)?;
    let Answer {
        vector,
        trained,
        own_auc,
    } = work
        .await
        .map_err(|e| Stop::Refuse(ErrorCode::Internal, format!("the work stopped: {e}")))?
        .map_err(|(code, reason)| Stop::Refuse(code, reason))?;
    if let Some((round, examples, loss)) = trained {
        on_event(NodeEvent::Trained {
            round,
            examples,
            loss,
        });
    }
    let masked = p.mask(&vector, own_auc)?;
    drop(vector);
    step(session, send, masked).await?;
    let survivors = next(session, recv, "Survivors", |m| match m {
        Secure::Survivors(x) => Some(x),
        _ => None,
    })
    .await?;
    let signed = p.survivors(survivors, &id.signer)?;
    step(session, send, signed).await?;
    let signatures = next(session, recv, "Unmask", |m| match m {
        Secure::Unmask(x) => Some(x),
        _ => None,
    })
    .await?;
    let reveal = p.unmask(signatures)?;
    step(session, send, reveal).await?;
    send.finish().await;
    Ok(())
}

async fn step(session: &Session, send: &mut SendHalf, msg: Secure) -> Result<(), Stop> {
    let msg = Message::Secure(msg);
    crate::keep_copy(session.record.as_deref(), &msg, &session.limits);
    write_message(send, &msg, &session.limits)
        .await
        .map_err(Stop::Stream)
}

/// The server's next step, which must be `expected`: `pick` takes its content out, if it is that step.
async fn next<T>(
    session: &Session,
    recv: &mut RecvHalf,
    expected: &'static str,
    pick: fn(Secure) -> Option<T>,
) -> Result<T, Stop> {
    match read_message(recv, &session.limits, &session.budget).await {
        Ok(Message::Secure(m)) => {
            let got = m.name();
            pick(m).ok_or_else(|| SecureError::Step { expected, got }.into())
        }
        Ok(Message::Error(e)) => Err(Stop::Refuse(
            ErrorCode::Unexpected,
            format!("the server ended the sum: {}", escape_peer(&e.message)),
        )),
        Ok(other) => Err(Stop::Refuse(
            ErrorCode::Unexpected,
            format!("expected {expected}, got {}", other.kind()),
        )),
        Err(e) => Err(Stop::Stream(e)),
    }
}

async fn stream_failed(
    session: &Session,
    e: ProtocolError,
    round: u32,
    on_event: &mut impl FnMut(NodeEvent),
) -> Result<(), ClientError> {
    if session.link.close_reason().is_some() {
        return Err(lost(&session.server, &session.link, e).await);
    }
    tracing::warn!(round, %e, "the server dropped the secure sum's task");
    on_event(NodeEvent::Void { round });
    Ok(())
}
