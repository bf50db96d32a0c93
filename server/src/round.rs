//! The round state machine: pure, no IO, no clock of its own (quinn-proto is the model). The endpoint feeds it
//! [`Input`]s and the time, asks it when it next needs the time ([`Coordinator::poll_timeout`]), and carries
//! out the [`Action`]s it queues. Tests drive it with a fake clock through every timeout path.
//!
//! A round starts when every training centre is connected, or `start_grace` after `quorum` of them are: each
//! connected training centre gets the same fit task. It closes when no task is pending (answered, failed, or its centre gone) or at the deadline; with
//! at least `quorum` accepted updates (federated Newton: every training centre, or the sum is not the pooled
//! one) the strategy makes the next global model and the round is committed; with fewer it is tried again,
//! up to `retries` times, and then the run fails saying who did not answer. Validation centres never get a fit
//! task and their updates are refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedslm_metrics::{LogisticFit, LogisticStats, NewtonOptions, NewtonSolver, NewtonStep};
use fedslm_protocol::clinical::{NewtonUpdate, COEFFICIENTS, COVARIANCE};
use fedslm_protocol::{
    CenterId, EvalReport, EvaluateTask, FitResult, FitTask, Fold, LocalObjective, ModelKind, Role,
    Tensor, TensorRole, Weights,
};

use crate::aggregate::{check_update, FedAvg, UpdateRefusal};
use crate::evaluation::{check_report, CentreEvaluation, Evaluation};

/// Identifies one fit task sent to one centre.
pub type TaskId = u64;

/// How the next global model is made from the centres' answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// The example-weighted mean of the centres' weights.
    FedAvg,
    /// FedAvg, with the clients' loss plus `mu / 2 ||w - w_global||^2`.
    FedProx { mu: f64 },
    /// The clinical logistic model: centres send gradient, Hessian and log-likelihood at the global
    /// coefficients; the server sums them and takes a Newton step, until convergence.
    Newton,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedProx { .. } => "fedprox",
            Strategy::Newton => "newton",
        }
    }
}

/// The run's round settings, from the server's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    pub model: ModelKind,
    /// Rounds to run; under federated Newton, the most rounds allowed to converge.
    pub rounds: u32,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// Training centres that must be connected to start a round and must answer to commit it.
    pub quorum: usize,
    /// How long a round waits for answers.
    pub deadline: Duration,
    /// Once `quorum` training centres are connected, how long to wait for the others before starting without
    /// them (a round starts at once when every training centre is connected).
    pub start_grace: Duration,
    /// How often a round that fell short of its quorum is tried again before the run fails.
    pub retries: u32,
    pub strategy: Strategy,
    /// Largest L2 distance of an update from the global model, batch-norm statistics excluded.
    pub norm_bound: Option<f64>,
    pub seed: u64,
    /// Under cross-validation: the fold every training centre holds out of training and evaluates on.
    pub fold: Option<Fold>,
    pub evaluation: EvaluationSettings,
}

/// When and how finely the global model is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaluationSettings {
    /// Bins of the centres' score histograms; 0: no evaluation.
    pub bins: u32,
    /// Also evaluate after every this many rounds; 0: after the last round only.
    pub every: u32,
}

impl Default for EvaluationSettings {
    fn default() -> EvaluationSettings {
        EvaluationSettings {
            bins: 1000,
            every: 0,
        }
    }
}

/// Why a run cannot be set up as configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetupError {
    #[error("no centre has the role train")]
    NoTrainingCentre,
    #[error("quorum {quorum} is more than the {training} training centres enrolled")]
    Quorum { quorum: usize, training: usize },
    #[error("quorum must be at least 1")]
    ZeroQuorum,
    #[error("rounds must be at least 1")]
    ZeroRounds,
    #[error("the clinical model is fitted by federated Newton (strategy = \"newton\"), not {0}")]
    ClinicalNeedsNewton(&'static str),
    #[error("strategy newton fits the clinical logistic model only, not the {0:?} network")]
    NewtonNeedsClinical(ModelKind),
    #[error("the initial clinical model has no {COEFFICIENTS} vector of {0} coefficients")]
    Coefficients(usize),
    #[error("the initial model has no tensors")]
    EmptyModel,
    #[error("cannot resume the stored run: {0}")]
    Resume(String),
}

/// What the endpoint tells the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An admitted centre's connection (a reconnection replaces the older one).
    Connected {
        center: CenterId,
        connection: u64,
    },
    Disconnected {
        center: CenterId,
        connection: u64,
    },
    /// A centre answered task `task` (or sent an update nobody asked for: a task id from
    /// [`Coordinator::unsolicited_task`]).
    FitAnswered {
        center: CenterId,
        task: TaskId,
        result: FitResult,
    },
    /// A centre reported its evaluation of task `task`.
    EvalAnswered {
        center: CenterId,
        task: TaskId,
        report: EvalReport,
    },
    /// A task ended without a result: the centre said it cannot do it, or its stream failed.
    TaskFailed {
        center: CenterId,
        task: TaskId,
        reason: String,
    },
}

/// A centre's accepted part of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub center: CenterId,
    pub examples: u64,
    pub train_loss: f64,
}

/// A committed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRecord {
    pub round: u32,
    /// Earlier tries of this round that fell short of the quorum.
    pub retries: u32,
    pub contributions: Vec<Contribution>,
    /// Centres whose answer was refused or who could not train, and why.
    pub refused: Vec<(CenterId, String)>,
    /// Centres that were asked and did not answer before the round closed.
    pub silent: Vec<CenterId>,
    pub duration: Duration,
    /// Federated Newton: the log-likelihood at the coefficients the round evaluated.
    pub log_likelihood: Option<f64>,
    /// Federated Newton: the round's summed statistics (a resumed run replays its solver from them).
    pub newton: Option<LogisticStats>,
}

/// Where a stored run stands, for [`Coordinator::resume`].
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The last committed round.
    pub round: u32,
    /// The global model that round committed.
    pub global: Weights,
    /// Federated Newton: each committed round's summed statistics, in order.
    pub newton_history: Vec<LogisticStats>,
    /// Whether that round's evaluation was stored.
    pub evaluated: bool,
}

impl RoundRecord {
    /// The example-weighted mean training loss of the accepted updates.
    pub fn train_loss(&self) -> f64 {
        weighted_loss(
            self.contributions
                .iter()
                .map(|c| (c.examples, c.train_loss)),
        )
    }

    /// `3 centres, 120 patients, loss 0.5123` (and who was silent or refused).
    pub fn summary(&self) -> String {
        let examples: u64 = self.contributions.iter().map(|c| c.examples).sum();
        format!(
            "{} centres, {examples} patients, loss {:.4}{}",
            self.contributions.len(),
            self.train_loss(),
            if self.silent.is_empty() && self.refused.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} silent, {} refused",
                    self.silent.len(),
                    self.refused.len()
                )
            }
        )
    }
}

/// The example-weighted mean of centres' training losses, from `(examples, loss)` pairs.
pub(crate) fn weighted_loss(parts: impl Iterator<Item = (u64, f64)>) -> f64 {
    let (n, sum) = parts.fold((0u64, 0.0), |(n, sum), (examples, loss)| {
        (n + examples, sum + loss * examples as f64)
    });
    sum / n.max(1) as f64
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed {
        rounds: u32,
        weights: Arc<Weights>,
        /// Federated Newton: the pooled fit (coefficients, standard errors, covariance).
        fit: Option<LogisticFit>,
    },
    Failed {
        rounds: u32,
        reason: String,
    },
}

/// What the endpoint must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `task` to each centre on a fresh stream, as the task ids given.
    SendFit {
        task: Arc<FitTask>,
        to: Vec<(CenterId, TaskId)>,
    },
    /// The answer to `task` was folded in.
    Accept {
        center: CenterId,
        task: TaskId,
    },
    /// The answer to `task` was refused: tell the centre why.
    Refuse {
        center: CenterId,
        task: TaskId,
        refusal: UpdateRefusal,
    },
    /// The task's round closed without its answer: drop its stream.
    Cancel {
        center: CenterId,
        task: TaskId,
    },
    /// Store the round (its record and the new global model) before anything else is announced.
    RoundCommitted {
        record: RoundRecord,
        weights: Arc<Weights>,
    },
    /// Send `task` to each centre on a fresh stream, as the task ids given.
    SendEvaluate {
        task: Arc<EvaluateTask>,
        to: Vec<(CenterId, TaskId)>,
    },
    /// An evaluation round closed: store its aggregates with the round.
    Evaluated(Evaluation),
    Finished(Outcome),
}

enum Sum {
    Mean(FedAvg),
    Newton {
        template: Weights,
        stats: LogisticStats,
    },
}

struct Running {
    round: u32,
    started: Instant,
    deadline: Instant,
    tasks: BTreeMap<TaskId, CenterId>,
    pending: BTreeSet<TaskId>,
    answered: BTreeSet<CenterId>,
    sum: Sum,
    contributions: Vec<Contribution>,
    refused: Vec<(CenterId, String)>,
    silent: Vec<CenterId>,
}

