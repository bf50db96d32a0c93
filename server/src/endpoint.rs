//! The QUIC endpoint: accepts connections, identifies each peer by its certificate, runs admission on its
//! Hello and keeps the admitted centres. One task per connection: whatever one peer does, the others are
//! served.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedslm_certs::{
    alert_name, connection_center, quic_server_config, server_config, tls_alert, CertError,
};
use fedslm_protocol::io::{read_message, write_message};
use fedslm_protocol::{
    close, codec, ByteBudget, CenterId, ErrorCode, Finish, Limits, Message, PlacementReport,
    PlacementTask, ProtocolError, Role,
};
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};

use crate::admission::admit;
use crate::aggregate::UpdateRefusal;
use crate::audit::AuditEvent;
use crate::config::ServerConfig;
use crate::evaluation::Evaluation;
use crate::failpoint;
use crate::round::{Action, Coordinator, Input, Outcome, RoundRecord, TaskId};
use crate::store::{RunState, Store, StoredRound};

/// How long a refused peer has to read its Error before the connection is closed.
const ERROR_LINGER: Duration = Duration::from_secs(2);
/// Writes a round's global model as a file at the path given (the store then names it by its hash and records
/// it). Runs on a blocking thread; an error stops the run.
pub type CheckpointWriter =
    Box<dyn FnMut(&RoundRecord, &fedslm_protocol::Weights, &Path) -> Result<(), String> + Send>;

/// Fit results read and held at once: the rest wait in QUIC's flow control, so the server's memory stays
/// about the global model, its f64 accumulators and this many updates, however many centres answer.
const RESULTS_IN_FLIGHT: usize = 2;
/// How long the centres have to take their Finish and close before the server stops.
const FINISH_LINGER: Duration = Duration::from_secs(5);
/// Stream reset code of a task whose round closed without it.
const TASK_CANCELLED: u32 = 1;

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
    /// A round's new global model, with who contributed what.
    RoundCommitted(RoundRecord),
    /// An evaluation round's aggregates, stored with its round.
    Evaluated(Evaluation),
    /// The run is over; the centres were sent Finish.
    Finished(Outcome),
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
    /// Shared by every stream of the connection.
    budget: ByteBudget,
    /// The run's end, for the connection's task to send on the control stream.
    finish: mpsc::Sender<Finish>,
}

/// An input for the coordinator, with where its verdict goes (an update's acceptance or refusal).
struct Envelope {
    input: Input,
    verdict: Option<oneshot::Sender<Result<(), UpdateRefusal>>>,
}

struct Shared {
    config: ServerConfig,
    limits: Limits,
    events: broadcast::Sender<ServerEvent>,
    peers: Mutex<HashMap<CenterId, Admitted>>,
    inputs: mpsc::UnboundedSender<Envelope>,
    /// The run's durable record; every event goes into its audit log.
    store: std::sync::OnceLock<Arc<Store>>,
    /// Once the run is over: the Finish that every centre admitted from then on is sent at once.
    finished: Mutex<Option<Finish>>,
    /// Centres that were sent Finish.
    told: Mutex<BTreeSet<CenterId>>,
}

impl Shared {
    fn tell(&self, input: Input) {
        // The coordinator is gone only when the run is over.
        let _ = self.inputs.send(Envelope {
            input,
            verdict: None,
        });
    }
}

impl Shared {
    fn audit(&self, event: AuditEvent) {
        if let Some(store) = self.store.get() {
            if let Err(e) = store.audit(event) {
                tracing::error!(error = %e, "cannot append to the audit log");
            }
        }
    }

    fn emit(&self, event: ServerEvent) {
        if let Some(entry) = audit_event(&event) {
            self.audit(entry);
        }
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
            ServerEvent::RoundCommitted(r) => {
                tracing::info!(
                    round = r.round,
                    centres = r.contributions.len(),
                    "round committed"
                )
            }
            ServerEvent::Evaluated(e) => {
                tracing::info!(
                    round = e.round,
                    centres = e.centres.len(),
                    "round evaluated"
                )
            }
            ServerEvent::Finished(Outcome::Completed { rounds, .. }) => {
                tracing::info!(rounds, "run completed")
            }
            ServerEvent::Finished(Outcome::Failed { rounds, reason }) => {
                tracing::error!(rounds, %reason, "run failed")
            }
        }
        // No subscriber is fine: events are also logged.
        let _ = self.events.send(event);
    }
}

