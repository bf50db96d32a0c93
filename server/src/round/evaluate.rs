//! Evaluation rounds: the committed model to every connected centre (training centres evaluate the run's
//! held-out fold, or all their patients; validation centres their whole cohort), the reports checked and
//! pooled, the evaluation stored, and then announced.

use std::sync::Arc;
use std::time::Instant;

use fedslm_protocol::{CenterId, EvalReport, EvaluateTask, Role};
use fedslm_secagg::layout::EvalLayout;

use super::fit::After;
use super::secure::SecureSum;
use super::settings::Strategy;
use super::{Action, Coordinator, Gone, Outcome, Phase, TaskId, TaskSet};
use crate::aggregate::UpdateRefusal;
use crate::evaluation::{check_report, CenterEvaluation, Evaluation, SecureEvaluation};

/// An evaluation whose tasks are out.
pub(super) struct Evaluating {
    round: u32,
    pub(super) tasks: TaskSet,
    centers: Vec<CenterEvaluation>,
    /// Under secure aggregation: each side of three or more centres, summed.
    secure: Vec<SecureSide>,
    missing: Vec<(CenterId, String)>,
    after: After,
}

/// One side's secure sum.
struct SecureSide {
    role: Role,
    sum: SecureSum,
    layout: EvalLayout,
    survivors: Vec<CenterId>,
}

impl Evaluating {
    pub(super) fn secure_sums(&mut self) -> Vec<&mut SecureSum> {
        self.secure.iter_mut().map(|s| &mut s.sum).collect()
    }

    pub(super) fn accept_secure(&mut self, task: TaskId, center: &CenterId) {
        if let Some(side) = self.secure.iter_mut().find(|s| s.sum.has(task)) {
            side.survivors.push(center.clone());
        }
    }

    /// Whether `task` is in a secure sum.
    fn is_secure(&self, task: TaskId) -> bool {
        self.secure.iter().any(|s| s.sum.has(task))
    }

    pub(super) fn note(&mut self, center: &CenterId, gone: Gone) {
        let why = match gone {
            Gone::Silent => "no report before the deadline".to_string(),
            Gone::Disconnected => "disconnected".to_string(),
            Gone::Failed(why) | Gone::Refused(why) => why,
        };
        self.missing.push((center.clone(), why));
    }
}

/// A closed evaluation, waiting for the store.
pub(super) struct StoringEvaluation {
    evaluation: Evaluation,
    after: After,
}

impl Coordinator {
    /// Whether the model committed at this round is evaluated before `after`.
    pub(super) fn evaluation_due(&self, after: &After) -> bool {
        let ev = self.settings.evaluation;
        // Landmarks are no model to score.
        self.settings.strategy != Strategy::Landmarks
            && ev.bins > 0
            && (matches!(after, After::Finish(Outcome::Completed { .. }))
                || ev.every > 0 && self.committed.is_multiple_of(ev.every))
    }