/// What comes after a committed round (once it is evaluated, where due).
#[derive(Debug, Clone, PartialEq)]
enum After {
    NextRound,
    Finish(Outcome),
}

struct Evaluating {
    round: u32,
    deadline: Instant,
    tasks: BTreeMap<TaskId, CenterId>,
    pending: BTreeSet<TaskId>,
    centres: Vec<CentreEvaluation>,
    missing: Vec<(CenterId, String)>,
    after: After,
}

enum Phase {
    /// Waiting for centres; since when the quorum has been connected.
    Waiting(Option<Instant>),
    Running(Box<Running>),
    Evaluating(Box<Evaluating>),
    Done,
}

/// The coordinator of one run.
pub struct Coordinator {
    settings: RoundSettings,
    roles: BTreeMap<CenterId, Role>,
    connected: BTreeMap<CenterId, u64>,
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
}

impl Coordinator {
    /// A run over the enrolled `roles`, from the `initial` global model. Under federated Newton the
    /// coefficients start at zero whatever `initial` holds (its shape gives their number), and `names` name
    /// them in the fit.
    pub fn new(
        settings: RoundSettings,
        roles: BTreeMap<CenterId, Role>,
        initial: Weights,
        names: &[&str],
    ) -> Result<Coordinator, SetupError> {
        let training = roles.values().filter(|r| **r == Role::Train).count();
        if training == 0 {
            return Err(SetupError::NoTrainingCentre);
        }
        if settings.quorum == 0 {
            return Err(SetupError::ZeroQuorum);
        }
        if settings.quorum > training {
            return Err(SetupError::Quorum {
                quorum: settings.quorum,
                training,
            });
        }
        if settings.rounds == 0 {
            return Err(SetupError::ZeroRounds);
        }
        if initial.is_empty() {
            return Err(SetupError::EmptyModel);
        }
        let newton = match (settings.model, settings.strategy) {
            (ModelKind::Clinical, Strategy::Newton) => {
                let p = names.len();
                if initial.get(COEFFICIENTS).map(|t| t.shape()) != Some(&[p][..]) {
                    return Err(SetupError::Coefficients(p));
                }
                Some(NewtonSolver::new(names, NewtonOptions::default()))
            }
            (ModelKind::Clinical, other) => {
                return Err(SetupError::ClinicalNeedsNewton(other.name()))
            }
            (kind, Strategy::Newton) => return Err(SetupError::NewtonNeedsClinical(kind)),
            _ => None,
        };
        let global = match &newton {
            Some(solver) => clinical_weights(solver.point(), None),
            None => initial,
        };
        Ok(Coordinator {
            settings,
            roles,
            connected: BTreeMap::new(),
            global: Arc::new(global),
            committed: 0,
            retries: 0,
            phase: Phase::Waiting(None),
            next_task: 1,
            first_task_of_round: 1,
            newton,
            actions: VecDeque::new(),
            evaluation_due: None,
        })
    }

    /// A run that goes on after its last committed round (a restarted server). Under federated Newton the
    /// rounds' summed statistics are replayed through a fresh solver so that its state (step halving included)
    /// is the uninterrupted run's, and the replayed point must be the stored model. A run with nothing left to do
    /// finishes at once, as it would have.
    pub fn resume(
        settings: RoundSettings,
        roles: BTreeMap<CenterId, Role>,
        initial: Weights,
        names: &[&str],
        last: Committed,
    ) -> Result<Coordinator, SetupError> {
        let Committed {
            round: committed,
            global,
            newton_history,
            evaluated,
        } = last;
        let mut c = Coordinator::new(settings, roles, initial, names)?;
        if committed == 0 {
            return Ok(c);
        }
        check_update(&c.global, &global, None)
            .map_err(|e| SetupError::Resume(format!("the last checkpoint: {e}")))?;
        let mut converged = None;
        if let Some(solver) = &mut c.newton {
            if newton_history.len() != committed as usize {
                return Err(SetupError::Resume(format!(
                    "{committed} rounds committed but {} carry Newton statistics",
                    newton_history.len()
                )));
            }
            for (i, stats) in newton_history.iter().enumerate() {
                if converged.is_some() {
                    return Err(SetupError::Resume(format!(
                        "federated Newton converged at round {i}, yet rounds were committed after it"
                    )));
                }
                match solver.observe(stats.clone()) {
                    Ok(NewtonStep::Evaluate(_)) => {}
                    Ok(NewtonStep::Converged(fit)) => converged = Some(fit),
                    Err(e) => return Err(SetupError::Resume(format!("round {}: {e}", i + 1))),
                }
            }
            let replayed = match &converged {
                Some(fit) => clinical_weights(&fit.coefficients, Some(&fit.covariance)),
                None => clinical_weights(solver.point(), None),
            };
            if replayed != global {
                return Err(SetupError::Resume(
                    "the replayed Newton steps do not give the last checkpoint's coefficients"
                        .into(),
                ));
            }
        }
        c.global = Arc::new(global);
        c.committed = committed;
        c.next_task = 1;
        let after = c.after_commit(converged);
        if !evaluated && c.evaluation_due(&after) {
            // Killed before the last round's evaluation was stored: it comes first, once centres are back.
            c.evaluation_due = Some(after);
        } else if let After::Finish(outcome) = after {
            c.finish(outcome);
        }
        Ok(c)
    }

    /// The global model now.
    pub fn global(&self) -> &Arc<Weights> {
        &self.global
    }

    /// Rounds committed so far.
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

