//! The round machine's driver: inputs and the clock in, each action carried out by a method of its own. A
//! verdict goes to the task it is about (by task id); a commit or an evaluation is stored before the machine
//! hears of it, and the machine announces only what it heard was stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fedslm_protocol::secure::{Secure, SecureBegin};
use fedslm_protocol::{codec, CenterId, Finish, Message, Weights};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::exchange::{bytes_of, secure_exchange, task_exchange, Answer, TaskExchange};
use super::{lock, tell_finish, CheckpointWriter, Envelope, ServerEvent, Shared, Verdict};
use crate::aggregate::UpdateRefusal;
use crate::audit::AuditEvent;
use crate::evaluation::Evaluation;
use crate::failpoint;
use crate::round::RoundSettings;
use crate::round::{Action, Coordinator, Input, Outcome, PlacementAnswer, RoundRecord, TaskId};
use crate::store::{RunState, Store, StoredRound};

/// Answers read and held at once, once they have begun to come: the rest wait in QUIC's flow control, so the
/// server's memory stays about the global model, its f64 accumulators and this many updates, however many
/// centres answer. A centre that has not begun its answer holds no permit. One: a second answer read while
/// the first is folded in saved 0.13 s of a 10-centre ResNet-18 round (1.58 against 1.71 s) for 43 MiB more
/// at the peak (259 against 216 MiB; BENCHMARKS.md).
pub(super) const RESULTS_IN_FLIGHT: usize = 1;

/// Where a run is made durable: the store, and the writer of each round's model file.
pub(super) struct Durable {
    pub(super) store: Arc<Store>,
    pub(super) checkpoint: Arc<Mutex<CheckpointWriter>>,
}

pub(super) struct Driver {
    shared: Arc<Shared>,
    machine: Coordinator,
    inputs: mpsc::UnboundedReceiver<Envelope>,
    /// `None` for the paired tests' pass, which stores nothing.
    durable: Option<Durable>,
    results: Arc<Semaphore>,
    /// Each task's switch to reset its stream.
    cancels: HashMap<TaskId, oneshot::Sender<()>>,
    /// Where the verdict on each answered task goes.
    verdicts: HashMap<TaskId, oneshot::Sender<Verdict>>,
    /// Each task's round, for the audit log.
    rounds_of: HashMap<TaskId, u32>,
    /// Tasks of a secure sum not yet sent: the sum's encoded Begin, and its length.
    secure_begins: HashMap<TaskId, (bytes::Bytes, u64)>,
    /// Where each secure task's next messages go.
    outboxes: HashMap<TaskId, mpsc::UnboundedSender<bytes::Bytes>>,
}

impl Driver {
    pub(super) fn new(
        shared: Arc<Shared>,
        machine: Coordinator,
        inputs: mpsc::UnboundedReceiver<Envelope>,
        durable: Option<Durable>,
    ) -> Driver {
        Driver {
            shared,
            machine,
            inputs,
            durable,
            results: Arc::new(Semaphore::new(RESULTS_IN_FLIGHT)),
            cancels: HashMap::new(),
            verdicts: HashMap::new(),
            rounds_of: HashMap::new(),
            secure_begins: HashMap::new(),
            outboxes: HashMap::new(),
        }
    }

    /// Runs the machine to its end.
    pub(super) async fn run(mut self) -> Ended {
        self.connect_admitted();
        loop {
            while let Some(action) = self.machine.poll_action() {
                if let Some(ended) = self.carry_out(action).await {
                    return ended;
                }
            }
            if let Some(outcome) = self.next_input().await {
                return Ended::Run(outcome);
            }
        }
    }

