//! The round state machine: pure, no IO, no clock of its own (quinn-proto is the model). The endpoint feeds it
//! [`Input`]s and the time, asks it when it next needs the time ([`Coordinator::poll_timeout`]), and carries
//! out the [`Action`]s it queues. Tests drive it with a fake clock through every timeout path.
//!
//! A round starts when every training centre is connected, or `start_grace` after `quorum` of them are: each
//! connected training centre gets the same fit task. It closes when no task is pending (answered, failed, or
//! its centre gone) or at the deadline; with at least `quorum` accepted updates (federated Newton: every
//! training centre, or the sum is not the pooled one) the strategy makes the next global model and the round
//! is committed; with fewer it is tried again, up to `retries` times, and then the run fails saying who did
//! not answer. Validation centres never get a fit task and their updates are refused.
//!
//! Nothing is announced before it is durable: a closed round becomes [`Action::CommitRound`], and the machine
//! waits for [`Input::RoundStored`] before it announces the round or sends the next task; an evaluation
//! likewise ([`Action::StoreEvaluation`], [`Input::EvaluationStored`]). [`Input::StoreFailed`] fails the run.
//!
//! By concern: [`settings`] (the run's settings), [`io`] (inputs, actions and records), [`tasks`] (the one task
//! set every phase uses), `fit` (training rounds and their update checks), `evaluate` (evaluation rounds),
//! `placement` (the paired tests' second pass), `resume` (a stored run going on), and the tests.

mod evaluate;
mod fit;
pub mod io;
mod placement;
mod resume;
mod secure;
pub mod settings;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use fedslm_metrics::NewtonSolver;
use fedslm_protocol::{CenterId, Role, SampleCounts, Weights};

pub(crate) use io::weighted_loss;
pub use io::{
    Action, Committed, Contribution, Input, Outcome, PlacementAnswer, RoundRecord, SecureTotals,
    Unanswered,
};
pub use settings::{
    round_seed, DpSettings, EvaluationSettings, NormBound, RoundSettings, SetupError, Strategy,
};

use crate::aggregate::UpdateRefusal;
use evaluate::{Evaluating, StoringEvaluation};
use fit::{After, Committing, Fitting};
use placement::Placing;
use tasks::TaskSet;

/// Identifies one task sent to one centre.
pub type TaskId = u64;

/// Why a centre's task ended without a taken answer.
#[derive(Debug, Clone, PartialEq)]
enum Gone {
    /// No answer before the deadline.
    Silent,
    /// Its connection closed.
    Disconnected,
    /// It said it cannot do the task, or the task's stream failed.
    Failed(String),
    /// Its answer was refused.
    Refused(String),
}

enum Phase {
    /// Waiting for centres; since when the quorum has been connected.
    Waiting(Option<Instant>),
    Fitting(Box<Fitting>),
    /// A closed round waits for the store to say it is durable.
    Committing(Box<Committing>),
    Evaluating(Box<Evaluating>),
    /// An evaluation waits for the store.
    StoringEvaluation(Box<StoringEvaluation>),
    /// The paired tests' second pass.
    Placing(Box<Placing>),
    Done,
}

impl Phase {
    /// The tasks of a phase that has some out.
    fn tasks_mut(&mut self) -> Option<&mut TaskSet> {
        match self {
            Phase::Fitting(f) => Some(&mut f.tasks),
            Phase::Evaluating(e) => Some(&mut e.tasks),
            Phase::Placing(p) => Some(&mut p.tasks),
            _ => None,
        }
    }

    /// Records, in the phase's own terms, that `center`'s task `task` ended as `gone`.
    fn note(&mut self, task: TaskId, center: &CenterId, gone: Gone) {
        match self {
            Phase::Fitting(f) => f.note(center, gone),
            Phase::Evaluating(e) => e.note(center, gone),
            Phase::Placing(p) => p.note(task, center, gone),
            _ => {}
        }
    }

    /// Records that `center`'s input is in its task's secure sum.
    fn accept_secure(&mut self, task: TaskId, center: &CenterId) {
        match self {
            Phase::Fitting(f) => f.accept_secure(center),
            Phase::Evaluating(e) => e.accept_secure(task, center),
            Phase::Placing(p) => p.accept_secure(task, center),
            _ => {}
        }
    }
}

/// The coordinator of one run.
pub struct Coordinator {
    settings: RoundSettings,
    roles: BTreeMap<CenterId, Role>,
    connected: BTreeMap<CenterId, u64>,
    /// The patients each centre's Hello declared.
    declared: BTreeMap<CenterId, SampleCounts>,
    /// Each centre's example count in the first round it contributed to: its later rounds train on the same
    /// patients.
    examples: BTreeMap<CenterId, u64>,
    global: Arc<Weights>,
    committed: u32,
    retries: u32,
    phase: Phase,
    next_task: TaskId,
    /// Tasks of rounds that have closed start below this.
    first_task_of_round: TaskId,
    newton: Option<NewtonSolver>,
    actions: VecDeque<Action>,
    /// A resumed run whose last round still needs its evaluation: done before anything else.
    evaluation_due: Option<After>,
    /// Since when a run that has begun has been short of its quorum of connected training centres: after a
    /// deadline of that, the round counts as a try that fell short (a run never stalls on centres that are
    /// gone). Before the first round, the server waits for the centres as long as they take.
    short_since: Option<Instant>,
}