    /// A task id for an update that arrived on a stream the server did not open; it will be refused.
    pub fn unsolicited_task(&mut self) -> TaskId {
        let id = self.next_task;
        self.next_task += 1;
        id
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the machine next needs [`Coordinator::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Running(r) => Some(r.deadline),
            Phase::Evaluating(e) => Some(e.deadline),
            Phase::Waiting(Some(since)) => Some(*since + self.settings.start_grace),
            _ => None,
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        if matches!(self.phase, Phase::Done) {
            if let Input::FitAnswered { center, task, .. }
            | Input::EvalAnswered { center, task, .. } = input
            {
                self.refuse(
                    center,
                    task,
                    UpdateRefusal::Late {
                        round: self.committed,
                    },
                );
            }
            return;
        }
        match input {
            Input::Connected { center, connection } => {
                self.connected.insert(center, connection);
                self.maybe_start(now);
            }
            Input::Disconnected { center, connection } => {
                if self.connected.get(&center) == Some(&connection) {
                    self.connected.remove(&center);
                    match &mut self.phase {
                        Phase::Running(r) => {
                            for _ in 0..drop_pending(&r.tasks, &mut r.pending, &center) {
                                r.silent.push(center.clone());
                            }
                        }
                        Phase::Evaluating(e) => {
                            for _ in 0..drop_pending(&e.tasks, &mut e.pending, &center) {
                                e.missing.push((center.clone(), "disconnected".into()));
                            }
                        }
                        _ => {}
                    }
                    self.maybe_close(now);
                    self.maybe_start(now);
                }
            }
            Input::TaskFailed {
                center,
                task,
                reason,
            } => {
                if let Phase::Running(r) = &mut self.phase {
                    if r.tasks.get(&task) == Some(&center) && r.pending.remove(&task) {
                        tracing::warn!(%center, round = r.round, %reason, "centre could not train");
                        r.refused.push((center, reason));
                    }
                } else if let Phase::Evaluating(e) = &mut self.phase {
                    if e.tasks.get(&task) == Some(&center) && e.pending.remove(&task) {
                        tracing::warn!(%center, round = e.round, %reason, "centre could not evaluate");
                        e.missing.push((center, reason));
                    }
                }
                self.maybe_close(now);
            }
            Input::FitAnswered {
                center,
                task,
                result,
            } => {
                match self.take_answer(&center, task, result) {
                    Ok(()) => self.actions.push_back(Action::Accept { center, task }),
                    Err(refusal) => self.refuse(center, task, refusal),
                }
                self.maybe_close(now);
            }
            Input::EvalAnswered {
                center,
                task,
                report,
            } => {
                match self.take_report(&center, task, report) {
                    Ok(()) => self.actions.push_back(Action::Accept { center, task }),
                    Err(refusal) => self.refuse(center, task, refusal),
                }
                self.maybe_close(now);
            }
        }
    }

    /// Starts a round whose start grace has passed, or closes one whose deadline has.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Waiting(Some(since)) = self.phase {
            if now >= since + self.settings.start_grace {
                self.start(now);
            }
            return;
        }
        if let Phase::Evaluating(e) = &mut self.phase {
            if now < e.deadline {
                return;
            }
            for task in std::mem::take(&mut e.pending) {
                if let Some(center) = e.tasks.get(&task) {
                    e.missing
                        .push((center.clone(), "no report before the deadline".into()));
                    self.actions.push_back(Action::Cancel {
                        center: center.clone(),
                        task,
                    });
                }
            }
            return self.close_evaluation(now);
        }
        let Phase::Running(r) = &mut self.phase else {
            return;
        };
        if now < r.deadline {
            return;
        }
        let pending: Vec<TaskId> = std::mem::take(&mut r.pending).into_iter().collect();
        for task in pending {
            if let Some(center) = r.tasks.get(&task) {
                r.silent.push(center.clone());
                self.actions.push_back(Action::Cancel {
                    center: center.clone(),
                    task,
                });
            }
        }
        self.close(now);
    }

    fn refuse(&mut self, center: CenterId, task: TaskId, refusal: UpdateRefusal) {
        tracing::warn!(%center, task, %refusal, "update refused");
        if let Phase::Running(r) = &mut self.phase {
            if r.tasks.get(&task) == Some(&center) && r.pending.remove(&task) {
                r.refused.push((center.clone(), refusal.to_string()));
            }
        } else if let Phase::Evaluating(e) = &mut self.phase {
            if e.tasks.get(&task) == Some(&center) && e.pending.remove(&task) {
                e.missing.push((center.clone(), refusal.to_string()));
            }
        }
        self.actions.push_back(Action::Refuse {
            center,
            task,
            refusal,
        });
    }

    /// Every check of an answer, in order; folds it in when all pass.
    fn take_answer(
        &mut self,
        center: &CenterId,
        task: TaskId,
        result: FitResult,
    ) -> Result<(), UpdateRefusal> {
        if self.roles.get(center) != Some(&Role::Train) {
            return Err(UpdateRefusal::NotTraining);
        }
        let stale = self.stale(task);
        let Phase::Running(r) = &mut self.phase else {
            return Err(stale);
        };
        let Some(owner) = r.tasks.get(&task) else {
            return Err(if task < self.first_task_of_round {
                UpdateRefusal::Late {
                    round: r.round.saturating_sub(1),
                }
            } else {
                UpdateRefusal::NoTask
            });
        };
        if owner != center {
            return Err(UpdateRefusal::NotYours {
                owner: owner.to_string(),
            });
        }
        if r.answered.contains(center) || !r.pending.contains(&task) {
            return Err(UpdateRefusal::Duplicate { round: r.round });
        }
        if result.round != r.round {
            return Err(UpdateRefusal::WrongRound {
                got: result.round,
                expected: r.round,
            });
        }
        if result.examples == 0 {
            return Err(UpdateRefusal::NoExamples);
        }
        if !result.train_loss.is_finite() {
            return Err(UpdateRefusal::NonFiniteLoss(result.train_loss));
        }
        match &mut r.sum {
            Sum::Mean(avg) => {
                check_update(&self.global, &result.weights, self.settings.norm_bound)?;
                avg.fold(&result.weights, result.examples)?;
            }
            Sum::Newton { template, stats } => {
                check_update(template, &result.weights, None)?;
                let u = NewtonUpdate::from_weights(&result.weights)
                    .map_err(|e| UpdateRefusal::Missing(e.to_string()))?;
                let local = LogisticStats {
                    gradient: u.gradient,
                    hessian: u.hessian,
                    log_likelihood: u.log_likelihood,
                    n: result.examples,
                    fitted_exactly: u.fitted_exactly,
                };
                stats.add(&local).map_err(|e| UpdateRefusal::Shape {
                    name: e.to_string(),
                    got: vec![],
                    expected: vec![],
                })?;
            }
        }
        r.pending.remove(&task);
        r.answered.insert(center.clone());
        r.contributions.push(Contribution {
            center: center.clone(),
            examples: result.examples,
            train_loss: result.train_loss,
        });
        Ok(())
    }

    /// Why an answer to `task` is refused when no round is open for it: a task of a closed round came late,
    /// any other was never sent.
    fn stale(&self, task: TaskId) -> UpdateRefusal {
        if task < self.first_task_of_round {
            UpdateRefusal::Late {
                round: self.committed,
            }
        } else {
            UpdateRefusal::NoTask
        }
    }

    /// The checks of an evaluation report; takes it in when they pass.
    fn take_report(
        &mut self,
        center: &CenterId,
        task: TaskId,
        report: EvalReport,
    ) -> Result<(), UpdateRefusal> {
        let stale = self.stale(task);
        let Phase::Evaluating(e) = &mut self.phase else {
            return Err(stale);
        };
        let Some(owner) = e.tasks.get(&task) else {
            return Err(UpdateRefusal::NoTask);
        };
        if owner != center {
            return Err(UpdateRefusal::NotYours {
                owner: owner.to_string(),
            });
        }
        if !e.pending.contains(&task) {
            return Err(UpdateRefusal::Duplicate { round: e.round });
        }
        let histogram = check_report(&report, e.round, self.settings.evaluation.bins)
            .map_err(UpdateRefusal::BadReport)?;
        e.pending.remove(&task);
        e.centres.push(CentreEvaluation {
            center: center.clone(),
            role: self.roles.get(center).copied().unwrap_or(Role::Validate),
            examples: report.examples,
            positives: report.positives,
            loss: report.loss,
            histogram,
        });
        Ok(())
    }

    /// Whether the model committed at this round is evaluated before `after`.
    fn evaluation_due(&self, after: &After) -> bool {
        let ev = self.settings.evaluation;
        ev.bins > 0
            && (matches!(after, After::Finish(Outcome::Completed { .. }))
                || ev.every > 0 && self.committed % ev.every == 0)
    }

    /// Sends the committed model to every connected centre for evaluation: training centres evaluate the run's
    /// held-out fold (or all their patients), validation centres their whole cohort.
    fn evaluate(&mut self, now: Instant, after: After) {
        let round = self.committed;
        self.first_task_of_round = self.next_task;
        let mut tasks = BTreeMap::new();
        let (mut training, mut validating) = (Vec::new(), Vec::new());
        for center in self.connected.keys() {
            let id = self.next_task;
            self.next_task += 1;
            tasks.insert(id, center.clone());
            match self.roles.get(center) {
                Some(Role::Train) => training.push((center.clone(), id)),
                _ => validating.push((center.clone(), id)),
            }
        }
        let missing = self
            .roles
            .keys()
            .filter(|c| !self.connected.contains_key(*c))
            .map(|c| (c.clone(), "not connected".to_string()))
            .collect();
        let task = EvaluateTask {
            round,
            model: self.settings.model,
            weights: (*self.global).clone(),
            fold: None,
            histogram_bins: self.settings.evaluation.bins,
        };
        tracing::info!(round, centres = tasks.len(), "evaluation started");
        if !training.is_empty() {
            self.actions.push_back(Action::SendEvaluate {
                task: Arc::new(EvaluateTask {
                    fold: self.settings.fold,
                    ..task.clone()
                }),
                to: training,
            });
        }
        if !validating.is_empty() {
            self.actions.push_back(Action::SendEvaluate {
                task: Arc::new(task),
                to: validating,
            });
        }
        self.phase = Phase::Evaluating(Box::new(Evaluating {
            round,
            deadline: now + self.settings.deadline,
            pending: tasks.keys().copied().collect(),
            tasks,
            centres: Vec::new(),
            missing,
            after,
        }));
        self.maybe_close(now);
    }

    fn close_evaluation(&mut self, now: Instant) {
        let Phase::Evaluating(e) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        let e = *e;
        tracing::info!(
            round = e.round,
            centres = e.centres.len(),
            "evaluation closed"
        );
        self.actions.push_back(Action::Evaluated(Evaluation {
            round: e.round,
            fold: self.settings.fold,
            bins: self.settings.evaluation.bins,
            centres: e.centres,
            missing: e.missing,
        }));
        self.proceed(now, e.after);
    }

    fn proceed(&mut self, now: Instant, after: After) {
        match after {
            // Centres that were there for this round need no grace to be there for the next.
            After::NextRound => self.start(now),
            After::Finish(outcome) => self.finish(outcome),
        }
    }

    fn maybe_start(&mut self, now: Instant) {
        let Phase::Waiting(since) = self.phase else {
            return;
        };
        let connected = self.connected_training();
        let training = self.roles.values().filter(|r| **r == Role::Train).count();
        if connected == training {
            self.start(now);
        } else if connected >= self.settings.quorum {
            if since.is_none() {
                self.phase = Phase::Waiting(Some(now));
            }
        } else {
            self.phase = Phase::Waiting(None);
        }
    }

    fn start(&mut self, now: Instant) {
        if self.connected_training() < self.settings.quorum {
            self.phase = Phase::Waiting(None);
            return;
        }
        if let Some(after) = self.evaluation_due.take() {
            return self.evaluate(now, after);
        }
        let round = self.committed + 1;
        self.first_task_of_round = self.next_task;
        let mut tasks = BTreeMap::new();
        let mut to = Vec::new();
        for center in self.connected.keys() {
            if self.roles.get(center) == Some(&Role::Train) {
                let id = self.next_task;
                self.next_task += 1;
                tasks.insert(id, center.clone());
                to.push((center.clone(), id));
            }
        }
        let objective = match self.settings.strategy {
            Strategy::FedAvg => LocalObjective::Plain,
            Strategy::FedProx { mu } => LocalObjective::Proximal { mu },
            Strategy::Newton => LocalObjective::NewtonStep,
        };
        let sum = match &self.newton {
            Some(solver) => {
                let p = solver.point().len();
                Sum::Newton {
                    // Shapes are all this template is for; zeros cannot fail to encode.
                    template: NewtonUpdate::zeros(p).to_weights().unwrap_or_default(),
                    stats: LogisticStats::zeros(p),
                }
            }
            None => Sum::Mean(FedAvg::new(&self.global)),
        };
        let task = FitTask {
            round,
            model: self.settings.model,
            weights: (*self.global).clone(),
            local_epochs: self.settings.local_epochs,
            learning_rate: self.settings.learning_rate,
            batch_size: self.settings.batch_size,
            fold: self.settings.fold,
            // Each client mixes in its centre id, so one task (one encoding) serves every centre.
            seed: round_seed(self.settings.seed, round),
            objective,
            keep_batch_norm_local: false,
        };
        tracing::info!(
            round,
            centres = to.len(),
            retry = self.retries,
            "round started"
        );
        self.phase = Phase::Running(Box::new(Running {
            round,
            started: now,
            deadline: now + self.settings.deadline,
            pending: tasks.keys().copied().collect(),
            tasks,
            answered: BTreeSet::new(),
            sum,
            contributions: Vec::new(),
            refused: Vec::new(),
            silent: Vec::new(),
        }));
        self.actions.push_back(Action::SendFit {
            task: Arc::new(task),
            to,
        });
    }

    fn maybe_close(&mut self, now: Instant) {
        match &self.phase {
            Phase::Running(r) if r.pending.is_empty() => self.close(now),
            Phase::Evaluating(e) if e.pending.is_empty() => self.close_evaluation(now),
            _ => {}
        }
    }

    fn close(&mut self, now: Instant) {
        let Phase::Running(r) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        let r = *r;
        let training = self.roles.values().filter(|x| **x == Role::Train).count();
        let required = if self.newton.is_some() {
            training
        } else {
            self.settings.quorum
        };
        if r.contributions.len() < required {
            self.retries += 1;
            let why = format!(
                "round {}: {} of the {required} answers needed{}{}",
                r.round,
                r.contributions.len(),
                if r.silent.is_empty() {
                    String::new()
                } else {
                    format!("; no answer from {}", join(&r.silent))
                },
                if r.refused.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; refused: {}",
                        r.refused
                            .iter()
                            .map(|(c, why)| format!("{c} ({why})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            if self.retries > self.settings.retries {
                self.finish_failed(format!("{why}; tried {} times, giving up", self.retries));
            } else {
                tracing::warn!(%why, retry = self.retries, "round falls short of its quorum; trying again");
                self.start(now);
            }
            return;
        }
        let mut log_likelihood = None;
        let mut newton = None;
        let mut converged = None;
        match r.sum {
            Sum::Mean(avg) => match avg.finish() {
                Ok(Some(w)) => self.global = Arc::new(w),
                Ok(None) => {
                    return self.finish_failed(format!("round {}: nothing to average", r.round))
                }
                Err(e) => return self.finish_failed(format!("round {}: {e}", r.round)),
            },
            Sum::Newton { stats, .. } => {
                log_likelihood = Some(stats.log_likelihood);
                newton = Some(stats.clone());
                let Some(solver) = &mut self.newton else {
                    return;
                };
                match solver.observe(stats) {
                    Ok(NewtonStep::Evaluate(beta)) => {
                        self.global = Arc::new(clinical_weights(&beta, None));
                    }
                    Ok(NewtonStep::Converged(fit)) => {
                        self.global =
                            Arc::new(clinical_weights(&fit.coefficients, Some(&fit.covariance)));
                        converged = Some(fit);
                    }
                    Err(e) => {
                        return self
                            .finish_failed(format!("federated Newton at round {}: {e}", r.round))
                    }
                }
            }
        }
        self.committed = r.round;
        let retries = std::mem::take(&mut self.retries);
        tracing::info!(
            round = r.round,
            centres = r.contributions.len(),
            examples = r.contributions.iter().map(|c| c.examples).sum::<u64>(),
            "round committed"
        );
        self.actions.push_back(Action::RoundCommitted {
            record: RoundRecord {
                round: r.round,
                retries,
                contributions: r.contributions,
                refused: r.refused,
                silent: r.silent,
                duration: now.saturating_duration_since(r.started),
                log_likelihood,
                newton,
            },
            weights: self.global.clone(),
        });
        let after = self.after_commit(converged);
        if self.evaluation_due(&after) {
            self.evaluate(now, after);
        } else {
            self.proceed(now, after);
        }
    }

    /// What follows the round just committed: the next round, or the run's end.
    fn after_commit(&self, converged: Option<LogisticFit>) -> After {
        if let Some(fit) = converged {
            After::Finish(Outcome::Completed {
                rounds: self.committed,
                weights: self.global.clone(),
                fit: Some(fit),
            })
        } else if self.committed >= self.settings.rounds {
            if self.newton.is_some() {
                let reason = format!(
                    "federated Newton did not converge within {} rounds; raise rounds",
                    self.settings.rounds
                );
                tracing::error!(%reason, "run failed");
                After::Finish(Outcome::Failed {
                    rounds: self.committed,
                    reason,
                })
            } else {
                After::Finish(Outcome::Completed {
                    rounds: self.committed,
                    weights: self.global.clone(),
                    fit: None,
                })
            }
        } else {
            After::NextRound
        }
    }

    fn finish_failed(&mut self, reason: String) {
        tracing::error!(%reason, "run failed");
        self.finish(Outcome::Failed {
            rounds: self.committed,
            reason,
        });
    }

    fn finish(&mut self, outcome: Outcome) {
        self.phase = Phase::Done;
        self.actions.push_back(Action::Finished(outcome));
    }
}

/// Removes `center`'s pending tasks (its connection is gone); returns how many there were.
fn drop_pending(
    tasks: &BTreeMap<TaskId, CenterId>,
    pending: &mut BTreeSet<TaskId>,
    center: &CenterId,
) -> usize {
    let before = pending.len();
    pending.retain(|t| tasks.get(t) != Some(center));
    before - pending.len()
}

/// The clinical model's weights at `beta`; the covariance is zero until the fit has converged.
fn clinical_weights(beta: &[f64], covariance: Option<&[f64]>) -> Weights {
    let p = beta.len();
    let zeros = vec![0.0; p * p];
    let tensors = [
        Tensor::from_f64(COEFFICIENTS, vec![p], TensorRole::Parameter, beta),
        Tensor::from_f64(
            COVARIANCE,
            vec![p, p],
            TensorRole::Parameter,
            covariance.unwrap_or(&zeros),
        ),
    ];
    // Lengths match their shapes by construction.
    Weights::from_tensors(tensors.into_iter().filter_map(Result::ok).collect()).unwrap_or_default()
}

fn join(centers: &[CenterId]) -> String {
    centers
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The seed of a round's local training, before each client mixes in its centre id (splitmix64).
pub fn round_seed(seed: u64, round: u32) -> u64 {
    let mut z = seed ^ (u64::from(round)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_metrics::{fit_logistic, logistic_stats};
    use fedslm_protocol::DType;

    const MINUTE: Duration = Duration::from_secs(60);

    fn id(s: &str) -> CenterId {
        CenterId::new(s).unwrap()
    }

    fn model(w: &[f32], stat: f32) -> Weights {
        Weights::from_tensors(vec![
            Tensor::from_f32("conv.weight", vec![2, 2], TensorRole::Parameter, w).unwrap(),
            Tensor::from_f32(
                "bn.running_var",
                vec![1],
                TensorRole::BatchNormStatistic,
                &[stat],
            )
            .unwrap(),
        ])
        .unwrap()
    }

    fn settings(quorum: usize) -> RoundSettings {
        RoundSettings {
            model: ModelKind::Mri,
            rounds: 2,
            local_epochs: 1,
            learning_rate: 0.01,
            batch_size: 16,
            quorum,
            deadline: MINUTE,
            start_grace: Duration::from_secs(10),
            retries: 1,
            strategy: Strategy::FedAvg,
            norm_bound: Some(10.0),
            seed: 7,
            fold: None,
            // The machine's evaluation rounds have their own tests.
            evaluation: EvaluationSettings { bins: 0, every: 0 },
        }
    }

    fn roles() -> BTreeMap<CenterId, Role> {
        [
            ("a", Role::Train),
            ("b", Role::Train),
            ("c", Role::Train),
            ("x", Role::Validate),
        ]
        .into_iter()
        .map(|(c, r)| (id(c), r))
        .collect()
    }

    fn machine(settings: RoundSettings) -> Coordinator {
        Coordinator::new(settings, roles(), model(&[0.0; 4], 1.0), &[]).unwrap()
    }

    fn connect_all(m: &mut Coordinator, now: Instant) {
        for (n, c) in ["a", "b", "x", "c"].into_iter().enumerate() {
            m.handle(
                Input::Connected {
                    center: id(c),
                    connection: n as u64,
                },
                now,
            );
        }
    }

    fn actions(m: &mut Coordinator) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// The task ids of the last SendFit in `acts`, by centre.
    fn sent(acts: &[Action]) -> BTreeMap<String, TaskId> {
        acts.iter()
            .rev()
            .find_map(|a| match a {
                Action::SendFit { to, .. } => {
                    Some(to.iter().map(|(c, t)| (c.to_string(), *t)).collect())
                }
                _ => None,
            })
            .expect("a SendFit")
    }

    fn answer(
        m: &mut Coordinator,
        c: &str,
        task: TaskId,
        round: u32,
        w: Weights,
        n: u64,
        now: Instant,
    ) {
        m.handle(
            Input::FitAnswered {
                center: id(c),
                task,
                result: FitResult {
                    round,
                    weights: w,
                    examples: n,
                    train_loss: 0.5,
                },
            },
            now,
        );
    }

    /// A committed round's record with its model.
    #[derive(Debug, Clone)]
    struct CommittedRound {
        record: RoundRecord,
        weights: Arc<Weights>,
    }

    impl std::ops::Deref for CommittedRound {
        type Target = RoundRecord;
        fn deref(&self) -> &RoundRecord {
            &self.record
        }
    }

    fn committed(acts: &[Action]) -> Option<CommittedRound> {
        acts.iter().find_map(|a| match a {
            Action::RoundCommitted { record, weights } => Some(CommittedRound {
                record: record.clone(),
                weights: weights.clone(),
            }),
            _ => None,
        })
    }

    fn conv(w: &Weights) -> Vec<f32> {
        w.require("conv.weight").unwrap().to_f32_vec()
    }

    #[test]
    fn a_round_starts_at_quorum_and_commits_as_soon_as_every_centre_has_answered() {
        let t0 = Instant::now();
        let mut m = machine(settings(3));
        m.handle(
            Input::Connected {
                center: id("a"),
                connection: 1,
            },
            t0,
        );
        m.handle(
            Input::Connected {
                center: id("x"),
                connection: 2,
            },
            t0,
        );
        m.handle(
            Input::Connected {
                center: id("b"),
                connection: 3,
            },
            t0,
        );
        assert!(actions(&mut m).is_empty(), "two of three: no round yet");
        assert_eq!(m.poll_timeout(), None);
        m.handle(
            Input::Connected {
                center: id("c"),
                connection: 4,
            },
            t0,
        );
        let acts = actions(&mut m);
        let tasks = sent(&acts);
        assert_eq!(
            tasks.keys().collect::<Vec<_>>(),
            ["a", "b", "c"],
            "the validator never trains"
        );
        let Action::SendFit { task, .. } = &acts[0] else {
            panic!()
        };
        assert_eq!((task.round, task.local_epochs, task.batch_size), (1, 1, 16));
        assert_eq!(task.objective, LocalObjective::Plain);
        assert_eq!(m.poll_timeout(), Some(t0 + MINUTE));

        let t1 = t0 + Duration::from_secs(5);
        answer(
            &mut m,
            "a",
            tasks["a"],
            1,
            model(&[1.0, 2.0, 3.0, 4.0], 2.0),
            10,
            t1,
        );
        answer(
            &mut m,
            "b",
            tasks["b"],
            1,
            model(&[3.0, 2.0, 1.0, 0.0], 4.0),
            30,
            t1,
        );
        assert!(committed(&actions(&mut m)).is_none());
        let t2 = t0 + Duration::from_secs(9);
        answer(&mut m, "c", tasks["c"], 1, model(&[2.0; 4], 6.0), 60, t2);
        let acts = actions(&mut m);
        let record = committed(&acts).expect("committed before the deadline");
        assert_eq!(record.round, 1);
        assert_eq!(record.duration, Duration::from_secs(9));
        assert_eq!(record.contributions.len(), 3);
        assert!(record.silent.is_empty() && record.refused.is_empty());
        // (10 * [1,2,3,4] + 30 * [3,2,1,0] + 60 * [2,2,2,2]) / 100
        assert_eq!(conv(&record.weights), vec![2.2, 2.0, 1.8, 1.6]);
        assert_eq!(
            record
                .weights
                .require("bn.running_var")
                .unwrap()
                .to_f32_vec(),
            vec![5.0]
        );
        // Round 2 goes out at once, from the new global model.
        let Some(Action::SendFit { task, .. }) = acts.last() else {
            panic!("{acts:?}")
        };
        assert_eq!(task.round, 2);
        assert_eq!(conv(&task.weights), vec![2.2, 2.0, 1.8, 1.6]);
        assert_ne!(task.seed, round_seed(7, 1));
        assert_eq!(m.poll_timeout(), Some(t2 + MINUTE));
    }

    #[test]
    fn the_last_round_finishes_the_run() {
        let t0 = Instant::now();
        let mut m = machine(RoundSettings {
            rounds: 1,
            ..settings(3)
        });
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m));
        for c in ["a", "b", "c"] {
            answer(&mut m, c, tasks[c], 1, model(&[1.0; 4], 1.0), 5, t0);
        }
        let acts = actions(&mut m);
        assert!(matches!(
            acts.last(),
            Some(Action::Finished(Outcome::Completed {
                rounds: 1,
                fit: None,
                ..
            }))
        ));
        assert!(m.is_finished());
        assert_eq!(m.poll_timeout(), None);
        // An answer after the end is refused as late.
        answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 5, t0);
        assert!(matches!(
            actions(&mut m)[..],
            [Action::Refuse {
                refusal: UpdateRefusal::Late { round: 1 },
                ..
            }]
        ));
    }

    #[test]
    fn a_centre_that_never_answers_is_dropped_at_the_deadline_and_the_quorum_commits() {
        let t0 = Instant::now();
        let mut m = machine(settings(2));
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m));
        answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
        answer(&mut m, "b", tasks["b"], 1, model(&[4.0; 4], 1.0), 20, t0);
        m.handle_timeout(t0 + MINUTE - Duration::from_millis(1));
        assert!(actions(&mut m)
            .iter()
            .all(|a| matches!(a, Action::Accept { .. })));
        m.handle_timeout(t0 + MINUTE);
        let acts = actions(&mut m);
        assert_eq!(
            acts[0],
            Action::Cancel {
                center: id("c"),
                task: tasks["c"]
            }
        );
        let record = committed(&acts).unwrap();
        assert_eq!(record.silent, vec![id("c")]);
        assert_eq!(conv(&record.weights), vec![3.0; 4]);
        // c's answer to round 1 arrives during round 2: late.
        answer(
            &mut m,
            "c",
            tasks["c"],
            1,
            model(&[9.0; 4], 1.0),
            10,
            t0 + MINUTE,
        );
        assert!(matches!(
            actions(&mut m)[..],
            [Action::Refuse {
                refusal: UpdateRefusal::Late { round: 1 },
                ..
            }]
        ));
    }

    #[test]
    fn a_deadline_with_too_few_answers_retries_the_round_then_fails_naming_the_silent() {
        let t0 = Instant::now();
        let mut m = machine(settings(2));
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m));
        answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
        m.handle_timeout(t0 + MINUTE);
        let acts = actions(&mut m);
        assert!(committed(&acts).is_none());
        let retry = sent(&acts);
        assert_eq!(retry.len(), 3);
        let Some(Action::SendFit { task, .. }) = acts.last() else {
            panic!()
        };
        assert_eq!(task.round, 1, "the same round again");
        assert_eq!(
            conv(&task.weights),
            vec![0.0; 4],
            "from the same global model"
        );
        answer(
            &mut m,
            "b",
            retry["b"],
            1,
            model(&[1.0; 4], 1.0),
            10,
            t0 + MINUTE,
        );
        m.handle_timeout(t0 + 2 * MINUTE);
        let acts = actions(&mut m);
        let Some(Action::Finished(Outcome::Failed { rounds: 0, reason })) = acts.last() else {
            panic!("{acts:?}")
        };
        assert!(
            reason.contains("1 of the 2 answers needed") && reason.contains("no answer from a, c"),
            "{reason}"
        );
    }

    #[test]
    fn a_centre_that_disconnects_mid_round_is_not_waited_for_and_a_stale_disconnect_is_ignored() {
        let t0 = Instant::now();
        let mut m = machine(settings(2));
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m));
        // b reconnects (connection 9); the old connection's end arrives afterwards and changes nothing.
        m.handle(
            Input::Connected {
                center: id("b"),
                connection: 9,
            },
            t0,
        );
        m.handle(
            Input::Disconnected {
                center: id("b"),
                connection: 1,
            },
            t0,
        );
        assert_eq!(m.connected_training(), 3);
        answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
        answer(&mut m, "b", tasks["b"], 1, model(&[1.0; 4], 1.0), 10, t0);
        m.handle(
            Input::Disconnected {
                center: id("c"),
                connection: 3,
            },
            t0,
        );
        let acts = actions(&mut m);
        let record = committed(&acts).expect("no need to wait for the deadline");
        assert_eq!(record.silent, vec![id("c")]);
        assert_eq!(m.connected_training(), 2);
    }

    #[test]
    fn fedprox_sends_mu_and_a_failed_centre_is_recorded() {
        let t0 = Instant::now();
        let mut m = machine(RoundSettings {
            strategy: Strategy::FedProx { mu: 0.01 },
            ..settings(2)
        });
        connect_all(&mut m, t0);
        let acts = actions(&mut m);
        let Action::SendFit { task, .. } = &acts[0] else {
            panic!()
        };
        assert_eq!(task.objective, LocalObjective::Proximal { mu: 0.01 });
        let tasks = sent(&acts);
        m.handle(
            Input::TaskFailed {
                center: id("c"),
                task: tasks["c"],
                reason: "out of memory".into(),
            },
            t0,
        );
        answer(&mut m, "a", tasks["a"], 1, model(&[1.0; 4], 1.0), 10, t0);
        answer(&mut m, "b", tasks["b"], 1, model(&[1.0; 4], 1.0), 10, t0);
        let record = committed(&actions(&mut m)).unwrap();
        assert_eq!(record.refused, vec![(id("c"), "out of memory".to_string())]);
    }

    /// Every check: c misbehaves one way, is told why, and the round commits a and b's mean.
    #[test]
    fn each_check_refuses_the_misbehaving_centre_and_the_round_completes_with_the_honest_mean() {
        type Misbehave =
            fn(&mut Coordinator, &BTreeMap<String, TaskId>, Instant) -> (String, TaskId);
        type Expect = fn(&UpdateRefusal) -> bool;
        let honest = model(&[1.0; 4], 1.0);
        let cases: Vec<(&str, Misbehave, Expect)> = vec![
            (
                "missing tensor",
                |m, t, now| {
                    let w = Weights::from_tensors(model(&[1.0; 4], 1.0).tensors()[..1].to_vec())
                        .unwrap();
                    answer(m, "c", t["c"], 1, w, 10, now);
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::Missing(n) if n == "bn.running_var"),
            ),
            (
                "extra tensor",
                |m, t, now| {
                    let mut v = model(&[1.0; 4], 1.0).tensors().to_vec();
                    v.push(
                        Tensor::from_f32("spy", vec![1], TensorRole::Parameter, &[0.0]).unwrap(),
                    );
                    answer(
                        m,
                        "c",
                        t["c"],
                        1,
                        Weights::from_tensors(v).unwrap(),
                        10,
                        now,
                    );
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::Unexpected(n) if n == "spy"),
            ),
            (
                "shape",
                |m, t, now| {
                    let w = Weights::from_tensors(vec![
                        Tensor::from_f32("conv.weight", vec![4], TensorRole::Parameter, &[1.0; 4])
                            .unwrap(),
                        model(&[1.0; 4], 1.0).tensors()[1].clone(),
                    ])
                    .unwrap();
                    answer(m, "c", t["c"], 1, w, 10, now);
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::Shape { .. }),
            ),
            (
                "dtype",
                |m, t, now| {
                    let w = Weights::from_tensors(vec![
                        Tensor::from_f32_as(
                            "conv.weight",
                            vec![2, 2],
                            TensorRole::Parameter,
                            &[1.0; 4],
                            DType::BF16,
                        )
                        .unwrap(),
                        model(&[1.0; 4], 1.0).tensors()[1].clone(),
                    ])
                    .unwrap();
                    answer(m, "c", t["c"], 1, w, 10, now);
                    ("c".into(), t["c"])
                },
                |r| {
                    matches!(
                        r,
                        UpdateRefusal::DType {
                            got: DType::BF16,
                            ..
                        }
                    )
                },
            ),
            (
                "role",
                |m, t, now| {
                    let w = Weights::from_tensors(vec![
                        model(&[1.0; 4], 1.0).tensors()[0].clone(),
                        Tensor::from_f32("bn.running_var", vec![1], TensorRole::Parameter, &[1.0])
                            .unwrap(),
                    ])
                    .unwrap();
                    answer(m, "c", t["c"], 1, w, 10, now);
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::Role { .. }),
            ),
            (
                "non-finite",
                |m, t, now| {
                    answer(
                        m,
                        "c",
                        t["c"],
                        1,
                        model(&[1.0, f32::NAN, 1.0, 1.0], 1.0),
                        10,
                        now,
                    );
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::NonFinite { index: 1, .. }),
            ),
            (
                "norm bound",
                |m, t, now| {
                    answer(m, "c", t["c"], 1, model(&[100.0; 4], 1.0), 10, now);
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::Norm { .. }),
            ),
            (
                "wrong round",
                |m, t, now| {
                    answer(m, "c", t["c"], 7, model(&[1.0; 4], 1.0), 10, now);
                    ("c".into(), t["c"])
                },
                |r| {
                    matches!(
                        r,
                        UpdateRefusal::WrongRound {
                            got: 7,
                            expected: 1
                        }
                    )
                },
            ),
            (
                "no examples",
                |m, t, now| {
                    answer(m, "c", t["c"], 1, model(&[1.0; 4], 1.0), 0, now);
                    ("c".into(), t["c"])
                },
                |r| matches!(r, UpdateRefusal::NoExamples),
            ),
            (
                "someone else's task",
                |m, t, now| {
                    answer(m, "c", t["a"], 1, model(&[50.0; 4], 1.0), 10, now);
                    ("c".into(), t["a"])
                },
                |r| matches!(r, UpdateRefusal::NotYours { owner } if owner == "a"),
            ),
            (
                "unasked",
                |m, _, now| {
                    let task = m.unsolicited_task();
                    answer(m, "c", task, 1, model(&[50.0; 4], 1.0), 10, now);
                    ("c".into(), task)
                },
                |r| matches!(r, UpdateRefusal::NoTask),
            ),
            (
                "validation centre",
                |m, _, now| {
                    let task = m.unsolicited_task();
                    answer(m, "x", task, 1, model(&[50.0; 4], 1.0), 10, now);
                    ("x".into(), task)
                },
                |r| matches!(r, UpdateRefusal::NotTraining),
            ),
        ];
        for (what, misbehave, expected) in cases {
            let t0 = Instant::now();
            let mut m = machine(settings(2));
            connect_all(&mut m, t0);
            let tasks = sent(&actions(&mut m));
            let (who, task) = misbehave(&mut m, &tasks, t0);
            let acts = actions(&mut m);
            let refusal = acts
                .iter()
                .find_map(|a| match a {
                    Action::Refuse {
                        center,
                        task: t,
                        refusal,
                    } if center.as_str() == who && *t == task => Some(refusal),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{what}: no refusal in {acts:?}"));
            assert!(expected(refusal), "{what}: {refusal}");
            answer(&mut m, "a", tasks["a"], 1, honest.clone(), 10, t0);
            answer(&mut m, "b", tasks["b"], 1, model(&[3.0; 4], 1.0), 30, t0);
            m.handle_timeout(t0 + MINUTE);
            let acts = actions(&mut m);
            let record = committed(&acts).unwrap_or_else(|| panic!("{what}: {acts:?}"));
            assert_eq!(conv(&record.weights), vec![2.5; 4], "{what}");
            assert_eq!(record.contributions.len(), 2, "{what}");
        }
    }

    #[test]
    fn only_the_first_answer_of_a_centre_counts() {
        let t0 = Instant::now();
        let mut m = machine(settings(3));
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m));
        answer(&mut m, "c", tasks["c"], 1, model(&[2.0; 4], 1.0), 10, t0);
        answer(&mut m, "c", tasks["c"], 1, model(&[90.0; 4], 1.0), 10, t0);
        let acts = actions(&mut m);
        assert!(
            matches!(
                acts[..],
                [
                    Action::Accept { .. },
                    Action::Refuse {
                        refusal: UpdateRefusal::Duplicate { round: 1 },
                        ..
                    }
                ]
            ),
            "{acts:?}"
        );
        answer(&mut m, "a", tasks["a"], 1, model(&[2.0; 4], 1.0), 10, t0);
        answer(&mut m, "b", tasks["b"], 1, model(&[2.0; 4], 1.0), 10, t0);
        let acts = actions(&mut m);
        assert_eq!(conv(&committed(&acts).unwrap().weights), vec![2.0; 4]);
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let new = |s: RoundSettings, names: &[&str]| {
            let init = clinical_weights(&[0.0], None);
            Coordinator::new(s, roles(), init, names).err()
        };
        assert_eq!(
            new(settings(4), &[]),
            Some(SetupError::Quorum {
                quorum: 4,
                training: 3
            })
        );
        assert_eq!(new(settings(0), &[]), Some(SetupError::ZeroQuorum));
        assert_eq!(
            new(
                RoundSettings {
                    model: ModelKind::Clinical,
                    ..settings(1)
                },
                &["intercept"]
            ),
            Some(SetupError::ClinicalNeedsNewton("fedavg"))
        );
        assert_eq!(
            new(
                RoundSettings {
                    strategy: Strategy::Newton,
                    ..settings(1)
                },
                &[]
            ),
            Some(SetupError::NewtonNeedsClinical(ModelKind::Mri))
        );
        assert_eq!(
            new(
                RoundSettings {
                    model: ModelKind::Clinical,
                    strategy: Strategy::Newton,
                    ..settings(1)
                },
                &["intercept", "age"]
            ),
            Some(SetupError::Coefficients(2))
        );
    }

    /// Runs a federated Newton machine with these centres' data to its end: the outcome and each committed round.
    fn drive_newton(
        mut m: Coordinator,
        centres: &[(Vec<f64>, Vec<bool>)],
    ) -> (Outcome, Vec<CommittedRound>) {
        let t0 = Instant::now();
        connect_all(&mut m, t0);
        let mut history = Vec::new();
        loop {
            let acts = actions(&mut m);
            history.extend(committed(&acts));
            if let Some(Action::Finished(o)) =
                acts.iter().find(|a| matches!(a, Action::Finished(_)))
            {
                return (o.clone(), history);
            }
            let Some(Action::SendFit { task, to }) = acts
                .iter()
                .rev()
                .find(|a| matches!(a, Action::SendFit { .. }))
            else {
                panic!("{acts:?}")
            };
            assert_eq!(task.objective, LocalObjective::NewtonStep);
            let beta = task.weights.require(COEFFICIENTS).unwrap().to_f64_vec();
            for ((center, tid), (x, y)) in to.iter().zip(centres) {
                let s = logistic_stats(x, y, None, &beta).unwrap();
                let update = NewtonUpdate {
                    gradient: s.gradient,
                    hessian: s.hessian,
                    log_likelihood: s.log_likelihood,
                    fitted_exactly: s.fitted_exactly,
                };
                answer(
                    &mut m,
                    center.as_str(),
                    *tid,
                    task.round,
                    update.to_weights().unwrap(),
                    s.n,
                    t0,
                );
            }
        }
    }

    fn eval_report(round: u32, pos: Vec<u64>, neg: Vec<u64>) -> EvalReport {
        EvalReport {
            round,
            examples: pos.iter().sum::<u64>() + neg.iter().sum::<u64>(),
            positives: pos.iter().sum(),
            loss: 0.5,
            histogram: fedslm_protocol::ScoreHistogram {
                positive: pos,
                negative: neg,
            },
        }
    }

    /// The evaluate tasks of `acts`: (centre, task id, fold) for each.
    fn evaluations(acts: &[Action]) -> Vec<(String, TaskId, Option<Fold>)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::SendEvaluate { task, to } => Some(
                    to.iter()
                        .map(|(c, t)| (c.to_string(), *t, task.fold))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn evaluating(every: u32, rounds: u32) -> RoundSettings {
        RoundSettings {
            rounds,
            fold: Fold::new(1, 5, 3),
            evaluation: EvaluationSettings { bins: 4, every },
            ..settings(3)
        }
    }

    /// Runs round `round` with every training centre answering the same model.
    fn train_round(m: &mut Coordinator, acts: &[Action], round: u32, t: Instant) -> Vec<Action> {
        for (c, task) in sent(acts) {
            answer(m, &c, task, round, model(&[1.0; 4], 1.0), 10, t);
        }
        actions(m)
    }

    #[test]
    fn the_last_round_is_evaluated_everywhere_before_the_run_finishes() {
        let t0 = Instant::now();
        let mut m = machine(evaluating(0, 2));
        connect_all(&mut m, t0);
        let acts = actions(&mut m);
        let Some(Action::SendFit { task, .. }) = acts.last() else {
            panic!("{acts:?}")
        };
        assert_eq!(
            task.fold,
            Fold::new(1, 5, 3),
            "training leaves the fold out"
        );
        let acts = train_round(&mut m, &acts, 1, t0);
        assert!(
            evaluations(&acts).is_empty(),
            "only the last round: {acts:?}"
        );
        let acts = train_round(&mut m, &acts, 2, t0);
        assert!(committed(&acts).is_some());
        assert!(!acts.iter().any(|a| matches!(a, Action::Finished(_))));
        let evals = evaluations(&acts);
        let folds: BTreeMap<String, Option<Fold>> =
            evals.iter().map(|(c, _, f)| (c.clone(), *f)).collect();
        assert_eq!(
            folds["a"],
            Fold::new(1, 5, 3),
            "training centres: their fold"
        );
        assert_eq!(folds["x"], None, "the validator: its whole cohort");
        assert_eq!(folds.len(), 4);
        let task = |c: &str| evals.iter().find(|e| e.0 == c).unwrap().1;
        let report = |m: &mut Coordinator, c: &str, r: EvalReport| {
            m.handle(
                Input::EvalAnswered {
                    center: id(c),
                    task: task(c),
                    report: r,
                },
                t0,
            )
        };
        // A report with the wrong number of bins is refused and the centre counts as missing.
        report(&mut m, "c", eval_report(2, vec![1, 1], vec![1, 1]));
        assert!(matches!(
            actions(&mut m).as_slice(),
            [Action::Refuse {
                refusal: UpdateRefusal::BadReport(_),
                ..
            }]
        ));
        report(
            &mut m,
            "a",
            eval_report(2, vec![0, 0, 1, 2], vec![2, 1, 0, 0]),
        );
        report(
            &mut m,
            "b",
            eval_report(2, vec![0, 1, 0, 1], vec![1, 1, 1, 0]),
        );
        report(
            &mut m,
            "x",
            eval_report(2, vec![0, 0, 0, 3], vec![3, 0, 0, 0]),
        );
        let acts = actions(&mut m);
        let Some(Action::Evaluated(e)) = acts.iter().find(|a| matches!(a, Action::Evaluated(_)))
        else {
            panic!("{acts:?}")
        };
        assert_eq!(e.round, 2);
        assert_eq!(e.centres.len(), 3);
        assert_eq!(e.missing.len(), 1);
        let internal = e.pooled(Role::Train).unwrap();
        assert_eq!((internal.n_positive(), internal.n_negative()), (5, 6));
        assert_eq!(e.pooled(Role::Validate).unwrap().delong().unwrap().auc, 1.0);
        assert!(matches!(
            acts.last(),
            Some(Action::Finished(Outcome::Completed { rounds: 2, .. }))
        ));
    }

    #[test]
    fn evaluation_every_round_and_a_silent_centre_at_the_deadline() {
        let t0 = Instant::now();
        let mut m = machine(evaluating(1, 2));
        connect_all(&mut m, t0);
        let acts = actions(&mut m);
        let acts = train_round(&mut m, &acts, 1, t0);
        let evals = evaluations(&acts);
        assert_eq!(evals.len(), 4, "after round 1 too");
        for (c, task, _) in &evals[..3] {
            m.handle(
                Input::EvalAnswered {
                    center: id(c),
                    task: *task,
                    report: eval_report(1, vec![0, 0, 1, 1], vec![1, 1, 0, 0]),
                },
                t0,
            );
        }
        assert_eq!(m.poll_timeout(), Some(t0 + MINUTE));
        m.handle_timeout(t0 + MINUTE);
        let acts = actions(&mut m);
        assert!(acts.iter().any(|a| matches!(a, Action::Cancel { .. })));
        let Some(Action::Evaluated(e)) = acts.iter().find(|a| matches!(a, Action::Evaluated(_)))
        else {
            panic!("{acts:?}")
        };
        assert_eq!(
            e.missing,
            vec![(id(&evals[3].0), "no report before the deadline".to_string())]
        );
        assert!(matches!(acts.last(), Some(Action::SendFit { task, .. }) if task.round == 2));
    }

    #[test]
    fn a_run_resumed_before_its_last_evaluation_was_stored_evaluates_first() {
        let t0 = Instant::now();
        let saved = model(&[1.0; 4], 1.0);
        let mut m = Coordinator::resume(
            evaluating(0, 2),
            roles(),
            model(&[0.0; 4], 1.0),
            &[],
            Committed {
                round: 2,
                global: saved.clone(),
                newton_history: vec![],
                evaluated: false,
            },
        )
        .unwrap();
        assert!(!m.is_finished());
        connect_all(&mut m, t0);
        let acts = actions(&mut m);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::SendFit { .. })),
            "{acts:?}"
        );
        let evals = evaluations(&acts);
        assert_eq!(evals.len(), 4);
        for (c, task, _) in &evals {
            m.handle(
                Input::EvalAnswered {
                    center: id(c),
                    task: *task,
                    report: eval_report(2, vec![0, 0, 1, 1], vec![1, 1, 0, 0]),
                },
                t0,
            );
        }
        let acts = actions(&mut m);
        assert!(matches!(
            acts.last(),
            Some(Action::Finished(Outcome::Completed { rounds: 2, weights, .. })) if **weights == saved
        ));
        // Evaluated already: it ends at once.
        let done = Coordinator::resume(
            evaluating(0, 2),
            roles(),
            model(&[0.0; 4], 1.0),
            &[],
            Committed {
                round: 2,
                global: saved,
                newton_history: vec![],
                evaluated: true,
            },
        )
        .unwrap();
        assert!(done.is_finished());
    }

    #[test]
    fn a_resumed_fedavg_run_goes_on_from_its_checkpoint_or_ends_at_once() {
        let t0 = Instant::now();
        let saved = model(&[1.0, 2.0, 3.0, 4.0], 2.0);
        let mut m = Coordinator::resume(
            settings(3),
            roles(),
            model(&[0.0; 4], 1.0),
            &[],
            Committed {
                round: 1,
                global: saved.clone(),
                newton_history: vec![],
                evaluated: true,
            },
        )
        .unwrap();
        assert_eq!(m.committed(), 1);
        connect_all(&mut m, t0);
        let acts = actions(&mut m);
        let Some(Action::SendFit { task, .. }) = acts.last() else {
            panic!("{acts:?}")
        };
        assert_eq!(task.round, 2);
        assert_eq!(task.weights, saved);
        assert_eq!(
            task.seed,
            round_seed(7, 2),
            "the uninterrupted run's seed for round 2"
        );

        let mut done = Coordinator::resume(
            settings(3),
            roles(),
            model(&[0.0; 4], 1.0),
            &[],
            Committed {
                round: 2,
                global: saved.clone(),
                newton_history: vec![],
                evaluated: true,
            },
        )
        .unwrap();
        assert!(done.is_finished());
        assert!(matches!(
            actions(&mut done).as_slice(),
            [Action::Finished(Outcome::Completed { rounds: 2, weights, fit: None })] if **weights == saved
        ));

        let other = Weights::from_tensors(vec![Tensor::from_f32(
            "x",
            vec![1],
            TensorRole::Parameter,
            &[0.0],
        )
        .unwrap()])
        .unwrap();
        let err = Coordinator::resume(
            settings(3),
            roles(),
            model(&[0.0; 4], 1.0),
            &[],
            Committed {
                round: 1,
                global: other,
                newton_history: vec![],
                evaluated: true,
            },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("the last checkpoint"), "{err}");
    }

    /// Three centres' patients; the federated Newton fit must be the pooled fit.
    #[test]
    fn federated_newton_reaches_the_pooled_fit() {
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut centres: Vec<(Vec<f64>, Vec<bool>)> = Vec::new();
        for n in [40, 70, 25] {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for _ in 0..n {
                let a = next() * 2.0 - 1.0;
                let b = if next() < 0.4 { 1.0 } else { 0.0 };
                let eta = -0.5 + 1.2 * a + 0.9 * b;
                x.extend([1.0, a, b]);
                y.push(next() < 1.0 / (1.0 + (-eta).exp()));
            }
            centres.push((x, y));
        }
        let names = ["intercept", "a", "b"];
        let pooled_x: Vec<f64> = centres.iter().flat_map(|c| c.0.clone()).collect();
        let pooled_y: Vec<bool> = centres.iter().flat_map(|c| c.1.clone()).collect();
        let pooled = fit_logistic(&names, &pooled_x, &pooled_y, None).unwrap();

        let settings = RoundSettings {
            model: ModelKind::Clinical,
            strategy: Strategy::Newton,
            rounds: 50,
            ..settings(3)
        };
        let m = Coordinator::new(
            settings.clone(),
            roles(),
            clinical_weights(&[0.0; 3], None),
            &names,
        )
        .unwrap();
        let (outcome, history) = drive_newton(m, &centres);
        let rounds = history.len() as u32;
        assert!(rounds >= 4, "{rounds}");
        // Stopped after any committed round and resumed from its record, the run ends exactly the same.
        for k in 1..=rounds {
            let last = &history[k as usize - 1];
            let sums: Vec<LogisticStats> = history[..k as usize]
                .iter()
                .map(|c| c.newton.clone().unwrap())
                .collect();
            let resumed = Coordinator::resume(
                settings.clone(),
                roles(),
                clinical_weights(&[0.0; 3], None),
                &names,
                Committed {
                    round: k,
                    global: (*last.weights).clone(),
                    newton_history: sums.clone(),
                    evaluated: true,
                },
            )
            .unwrap();
            let (again, rest) = drive_newton(resumed, &centres);
            assert_eq!(again, outcome, "resumed after round {k}");
            assert_eq!(rest.len() as u32, rounds - k);
        }
        // A checkpoint that is not where the replayed steps lead is refused.
        let sums: Vec<LogisticStats> = history[..2]
            .iter()
            .map(|c| c.newton.clone().unwrap())
            .collect();
        let err = Coordinator::resume(
            settings.clone(),
            roles(),
            clinical_weights(&[0.0; 3], None),
            &names,
            Committed {
                round: 2,
                global: (*history[0].weights).clone(),
                newton_history: sums.clone(),
                evaluated: true,
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, SetupError::Resume(_)), "{err}");
        let Outcome::Completed {
            fit: Some(fit),
            weights,
            rounds: r,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert_eq!(r, rounds);
        assert_eq!(fit.iterations, pooled.iterations);
        for (a, b) in fit.coefficients.iter().zip(&pooled.coefficients) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(
            weights.require(COEFFICIENTS).unwrap().to_f64_vec(),
            fit.coefficients
        );
        assert_eq!(
            weights.require(COVARIANCE).unwrap().to_f64_vec(),
            fit.covariance
        );
    }

    #[test]
    fn federated_newton_waits_for_every_training_centre() {
        let names = ["intercept"];
        let settings = RoundSettings {
            model: ModelKind::Clinical,
            strategy: Strategy::Newton,
            retries: 0,
            ..settings(2)
        };
        let mut m =
            Coordinator::new(settings, roles(), clinical_weights(&[0.0], None), &names).unwrap();
        let t0 = Instant::now();
        connect_all(&mut m, t0);
        let tasks = sent(&actions(&mut m));
        for c in ["a", "b"] {
            let s = logistic_stats(&[1.0, 1.0], &[true, false], None, &[0.0]).unwrap();
            let u = NewtonUpdate {
                gradient: s.gradient,
                hessian: s.hessian,
                log_likelihood: s.log_likelihood,
                fitted_exactly: 0,
            };
            answer(&mut m, c, tasks[c], 1, u.to_weights().unwrap(), 2, t0);
        }
        m.handle_timeout(t0 + MINUTE);
        let acts = actions(&mut m);
        assert!(
            matches!(acts.last(), Some(Action::Finished(Outcome::Failed { reason, .. })) if reason.contains("2 of the 3 answers needed")),
            "{acts:?}"
        );
    }

    #[test]
    fn with_a_quorum_reached_early_the_round_waits_the_grace_then_starts_without_the_absent() {
        let t0 = Instant::now();
        let mut m = machine(settings(2));
        m.handle(
            Input::Connected {
                center: id("a"),
                connection: 1,
            },
            t0,
        );
        assert_eq!(m.poll_timeout(), None, "below quorum: nothing to time");
        let t1 = t0 + Duration::from_secs(3);
        m.handle(
            Input::Connected {
                center: id("b"),
                connection: 2,
            },
            t1,
        );
        assert!(actions(&mut m).is_empty());
        assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(10)));
        m.handle_timeout(t1 + Duration::from_secs(9));
        assert!(actions(&mut m).is_empty());
        m.handle_timeout(t1 + Duration::from_secs(10));
        let tasks = sent(&actions(&mut m));
        assert_eq!(tasks.keys().collect::<Vec<_>>(), ["a", "b"]);
        // c arrives late: it waits for round 2.
        m.handle(
            Input::Connected {
                center: id("c"),
                connection: 3,
            },
            t1 + Duration::from_secs(11),
        );
        assert!(actions(&mut m).is_empty());

        // Everyone connected at once: no grace.
        let mut m = machine(settings(2));
        connect_all(&mut m, t0);
        assert_eq!(sent(&actions(&mut m)).len(), 3);

        // Quorum lost during the grace: back to waiting.
        let mut m = machine(settings(2));
        m.handle(
            Input::Connected {
                center: id("a"),
                connection: 1,
            },
            t0,
        );
        m.handle(
            Input::Connected {
                center: id("b"),
                connection: 2,
            },
            t0,
        );
        m.handle(
            Input::Disconnected {
                center: id("b"),
                connection: 2,
            },
            t0,
        );
        assert_eq!(m.poll_timeout(), None);
        m.handle_timeout(t0 + MINUTE);
        assert!(actions(&mut m).is_empty());
    }
}