    async fn carry_out(&mut self, action: Action) -> Option<Ended> {
        match action {
            Action::SendFit { task, to } => {
                self.send(task.round, &Message::FitTask((*task).clone()), to)
            }
            Action::SendEvaluate { task, to } => {
                self.send(task.round, &Message::EvaluateTask((*task).clone()), to)
            }
            Action::SendPlacement { task, to } => {
                self.send(0, &Message::PlacementTask((*task).clone()), to)
            }
            Action::BeginSecure { begin, tasks } => self.begin_secure(&begin, tasks),
            Action::SendSecure(messages) => self.send_secure(messages),
            Action::Accept { center, task } => self.accept(center, task),
            Action::Refuse {
                center,
                task,
                refusal,
            } => self.refuse(center, task, refusal),
            Action::Cancel { center, task } => self.cancel(center, task),
            Action::CommitRound { record, weights } => self.commit_round(record, weights).await,
            Action::AnnounceRound(record) => self.announce_round(record),
            Action::StoreEvaluation(evaluation) => self.store_evaluation(evaluation).await,
            Action::AnnounceEvaluation(evaluation) => {
                self.shared.emit(ServerEvent::Evaluated(evaluation))
            }
            Action::Finish(outcome) => return Some(Ended::Run(self.finish(outcome).await)),
            Action::FinishPlacements(answers) => {
                let answered = answers.iter().filter(|a| a.is_ok()).count();
                tracing::info!(answered, tasks = answers.len(), "second pass done");
                self.tell_finish("paired comparisons done".into());
                return Some(Ended::Placed(answers));
            }
        }
        None
    }

    /// Tells the machine of the centres connected before it began.
    fn connect_admitted(&mut self) {
        let already: Vec<Input> = lock(&self.shared.peers)
            .iter()
            .map(|(c, p)| Input::Connected {
                center: c.clone(),
                connection: p.connection.id(),
                declared: p.declared,
            })
            .collect();
        for input in already {
            self.machine.handle(input, Instant::now());
        }
    }

    /// The next input (its verdict's way back kept by task id), or the clock.
    async fn next_input(&mut self) -> Option<Outcome> {
        let timeout = self.machine.poll_timeout();
        tokio::select! {
            envelope = self.inputs.recv() => {
                let Some(Envelope { input, verdict }) = envelope else {
                    return Some(Outcome::Failed {
                        rounds: self.machine.committed(),
                        reason: "server stopped".into(),
                    });
                };
                if let Input::TaskFailed { center, task, reason } = &input {
                    if let Some(round) = self.rounds_of.get(task) {
                        self.shared.audit(AuditEvent::TaskDropped {
                            round: *round,
                            center: center.to_string(),
                            task: *task,
                            reason: reason.clone(),
                        });
                    }
                }
                // A step of a secure sum has no verdict of its own: its sender is dropped once the step is
                // taken (a masked input folded in), which lets its reader go on to the next frame.
                let mut taken = None;
                match (verdict, answered_task(&input)) {
                    (Some(verdict), Some(task)) => {
                        self.verdicts.insert(task, verdict);
                    }
                    (verdict, None) => taken = verdict,
                    _ => {}
                }
                self.machine.handle(input, Instant::now());
                drop(taken);
            }
            () = sleep_until(timeout) => self.machine.handle_timeout(Instant::now()),
        }
        None
    }

