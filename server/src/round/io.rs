//! What the endpoint tells the machine ([`Input`]) and what the machine asks the endpoint to do ([`Action`],
//! each a command), with the records they carry.

use std::sync::Arc;
use std::time::Duration;

use fedslm_metrics::{LogisticFit, LogisticStats};
use fedslm_protocol::{
    CenterId, EvalReport, EvaluateTask, FitResult, FitTask, PlacementReport, PlacementTask,
    SampleCounts, Weights,
};

use fedslm_protocol::secure::{Secure, SecureBegin};

use super::TaskId;
use crate::aggregate::UpdateRefusal;
use crate::evaluation::Evaluation;

/// What the endpoint tells the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An admitted centre's connection (a reconnection replaces the older one), with the patients its Hello
    /// declared: no update may claim more.
    Connected {
        center: CenterId,
        connection: u64,
        declared: SampleCounts,
    },
    Disconnected {
        center: CenterId,
        connection: u64,
    },
    /// A centre answered task `task` (or sent an update nobody asked for: a task id from
    /// [`super::Coordinator::unsolicited_task`]).
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
    /// A centre answered the paired tests' placement task `task`.
    PlacementAnswered {
        center: CenterId,
        task: TaskId,
        report: PlacementReport,
    },
    /// A step of secure aggregation on task `task`'s stream.
    Secure {
        center: CenterId,
        task: TaskId,
        message: Secure,
    },
    /// A task ended without a result: the centre said it cannot do it, or its stream failed.
    TaskFailed {
        center: CenterId,
        task: TaskId,
        reason: String,
    },
    /// The round asked for by [`Action::CommitRound`] is durable: its checkpoint and record are on disk.
    RoundStored {
        round: u32,
    },
    /// The evaluation asked for by [`Action::StoreEvaluation`] is durable.
    EvaluationStored {
        round: u32,
    },
    /// A commit or an evaluation could not be stored: the run cannot go on.
    StoreFailed {
        reason: String,
    },
}

/// What the endpoint must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `task` to each centre on a fresh stream, as the task ids given.
    SendFit {
        task: Arc<FitTask>,
        to: Vec<(CenterId, TaskId)>,
    },
    /// Send `task` to each centre on a fresh stream, as the task ids given.
    SendEvaluate {
        task: Arc<EvaluateTask>,
        to: Vec<(CenterId, TaskId)>,
    },
    /// Send the paired tests' `task` to each centre on a fresh stream, as the task ids given.
    SendPlacement {
        task: Arc<PlacementTask>,
        to: Vec<(CenterId, TaskId)>,
    },
    /// The tasks named are steps of one secure sum: send `begin` on each task's stream before the task.
    BeginSecure {
        begin: Arc<SecureBegin>,
        tasks: Vec<TaskId>,
    },
    /// Send each secure-aggregation message on its task's stream.
    SendSecure(Vec<(CenterId, TaskId, Secure)>),
    /// Tell the centre its answer to `task` was taken.
    Accept { center: CenterId, task: TaskId },
    /// Tell the centre why its answer to `task` was refused.
    Refuse {
        center: CenterId,
        task: TaskId,
        refusal: UpdateRefusal,
    },
    /// The task's round closed without its answer: drop its stream.
    Cancel { center: CenterId, task: TaskId },
    /// Make the round durable (its checkpoint and record), then say so with [`Input::RoundStored`] or
    /// [`Input::StoreFailed`]. Nothing more comes from the machine until then.
    CommitRound {
        record: RoundRecord,
        weights: Arc<Weights>,
    },
    /// Announce the round: it is durable.
    AnnounceRound(RoundRecord),
    /// Store an evaluation's aggregates with its round, then say so with [`Input::EvaluationStored`] or
    /// [`Input::StoreFailed`].
    StoreEvaluation(Evaluation),
    /// Announce the evaluation: it is durable.
    AnnounceEvaluation(Evaluation),
    /// Record the run's end, then tell every centre.
    Finish(Outcome),
    /// The paired tests' pass is over: each placement task's answer, in the order the tasks were given, or
    /// why there is none; tell every centre.
    FinishPlacements(Vec<PlacementAnswer>),
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
    /// Under secure aggregation, the totals behind the round (the contributions then name the centres
    /// only: their own counts and losses were never seen).
    pub secure: Option<SecureTotals>,
}

/// A securely aggregated round's totals.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecureTotals {
    pub examples: u64,
    /// NaN (JSON null) where not every centre released its loss.
    #[serde(deserialize_with = "crate::store::f64_or_nan")]
    pub train_loss: f64,
}

impl RoundRecord {
    /// The example-weighted mean training loss of the accepted updates.
    pub fn train_loss(&self) -> f64 {
        if let Some(s) = self.secure {
            return s.train_loss;
        }
        weighted_loss(
            self.contributions
                .iter()
                .map(|c| (c.examples, c.train_loss)),
        )
    }

    /// `3 centres, 120 patients, loss 0.5123` (and who was silent or refused).
    pub fn summary(&self) -> String {
        let examples: u64 = match self.secure {
            Some(s) => s.examples,
            None => self.contributions.iter().map(|c| c.examples).sum(),
        };
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

/// Where a stored run stands, for [`super::Coordinator::resume`].
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

/// A placement task's answer: the centre's own sums, or, under secure aggregation, `None` for every centre of
/// a group but one, whose answer is the group's sum; or why there is none.
pub type PlacementAnswer = Result<Option<PlacementReport>, Unanswered>;

/// A task that ended without an answer: whose, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{center}: {reason}")]
pub struct Unanswered {
    pub center: CenterId,
    pub reason: String,
}