impl Coordinator {
    /// The run's round settings.
    pub fn settings(&self) -> &RoundSettings {
        &self.settings
    }

    /// The global model now.
    pub fn global(&self) -> &Arc<Weights> {
        &self.global
    }

    /// Rounds committed (durably) so far.
    pub fn committed(&self) -> u32 {
        self.committed
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Training centres connected now.
    pub fn connected_training(&self) -> usize {
        self.connected
            .keys()
            .filter(|c| self.roles.get(*c) == Some(&Role::Train))
            .count()
    }

    fn training(&self) -> usize {
        self.roles.values().filter(|r| **r == Role::Train).count()
    }

    /// A task id for an update that arrived on a stream the server did not open; it will be refused.
    pub fn unsolicited_task(&mut self) -> TaskId {
        self.new_task()
    }

    fn new_task(&mut self) -> TaskId {
        let id = self.next_task;
        self.next_task += 1;
        id
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the machine next needs [`Coordinator::handle_timeout`].
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let step = self.secure_deadline();
        let phase = match &self.phase {
            Phase::Fitting(f) => Some(f.tasks.deadline),
            Phase::Evaluating(e) => Some(e.tasks.deadline),
            Phase::Placing(p) => Some(p.tasks.deadline),
            Phase::Waiting(grace) => {
                let grace = grace.map(|since| since + self.settings.start_grace);
                let short = self.short_since.map(|since| since + self.settings.deadline);
                grace.into_iter().chain(short).min()
            }
            _ => None,
        };
        phase.into_iter().chain(step).min()
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        if matches!(self.phase, Phase::Done) {
            if let Input::FitAnswered { center, task, .. }
            | Input::EvalAnswered { center, task, .. }
            | Input::PlacementAnswered { center, task, .. }
            | Input::Secure { center, task, .. } = input
            {
                let round = self.committed;
                self.refuse(center, task, UpdateRefusal::Late { round });
            }
            return;
        }
        match input {
            Input::Connected {
                center,
                connection,
                declared,
            } => {
                self.declared.insert(center.clone(), declared);
                self.connected.insert(center, connection);
                self.maybe_start(now);
            }
            Input::Disconnected { center, connection } => {
                if self.connected.get(&center) != Some(&connection) {
                    return; // an older connection of a centre that reconnected
                }
                self.connected.remove(&center);
                if let Some(tasks) = self.phase.tasks_mut() {
                    for task in tasks.drop_center(&center) {
                        self.phase.note(task, &center, Gone::Disconnected);
                    }
                }
                self.secure_gone(&center, now);
                self.maybe_close(now);
                self.maybe_start(now);
            }
            Input::TaskFailed {
                center,
                task,
                reason,
            } => {
                if self
                    .phase
                    .tasks_mut()
                    .is_some_and(|t| t.settle(task, &center))
                {
                    tracing::warn!(%center, task, %reason, "centre could not do its task");
                    self.phase.note(task, &center, Gone::Failed(reason));
                    self.secure_gone(&center, now);
                }
                self.maybe_close(now);
            }
            Input::FitAnswered {
                center,
                task,
                result,
            } => {
                let taken = self.take_fit(&center, task, result);
                self.verdict(center, task, taken);
                self.maybe_close(now);
            }
            Input::EvalAnswered {
                center,
                task,
                report,
            } => {
                let taken = self.take_report(&center, task, report);
                self.verdict(center, task, taken);
                self.maybe_close(now);
            }
            Input::PlacementAnswered {
                center,
                task,
                report,
            } => {
                let taken = self.take_placement(&center, task, report);
                self.verdict(center, task, taken);
                self.maybe_close(now);
            }
            Input::Secure {
                center,
                task,
                message,
            } => {
                self.take_secure(center, task, message, now);
                self.maybe_close(now);
            }
            Input::RoundStored { round } => self.round_stored(round, now),
            Input::EvaluationStored { round } => self.evaluation_stored(round, now),
            Input::StoreFailed { reason } => self.finish_failed(reason),
        }
    }

    /// Starts a round whose start grace has passed, or closes a phase whose deadline has.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Waiting(grace) = self.phase {
            if grace.is_some_and(|since| now >= since + self.settings.start_grace) {
                self.start(now);
            } else if self
                .short_since
                .is_some_and(|since| now >= since + self.settings.deadline)
            {
                self.short_of_quorum(now);
            }
            return;
        }
        self.secure_timeout(now);
        self.maybe_close(now);
        if let Phase::Placing(p) = &mut self.phase {
            if now >= p.tasks.deadline {
                p.expire_unsent(&self.connected);
            }
        }
        let Some(tasks) = self.phase.tasks_mut() else {
            return;
        };
        if now < tasks.deadline {
            return;
        }
        for (task, center) in tasks.expire() {
            self.phase.note(task, &center, Gone::Silent);
            self.actions.push_back(Action::Cancel { center, task });
        }
        self.maybe_close(now);
    }

    /// Queues the verdict on an answer: taken, or refused (and the refusal noted by the phase).
    fn verdict(&mut self, center: CenterId, task: TaskId, taken: Result<(), UpdateRefusal>) {
        match taken {
            Ok(()) => self.actions.push_back(Action::Accept { center, task }),
            Err(refusal) => self.refuse(center, task, refusal),
        }
    }

    fn refuse(&mut self, center: CenterId, task: TaskId, refusal: UpdateRefusal) {
        tracing::warn!(%center, task, %refusal, "answer refused");
        if self
            .phase
            .tasks_mut()
            .is_some_and(|t| t.settle(task, &center))
        {
            self.phase
                .note(task, &center, Gone::Refused(refusal.to_string()));
        }
        self.actions.push_back(Action::Refuse {
            center,
            task,
            refusal,
        });
    }

    /// Why an answer to `task` is refused when no phase has it: a task of a closed round came late, any
    /// other was never sent.
    fn stale(&self, task: TaskId) -> UpdateRefusal {
        if task < self.first_task_of_round {
            // The round being committed has closed too, though it is not committed yet.
            let round = match &self.phase {
                Phase::Committing(c) => c.round(),
                _ => self.committed,
            };
            UpdateRefusal::Late { round }
        } else {
            UpdateRefusal::NoTask
        }
    }

    /// Checks that `task` is `center`'s and pending in `tasks`.
    fn owned_and_pending(
        tasks: &TaskSet,
        center: &CenterId,
        task: TaskId,
        round: u32,
    ) -> Result<(), UpdateRefusal> {
        let Some(owner) = tasks.owner(task) else {
            return Err(UpdateRefusal::NoTask);
        };
        if owner != center {
            return Err(UpdateRefusal::NotYours {
                owner: owner.to_string(),
            });
        }
        if !tasks.is_pending(task) {
            return Err(UpdateRefusal::Duplicate { round });
        }
        Ok(())
    }

    fn maybe_start(&mut self, now: Instant) {
        match self.phase {
            Phase::Waiting(since) => {
                let connected = self.connected_training();
                if connected == self.training() {
                    self.start(now);
                } else if connected >= self.settings.quorum {
                    self.short_since = None;
                    if since.is_none() {
                        self.phase = Phase::Waiting(Some(now));
                    }
                } else {
                    self.phase = Phase::Waiting(None);
                }
            }
            Phase::Placing(_) => self.maybe_send_placements(now),
            _ => {}
        }
    }

    /// Starts the next round, or the evaluation a resumed run still owes, with the centres connected.
    fn start(&mut self, now: Instant) {
        if self.connected_training() < self.settings.quorum {
            self.phase = Phase::Waiting(None);
            let begun = self.committed > 0 || self.retries > 0;
            if begun && self.short_since.is_none() {
                self.short_since = Some(now);
            }
            return;
        }
        self.short_since = None;
        if let Some(after) = self.evaluation_due.take() {
            return self.evaluate(now, after);
        }
        self.start_round(now);
    }

    fn maybe_close(&mut self, now: Instant) {
        match &self.phase {
            Phase::Fitting(f) if f.tasks.is_done() => self.close_round(now),
            Phase::Evaluating(e) if e.tasks.is_done() => self.close_evaluation(),
            Phase::Placing(p) if p.is_done() => self.close_placements(),
            _ => {}
        }
    }

    fn proceed(&mut self, now: Instant, after: After) {
        match after {
            // Centres that were there for this round need no grace to be there for the next.
            After::NextRound => self.start(now),
            After::Finish(outcome) => self.finish(outcome),
        }
    }

    /// A deadline has passed with fewer training centres connected than the quorum: a try of the round
    /// that fell short, and after the retries, the run's end.
    fn short_of_quorum(&mut self, now: Instant) {
        self.retries += 1;
        let why = format!(
            "round {}: {} of the {} training centres needed connected for {} s",
            self.committed + 1,
            self.connected_training(),
            self.settings.quorum,
            self.settings.deadline.as_secs()
        );
        if self.retries > self.settings.retries {
            self.finish_failed(format!("{why}; tried {} times, giving up", self.retries));
        } else {
            tracing::warn!(%why, retry = self.retries, "the quorum is not connected; waiting again");
            self.short_since = Some(now);
        }
    }

    fn finish_failed(&mut self, reason: String) {
        self.finish(Outcome::Failed {
            rounds: self.committed,
            reason,
        });
    }

    fn finish(&mut self, outcome: Outcome) {
        self.phase = Phase::Done;
        self.actions.push_back(Action::Finish(outcome));
    }
}