    /// Sends one encoded task to each centre on a fresh stream; a centre that is gone fails its task at once.
    fn send(&mut self, round: u32, message: &Message, to: Vec<(CenterId, TaskId)>) {
        let shared = &self.shared;
        // The model's tensors are the frame's chunks: the global model is not copied for its tasks.
        let frame = match codec::encode_frame(message, &shared.limits) {
            Ok(f) => f,
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
        let bins = match message {
            Message::EvaluateTask(t) => t.histogram_bins,
            _ => 0,
        };
        let answer = Answer::to(message.kind(), frame.len() as u64, bins);
        for (center, task) in to {
            self.rounds_of.insert(task, round);
            let (cancel, cancelled) = oneshot::channel();
            self.cancels.insert(task, cancel);
            let peer = lock(&shared.peers)
                .get(&center)
                .map(|p| (p.connection.clone(), p.budget.clone()));
            let Some((connection, budget)) = peer else {
                shared.tell(Input::TaskFailed {
                    center,
                    task,
                    reason: "not connected".into(),
                });
                continue;
            };
            shared.audit(AuditEvent::TaskSent {
                round,
                center: center.to_string(),
                task,
            });
            let exchange = TaskExchange {
                shared: shared.clone(),
                connection,
                budget,
                frame: frame.clone(),
                center,
                task,
                answer,
                results: self.results.clone(),
                cancelled,
            };
            match self.secure_begins.remove(&task) {
                Some((begin, length)) => {
                    let (outbox, inbox) = mpsc::unbounded_channel();
                    let (verdict, decided) = oneshot::channel();
                    self.outboxes.insert(task, outbox);
                    self.verdicts.insert(task, verdict);
                    tokio::spawn(secure_exchange(exchange, begin, length, inbox, decided));
                }
                None => {
                    tokio::spawn(task_exchange(exchange));
                }
            }
        }
    }

    /// Notes that `tasks` are a secure sum's: each is sent after the sum's Begin.
    fn begin_secure(&mut self, begin: &SecureBegin, tasks: Vec<TaskId>) {
        let msg = Message::Secure(Secure::Begin(begin.clone()));
        match codec::encode(&msg, &self.shared.limits) {
            Ok(frame) => {
                let frame = bytes_of(frame);
                for t in tasks {
                    self.secure_begins.insert(t, (frame.clone(), begin.length));
                }
            }
            // The tasks then go without it and the centres refuse them: the sum fails by name.
            Err(e) => tracing::error!(error = %e, "cannot encode a secure sum's Begin"),
        }
    }

    /// Each message to its task's stream.
    fn send_secure(&mut self, messages: Vec<(CenterId, TaskId, Secure)>) {
        for (center, task, msg) in messages {
            let step = msg.name();
            let frame = codec::encode(&Message::Secure(msg), &self.shared.limits);
            let sent = match (frame, self.outboxes.get(&task)) {
                (Ok(frame), Some(outbox)) => outbox
                    .send(bytes_of(frame))
                    .map_err(|_| "its stream is closed".to_string()),
                (Err(e), _) => Err(format!("cannot encode {step}: {e}")),
                (_, None) => Err("its stream is closed".to_string()),
            };
            if let Err(reason) = sent {
                self.shared.tell(Input::TaskFailed {
                    center,
                    task,
                    reason: format!("secure sum, {step}: {reason}"),
                });
            }
        }
    }

    fn round_of(&self, task: TaskId) -> u32 {
        self.rounds_of.get(&task).copied().unwrap_or_default()
    }

    fn accept(&mut self, center: CenterId, task: TaskId) {
        self.cancels.remove(&task);
        self.outboxes.remove(&task);
        let round = self.round_of(task);
        self.shared.audit(AuditEvent::UpdateAccepted {
            round,
            center: center.to_string(),
            task,
        });
        failpoint::hit(failpoint::AGGREGATING, round);
        if let Some(v) = self.verdicts.remove(&task) {
            let _ = v.send(Ok(()));
        }
    }

    fn refuse(&mut self, center: CenterId, task: TaskId, refusal: UpdateRefusal) {
        self.cancels.remove(&task);
        self.outboxes.remove(&task);
        self.shared.metrics.refused("update", refusal.kind());
        self.shared.audit(AuditEvent::UpdateRefused {
            round: self.round_of(task),
            center: center.to_string(),
            task,
            reason: refusal.to_string(),
        });
        if let Some(v) = self.verdicts.remove(&task) {
            let _ = v.send(Err(refusal));
        }
    }

    fn cancel(&mut self, center: CenterId, task: TaskId) {
        self.shared.audit(AuditEvent::TaskDropped {
            round: self.round_of(task),
            center: center.to_string(),
            task,
            reason: "no answer before the round closed".into(),
        });
        self.verdicts.remove(&task);
        self.outboxes.remove(&task);
        if let Some(c) = self.cancels.remove(&task) {
            let _ = c.send(());
        }
    }

    /// Writes the round's checkpoint, names it by its hash and commits the round's record; tells the machine
    /// whether that worked.
    async fn commit_round(&mut self, record: RoundRecord, weights: Arc<Weights>) {
        let round = record.round;
        let Some(durable) = &self.durable else {
            return self.machine.handle(
                Input::StoreFailed {
                    reason: format!("round {round}: this pass has no store"),
                },
                Instant::now(),
            );
        };
        let store = durable.store.clone();
        let writer = durable.checkpoint.clone();
        let started = Instant::now();
        let committed = tokio::task::spawn_blocking(move || {
            let pending = store.pending_checkpoint(record.round);
            (*lock(&writer))(&record, &weights, &pending).map_err(|e| e.to_string())?;
            let hash = store.put_checkpoint(&pending).map_err(|e| e.to_string())?;
            failpoint::hit(failpoint::CHECKPOINT_WRITTEN, record.round);
            store
                .commit_round(&StoredRound::new(&record, hash))
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the commit stopped: {e}")));
        self.shared.metrics.commit_took(started.elapsed());
        let input = match committed {
            Ok(()) => Input::RoundStored { round },
            Err(reason) => Input::StoreFailed {
                reason: format!("cannot commit round {round}: {reason}"),
            },
        };
        self.machine.handle(input, Instant::now());
    }

    /// The event that announces a round carries no model, so that the event channel keeps none alive.
    fn announce_round(&mut self, record: RoundRecord) {
        let round = record.round;
        self.shared.emit(ServerEvent::RoundCommitted(record));
        failpoint::hit(failpoint::BETWEEN_ROUNDS, round);
    }

    /// Stores an evaluation with its round; tells the machine whether that worked.
    async fn store_evaluation(&mut self, evaluation: Evaluation) {
        let round = evaluation.round;
        let stored = match &self.durable {
            None => Err("this pass has no store".to_string()),
            Some(durable) => {
                let store = durable.store.clone();
                let record = evaluation.record();
                tokio::task::spawn_blocking(move || store.record_evaluation(round, record))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
        };
        let input = match stored {
            Ok(()) => Input::EvaluationStored { round },
            Err(reason) => Input::StoreFailed {
                reason: format!("cannot store round {round}'s evaluation: {reason}"),
            },
        };
        self.machine.handle(input, Instant::now());
    }

    /// The run's end, durable before any centre is told; then Finish to every centre, every pending task
    /// dropped, the event emitted.
    async fn finish(&mut self, outcome: Outcome) -> Outcome {
        if let Some(durable) = &self.durable {
            record_end(&durable.store, &outcome, self.machine.settings()).await;
        }
        self.tell_finish(match &outcome {
            Outcome::Completed { rounds, .. } => format!("completed {rounds} rounds"),
            Outcome::Failed { reason, .. } => format!("failed: {reason}"),
        });
        self.shared.emit(ServerEvent::Finished(outcome.clone()));
        outcome
    }

    /// Finish to every centre, every pending task dropped.
    fn tell_finish(&mut self, reason: String) {
        let finish = Finish {
            run_id: self.shared.config.enrolment.run_id.clone(),
            rounds_completed: self.machine.committed(),
            reason,
        };
        tell_finish(&self.shared, finish);
        for (_, c) in self.cancels.drain() {
            let _ = c.send(());
        }
    }
}

/// How the machine ended: a run's outcome, or the paired tests' answers.
pub(super) enum Ended {
    Run(Outcome),
    Placed(Vec<PlacementAnswer>),
}

/// The task an answer is about.
fn answered_task(input: &Input) -> Option<TaskId> {
    match input {
        Input::FitAnswered { task, .. }
        | Input::EvalAnswered { task, .. }
        | Input::PlacementAnswered { task, .. } => Some(*task),
        _ => None,
    }
}

/// Records how the run ended.
async fn record_end(store: &Arc<Store>, outcome: &Outcome, settings: &RoundSettings) {
    let (state, reason) = match outcome {
        Outcome::Completed { rounds, .. } => {
            (RunState::Completed, format!("completed {rounds} rounds"))
        }
        Outcome::Failed { reason, .. } => (RunState::Failed, reason.clone()),
    };
    let store = store.clone();
    let settings = settings.clone();
    let done = tokio::task::spawn_blocking(move || {
        let privacy = crate::privacy::released(&settings, &store.rounds()?);
        store.finish(state, &reason, &privacy)
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot record the run's end"),
        Err(e) => tracing::error!(error = %e, "cannot record the run's end"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