    /// Sends the committed model to every connected centre for evaluation.
    pub(super) fn evaluate(&mut self, now: Instant, after: After) {
        let round = self.committed;
        self.first_task_of_round = self.next_task;
        let mut tasks = TaskSet::new(now + self.settings.deadline);
        let (mut training, mut validating) = (Vec::new(), Vec::new());
        let connected: Vec<CenterId> = self.connected.keys().cloned().collect();
        for center in connected {
            let id = self.new_task();
            tasks.add(id, center.clone());
            match self.roles.get(&center) {
                Some(Role::Train) => training.push((center, id)),
                _ => validating.push((center, id)),
            }
        }
        let mut missing: Vec<(CenterId, String)> = self
            .roles
            .keys()
            .filter(|c| !self.connected.contains_key(*c))
            .map(|c| (c.clone(), "not connected".to_string()))
            .collect();
        let mut secure = Vec::new();
        if let Some(threshold) = self.settings.secure_threshold {
            let layout = EvalLayout {
                bins: self.settings.evaluation.bins,
            };
            for (role, side) in [
                (Role::Train, &mut training),
                (Role::Validate, &mut validating),
            ] {
                // One centre's own evaluation is the figure reported for it: it goes in the clear.
                if side.len() < 2 {
                    continue;
                }
                let t = match role {
                    Role::Train => threshold,
                    Role::Validate => side.len() / 2 + 1,
                };
                // Fewer than three are refused by the sum itself, saying so.
                match self.start_secure_sum(&mut tasks, side, t, layout.length(), None, now) {
                    Ok(sum) => {
                        secure.push(SecureSide {
                            role,
                            sum,
                            layout,
                            survivors: Vec::new(),
                        });
                    }
                    Err(why) => {
                        // Never in the clear: these centres are not asked.
                        for (c, t) in side.drain(..) {
                            tasks.settle(t, &c);
                            missing.push((c, format!("secure aggregation: {why}")));
                        }
                    }
                }
            }
        }
        let task = EvaluateTask {
            round,
            model: self.settings.model,
            weights: (*self.global).clone(),
            fold: None,
            histogram_bins: self.settings.evaluation.bins,
            histogram_noise: self.settings.dp.map(|d| d.noise_multiplier),
            adapt_batch_norm: false,
        };
        tracing::info!(round, centers = tasks.len(), "evaluation started");
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
                task: Arc::new(EvaluateTask {
                    adapt_batch_norm: self.settings.adapts_batch_norm(),
                    ..task
                }),
                to: validating,
            });
        }
        self.phase = Phase::Evaluating(Box::new(Evaluating {
            round,
            tasks,
            centers: Vec::new(),
            secure,
            missing,
            after,
        }));
        self.maybe_close(now);
    }

    /// The checks of an evaluation report; takes it in when they pass.
    pub(super) fn take_report(
        &mut self,
        center: &CenterId,
        task: TaskId,
        report: EvalReport,
    ) -> Result<(), UpdateRefusal> {
        let stale = self.stale(task);
        let adapted_batch_norm = self.adapts_batch_norm(center);
        let Phase::Evaluating(e) = &mut self.phase else {
            return Err(stale);
        };
        Coordinator::owned_and_pending(&e.tasks, center, task, e.round)?;
        if e.is_secure(task) {
            return Err(UpdateRefusal::NotMasked);
        }
        let histogram = check_report(
            &report,
            e.round,
            self.settings.evaluation.bins,
            self.settings.dp.is_some(),
        )?;
        e.tasks.settle(task, center);
        e.centers.push(CenterEvaluation {
            center: center.clone(),
            role: self.roles.get(center).copied().unwrap_or(Role::Validate),
            examples: report.examples,
            positives: report.positives,
            loss: report.loss,
            histogram,
            adapted_batch_norm,
        });
        Ok(())
    }

    /// Whether `center` is asked to recompute batch-norm statistics before scoring: a validating centre, where
    /// the run says so (AdaBN).
    fn adapts_batch_norm(&self, center: &CenterId) -> bool {
        self.settings.adapts_batch_norm() && self.roles.get(center) != Some(&Role::Train)
    }

    /// Closes the evaluation: its aggregates go to the store.
    pub(super) fn close_evaluation(&mut self) {
        let Phase::Evaluating(e) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        let e = *e;
        let mut missing = e.missing;
        let mut secure = Vec::new();
        for side in e.secure {
            let summed = match side.sum.result() {
                Some(Ok(v)) => side
                    .layout
                    .totals(e.round, v)
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        check_report(
                            &r,
                            e.round,
                            self.settings.evaluation.bins,
                            self.settings.dp.is_some(),
                        )
                        .map(|h| (r, h))
                        .map_err(|e| e.to_string())
                    }),
                Some(Err(why)) => Err(why.clone()),
                None => Err("no sum before the deadline".into()),
            };
            match summed {
                Ok((report, histogram)) => secure.push(SecureEvaluation {
                    role: side.role,
                    own_auc: side.sum.own_auc(),
                    centers: side.survivors,
                    examples: report.examples,
                    positives: report.positives,
                    loss: report.loss,
                    histogram,
                }),
                Err(why) => {
                    tracing::warn!(round = e.round, side = %side.role, %why, "secure evaluation sum failed");
                    for c in side.sum.tasks().values() {
                        if !missing.iter().any(|(m, _)| m == c) {
                            missing.push((c.clone(), format!("secure sum: {why}")));
                        }
                    }
                }
            }
        }
        let evaluation = Evaluation {
            round: e.round,
            fold: self.settings.fold,
            bins: self.settings.evaluation.bins,
            centers: e.centers,
            secure,
            missing,
        };
        self.actions
            .push_back(Action::StoreEvaluation(evaluation.clone()));
        // The evaluation's tasks are closed: a report now is late.
        self.first_task_of_round = self.next_task;
        self.phase = Phase::StoringEvaluation(Box::new(StoringEvaluation {
            evaluation,
            after: e.after,
        }));
    }

    /// The store says the evaluation of `round` is durable: announce it, then go on or finish.
    pub(super) fn evaluation_stored(&mut self, round: u32, now: Instant) {
        let Phase::StoringEvaluation(s) = &self.phase else {
            return;
        };
        if s.evaluation.round != round {
            return;
        }
        let Phase::StoringEvaluation(s) = std::mem::replace(&mut self.phase, Phase::Waiting(None))
        else {
            return;
        };
        let StoringEvaluation { evaluation, after } = *s;
        self.actions
            .push_back(Action::AnnounceEvaluation(evaluation));
        self.proceed(now, after);
    }
}