/// The audit log's entry for a connection event; rounds are audited where the coordinator decides them.
fn audit_event(event: &ServerEvent) -> Option<AuditEvent> {
    Some(match event {
        ServerEvent::HandshakeFailed { remote, reason, .. } => AuditEvent::HandshakeFailed {
            remote: remote.to_string(),
            reason: reason.clone(),
        },
        ServerEvent::Refused {
            remote,
            center,
            reason,
            ..
        } => AuditEvent::CentreRefused {
            center: center.to_string(),
            remote: remote.to_string(),
            reason: reason.clone(),
        },
        ServerEvent::Admitted {
            remote,
            center,
            role,
        } => AuditEvent::CentreJoined {
            center: center.to_string(),
            role: role.name().into(),
            remote: remote.to_string(),
        },
        ServerEvent::Disconnected { center, reason } => AuditEvent::CentreLeft {
            center: center.to_string(),
            reason: reason.clone(),
        },
        ServerEvent::RoundCommitted(_) | ServerEvent::Evaluated(_) | ServerEvent::Finished(_) => {
            return None
        }
    })
}

/// The coordinating server's endpoint.
pub struct Server {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    inputs: Mutex<Option<mpsc::UnboundedReceiver<Envelope>>>,
}

impl Server {
    /// Loads the TLS files and binds the UDP socket. Must be called within a tokio runtime.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let quic = quic_server_config(server_config(&config.tls)?)?;
        let bind_err = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = fedslm_certs::udp_socket(config.listen).map_err(bind_err)?;
        let runtime = quinn::default_runtime().ok_or_else(|| {
            bind_err(std::io::Error::other(
                "no async runtime to drive the endpoint",
            ))
        })?;
        let endpoint = Endpoint::new(
            fedslm_certs::server_endpoint_config(&config.tls)?,
            Some(quic),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let (events, _) = broadcast::channel(1024);
        let (inputs, received) = mpsc::unbounded_channel();
        Ok(Server {
            endpoint,
            shared: Arc::new(Shared {
                config,
                limits: Limits::default(),
                events,
                peers: Mutex::new(HashMap::new()),
                inputs,
                store: std::sync::OnceLock::new(),
                finished: Mutex::new(None),
                told: Mutex::new(BTreeSet::new()),
            }),
            inputs: Mutex::new(Some(received)),
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

    /// Admits centres until `shutdown` completes, then closes every connection. No rounds.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        // Nobody coordinates: the connections' inputs go nowhere.
        drop(lock(&self.inputs).take());
        self.serve_until(shutdown).await;
    }

    /// Runs the federation of `coordinator` until it finishes (the outcome) or `shutdown` completes (`None`).
    /// Each round is committed to `store` (its model written by `checkpoint`) before anything else happens, and
    /// every event goes into the store's audit log. Can be called once per server.
    pub async fn run_rounds(
        &self,
        coordinator: Coordinator,
        store: Arc<Store>,
        checkpoint: CheckpointWriter,
        shutdown: impl Future<Output = ()>,
    ) -> Option<Outcome> {
        let inputs = lock(&self.inputs).take()?;
        let _ = self.shared.store.set(store.clone());
        // A resumed run with nothing left to do: the centres that reconnect are told it is over.
        let already_over = coordinator.is_finished();
        let commit = Arc::new(Mutex::new(checkpoint));
        let (done_tx, done_rx) = oneshot::channel();
        let shared = self.shared.clone();
        let driver = tokio::spawn(async move {
            let outcome = drive(shared, coordinator, inputs, store, commit).await;
            let _ = done_tx.send(outcome.clone());
            outcome
        });
        let mut done = std::pin::pin!(done_rx);
        let outcome = std::sync::Mutex::new(None);
        self.serve_until(async {
            tokio::select! {
                o = &mut done => {
                    if let Ok(o) = o {
                        *lock(&outcome) = Some(o);
                    }
                    // Let the centres take their Finish and close first.
                    let now = tokio::time::Instant::now();
                    let deadline = now + FINISH_LINGER;
                    let grace = now + self.shared.config.run.start_grace;
                    let enrolled: BTreeSet<CenterId> =
                        self.shared.config.enrolment.centers.keys().cloned().collect();
                    loop {
                        let now = tokio::time::Instant::now();
                        let connected = !lock(&self.shared.peers).is_empty();
                        let untold = already_over && *lock(&self.shared.told) != enrolled;
                        if !(connected && now < deadline || untold && now < grace) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                () = shutdown => {}
            }
        })
        .await;
        driver.abort();
        outcome.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// The second pass of paired comparisons (DESIGN.md §3): once every centre named is connected (or
    /// `deadline` has passed), each gets its tasks, each on a fresh stream; the answers come back in the tasks'
    /// order, or why there is none. Then every centre is told the run is over. No rounds, no store: the
    /// comparisons are computed from the answers by [`crate::evaluation::paired_comparison`].
    pub async fn run_placements(
        &self,
        tasks: Vec<(CenterId, PlacementTask)>,
        deadline: Duration,
    ) -> Vec<Result<PlacementReport, String>> {
        drop(lock(&self.inputs).take());
        let shared = self.shared.clone();
        let (done_tx, done_rx) = oneshot::channel();
        let work = tokio::spawn(async move {
            let answers = placements(&shared, tasks, deadline).await;
            let _ = done_tx.send(());
            answers
        });
        self.serve_until(async {
            let _ = done_rx.await;
            let until = tokio::time::Instant::now() + FINISH_LINGER;
            while !lock(&self.shared.peers).is_empty() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        work.await
            .unwrap_or_else(|e| vec![Err(format!("the second pass stopped: {e}"))])
    }

    async fn serve_until(&self, shutdown: impl Future<Output = ()>) {
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

/// The coordinator's loop: inputs and the clock in, actions carried out.
async fn drive(
    shared: Arc<Shared>,
    mut machine: Coordinator,
    mut inputs: mpsc::UnboundedReceiver<Envelope>,
    store: Arc<Store>,
    checkpoint: Arc<Mutex<CheckpointWriter>>,
) -> Outcome {
    let results = Arc::new(Semaphore::new(RESULTS_IN_FLIGHT));
    let mut cancels: HashMap<TaskId, oneshot::Sender<()>> = HashMap::new();
    // Each task's round, for the audit log.
    let mut rounds_of: HashMap<TaskId, u32> = HashMap::new();
    // Centres connected before the run began.
    let already: Vec<(CenterId, u64)> = lock(&shared.peers)
        .iter()
        .map(|(c, p)| (c.clone(), p.connection.stable_id() as u64))
        .collect();
    for (center, connection) in already {
        machine.handle(Input::Connected { center, connection }, Instant::now());
    }
    let mut verdict: Option<oneshot::Sender<Result<(), UpdateRefusal>>> = None;
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                Action::SendFit { task, to } => {
                    let message = Message::FitTask((*task).clone());
                    send_tasks(
                        &shared,
                        &results,
                        &mut cancels,
                        &mut rounds_of,
                        task.round,
                        &message,
                        to,
                    );
                }
                Action::SendEvaluate { task, to } => {
                    let message = Message::EvaluateTask((*task).clone());
                    send_tasks(
                        &shared,
                        &results,
                        &mut cancels,
                        &mut rounds_of,
                        task.round,
                        &message,
                        to,
                    );
                }
                Action::Evaluated(evaluation) => {
                    let store = store.clone();
                    let round = evaluation.round;
                    let record = evaluation.record();
                    let done =
                        tokio::task::spawn_blocking(move || store.record_evaluation(round, record))
                            .await;
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, round, "cannot store the evaluation")
                        }
                        Err(e) => tracing::error!(error = %e, round, "cannot store the evaluation"),
                    }
                    shared.emit(ServerEvent::Evaluated(evaluation));
                }
                Action::Accept { task, center } => {
                    cancels.remove(&task);
                    let round = rounds_of.get(&task).copied().unwrap_or_default();
                    shared.audit(AuditEvent::UpdateAccepted {
                        round,
                        center: center.to_string(),
                        task,
                    });
                    failpoint::hit(failpoint::AGGREGATING, round);
                    if let Some(v) = verdict.take() {
                        let _ = v.send(Ok(()));
                    }
                }
                Action::Refuse {
                    task,
                    refusal,
                    center,
                } => {
                    cancels.remove(&task);
                    shared.audit(AuditEvent::UpdateRefused {
                        round: rounds_of.get(&task).copied().unwrap_or_default(),
                        center: center.to_string(),
                        task,
                        reason: refusal.to_string(),
                    });
                    if let Some(v) = verdict.take() {
                        let _ = v.send(Err(refusal));
                    }
                }
                Action::Cancel { task, center } => {
                    shared.audit(AuditEvent::TaskDropped {
                        round: rounds_of.get(&task).copied().unwrap_or_default(),
                        center: center.to_string(),
                        task,
                        reason: "no answer before the round closed".into(),
                    });
                    if let Some(c) = cancels.remove(&task) {
                        let _ = c.send(());
                    }
                }
                Action::RoundCommitted { record, weights } => {
                    // Committed before anything else (the next round's task) goes out; the event that
                    // announces it carries no model, so that the event channel keeps none alive.
                    let round = record.round;
                    let committed =
                        commit_round(&store, &checkpoint, record.clone(), weights).await;
                    if let Err(reason) = committed {
                        let reason = format!("cannot commit round {round}: {reason}");
                        tracing::error!(%reason);
                        let outcome = Outcome::Failed {
                            rounds: machine.committed().saturating_sub(1),
                            reason,
                        };
                        record_end(&store, &outcome).await;
                        finish_all(
                            &shared,
                            &outcome,
                            machine.committed().saturating_sub(1),
                            &mut cancels,
                        );
                        return outcome;
                    }
                    shared.emit(ServerEvent::RoundCommitted(record));
                    failpoint::hit(failpoint::BETWEEN_ROUNDS, round);
                }
                Action::Finished(outcome) => {
                    record_end(&store, &outcome).await;
                    finish_all(&shared, &outcome, machine.committed(), &mut cancels);
                    return outcome;
                }
            }
        }
        let timeout = machine.poll_timeout();
        tokio::select! {
            envelope = inputs.recv() => {
                let Some(envelope) = envelope else {
                    return Outcome::Failed { rounds: machine.committed(), reason: "server stopped".into() };
                };
                if let Input::TaskFailed { center, task, reason } = &envelope.input {
                    if let Some(round) = rounds_of.get(task) {
                        shared.audit(AuditEvent::TaskDropped {
                            round: *round,
                            center: center.to_string(),
                            task: *task,
                            reason: reason.clone(),
                        });
                    }
                }
                verdict = envelope.verdict;
                machine.handle(envelope.input, Instant::now());
            }
            () = sleep_until(timeout) => machine.handle_timeout(Instant::now()),
        }
    }
}

/// Sends one encoded task to each centre on a fresh stream; a centre that is gone fails its task at once.
fn send_tasks(
    shared: &Arc<Shared>,
    results: &Arc<Semaphore>,
    cancels: &mut HashMap<TaskId, oneshot::Sender<()>>,
    rounds_of: &mut HashMap<TaskId, u32>,
    round: u32,
    message: &Message,
    to: Vec<(CenterId, TaskId)>,
) {
    let frame = match codec::encode(message, &shared.limits) {
        Ok(f) => bytes_of(f),
        Err(e) => {
            let reason = format!("cannot encode round {round}'s {}: {e}", message.kind());
            for (center, task) in to {
                shared.tell(Input::TaskFailed {
                    center,
                    task,
                    reason: reason.clone(),
                });
            }
            return;
        }
    };
    for (center, id) in to {
        rounds_of.insert(id, round);
        let (cancel, cancelled) = oneshot::channel();
        cancels.insert(id, cancel);
        let peer = lock(&shared.peers)
            .get(&center)
            .map(|p| (p.connection.clone(), p.budget.clone()));
        let Some((connection, budget)) = peer else {
            shared.tell(Input::TaskFailed {
                center,
                task: id,
                reason: "not connected".into(),
            });
            continue;
        };
        shared.audit(AuditEvent::TaskSent {
            round,
            center: center.to_string(),
            task: id,
        });
        tokio::spawn(task_exchange(TaskExchange {
            shared: shared.clone(),
            connection,
            budget,
            frame: frame.clone(),
            center,
            task: id,
            results: results.clone(),
            cancelled,
        }));
    }
}

/// Writes the round's checkpoint, names it by its hash and commits the round's record to the store.
async fn commit_round(
    store: &Arc<Store>,
    checkpoint: &Arc<Mutex<CheckpointWriter>>,
    record: RoundRecord,
    weights: Arc<fedslm_protocol::Weights>,
) -> Result<(), String> {
    let store = store.clone();
    let writer = checkpoint.clone();
    tokio::task::spawn_blocking(move || {
        let pending = store.pending_checkpoint(record.round);
        (*lock(&writer))(&record, &weights, &pending)?;
        let hash = store.put_checkpoint(&pending).map_err(|e| e.to_string())?;
        failpoint::hit(failpoint::CHECKPOINT_WRITTEN, record.round);
        store
            .commit_round(&StoredRound::new(&record, hash))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the commit stopped: {e}")))
}

/// The run's end, durable before any centre is told.
async fn record_end(store: &Arc<Store>, outcome: &Outcome) {
    let (state, reason) = match outcome {
        Outcome::Completed { rounds, .. } => {
            (RunState::Completed, format!("completed {rounds} rounds"))
        }
        Outcome::Failed { reason, .. } => (RunState::Failed, reason.clone()),
    };
    let store = store.clone();
    let done = tokio::task::spawn_blocking(move || store.finish(state, &reason)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot record the run's end"),
        Err(e) => tracing::error!(error = %e, "cannot record the run's end"),
    }
}

/// Finish to every connected centre, every pending task dropped, the event emitted.
fn finish_all(
    shared: &Shared,
    outcome: &Outcome,
    rounds_completed: u32,
    cancels: &mut HashMap<TaskId, oneshot::Sender<()>>,
) {
    let finish = Finish {
        run_id: shared.config.enrolment.run_id.clone(),
        rounds_completed,
        reason: match outcome {
            Outcome::Completed { rounds, .. } => format!("completed {rounds} rounds"),
            Outcome::Failed { reason, .. } => format!("failed: {reason}"),
        },
    };
    tell_finish(shared, finish);
    for (_, c) in cancels.drain() {
        let _ = c.send(());
    }
    shared.emit(ServerEvent::Finished(outcome.clone()));
}

/// The run's end to every connected centre, and to any that joins later.
fn tell_finish(shared: &Shared, finish: Finish) {
    *lock(&shared.finished) = Some(finish.clone());
    let peers: Vec<(CenterId, mpsc::Sender<Finish>)> = lock(&shared.peers)
        .iter()
        .map(|(c, p)| (c.clone(), p.finish.clone()))
        .collect();
    for (center, p) in peers {
        if p.try_send(finish.clone()).is_ok() {
            lock(&shared.told).insert(center);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

fn bytes_of(frame: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(frame)
}

struct TaskExchange {
    shared: Arc<Shared>,
    connection: Connection,
    budget: ByteBudget,
    /// The encoded task, one allocation shared by every centre's stream.
    frame: bytes::Bytes,
    center: CenterId,
    task: TaskId,
    results: Arc<Semaphore>,
    cancelled: oneshot::Receiver<()>,
}

/// One task on a fresh stream: send the task, read the result (a fit result or an evaluation report), hand it
/// to the coordinator, tell the centre the verdict. A cancelled task's stream is reset.
async fn task_exchange(x: TaskExchange) {
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
            Ok(Message::Error(e)) => {
                return Err(format!(
                    "the centre could not do the task ({:?}): {}",
                    e.code, e.message
                ))
            }
            Ok(other) => {
                return Err(format!(
                    "expected FitResult or EvalReport, got {}",
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

/// The placement tasks of [`Server::run_placements`], all at once, then Finish to every centre.
async fn placements(
    shared: &Arc<Shared>,
    tasks: Vec<(CenterId, PlacementTask)>,
    deadline: Duration,
) -> Vec<Result<PlacementReport, String>> {
    let until = tokio::time::Instant::now() + deadline;
    let wanted: BTreeSet<CenterId> = tasks.iter().map(|(c, _)| c.clone()).collect();
    while !wanted.iter().all(|c| lock(&shared.peers).contains_key(c))
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exchanges: Vec<_> = tasks
        .into_iter()
        .map(|(center, task)| {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::timeout_at(until, placement_exchange(&shared, &center, task))
                    .await
                    .unwrap_or_else(|_| Err(format!("{center}: no answer before the deadline")))
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(exchanges.len());
    for e in exchanges {
        answers.push(e.await.unwrap_or_else(|e| Err(format!("stopped: {e}"))));
    }
    let finish = Finish {
        run_id: shared.config.enrolment.run_id.clone(),
        rounds_completed: 0,
        reason: "paired comparisons done".into(),
    };
    tell_finish(shared, finish);
    answers
}

async fn placement_exchange(
    shared: &Shared,
    center: &CenterId,
    task: PlacementTask,
) -> Result<PlacementReport, String> {
    let peer = lock(&shared.peers)
        .get(center)
        .map(|p| (p.connection.clone(), p.budget.clone()));
    let Some((connection, budget)) = peer else {
        return Err(format!("{center}: not connected"));
    };
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| format!("{center}: cannot open a task stream: {e}"))?;
    write_message(&mut send, &Message::PlacementTask(task), &shared.limits)
        .await
        .map_err(|e| format!("{center}: cannot send the task: {e}"))?;
    let _ = send.finish();
    match read_message(&mut recv, &shared.limits, &budget).await {
        Ok(Message::PlacementReport(r)) => Ok(r),
        Ok(Message::Error(e)) => Err(format!(
            "{center} could not place its patients: {}",
            e.message
        )),
        Ok(other) => Err(format!(
            "{center}: expected PlacementReport, got {}",
            other.kind()
        )),
        Err(e) => Err(format!("{center}: no answer: {e}")),
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
    let (finish_tx, mut finish_rx) = mpsc::channel(1);
    let previous = lock(&shared.peers).insert(
        center.clone(),
        Admitted {
            connection: connection.clone(),
            budget: budget.clone(),
            finish: finish_tx.clone(),
        },
    );
    // Joined after the run ended (a restarted server with nothing left to do): told at once.
    let over = lock(&shared.finished).clone();
    if let Some(finish) = over {
        if finish_tx.try_send(finish).is_ok() {
            lock(&shared.told).insert(center.clone());
        }
    }
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
    let connection_id = connection.stable_id() as u64;
    shared.tell(Input::Connected {
        center: center.clone(),
        connection: connection_id,
    });

    // Tasks travel on streams the server opens; the only message a centre may send on its control stream
    // after Welcome is an Error (it aborts).
    let reason = tokio::select! {
        Some(finish) = finish_rx.recv() => {
            let reason = finish.reason.clone();
            if write_message(&mut send, &Message::Finish(finish), &shared.limits).await.is_ok() {
                let _ = send.finish();
                // The centre closes once it has read Finish.
                let _ = tokio::time::timeout(FINISH_LINGER, connection.closed()).await;
            }
            format!("run finished: {reason}")
        }
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
    shared.tell(Input::Disconnected {
        center: center.clone(),
        connection: connection_id,
    });
    shared.emit(ServerEvent::Disconnected { center, reason });
}
