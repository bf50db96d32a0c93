//! Training rounds: the fit task to every connected training centre, each answer checked and folded into the
//! round's sum, the round closed into the next global model, committed, and then announced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use fedslm_metrics::{LogisticFit, LogisticStats, NewtonStep};
use fedslm_protocol::clinical::{newton_stats, newton_weights, COEFFICIENTS, COVARIANCE};
use fedslm_protocol::landmarks::{landmarks_of, SEQUENCES};
use fedslm_protocol::{
    CenterId, FitResult, FitTask, LocalObjective, Role, Tensor, TensorRole, Weights,
};

use super::secure::SecureSum;
use super::SecureTotals;
use super::{
    round_seed, Action, Contribution, Coordinator, Gone, Outcome, Phase, RoundRecord, Strategy,
    TaskId, TaskSet,
};
use crate::aggregate::{check_update, FedAvg, UpdateRefusal};
use fedslm_secagg::layout::FitLayout;

/// What a round's accepted answers are folded into.
pub(super) enum Sum {
    Mean(FedAvg),
    /// Each centre's statistics (a few hundred numbers each), summed in centre order when the round closes,
    /// so that the sum does not depend on the order the answers arrived in.
    Newton {
        template: Weights,
        by_centre: BTreeMap<CenterId, LogisticStats>,
    },
}

/// A round whose fit tasks are out.
pub(super) struct Fitting {
    pub(super) round: u32,
    pub(super) started: Instant,
    pub(super) tasks: TaskSet,
    sum: Sum,
    /// How far an update may move this round's global model.
    norm_limit: f64,
    contributions: Vec<Contribution>,
    refused: Vec<(CenterId, String)>,
    silent: Vec<CenterId>,
    /// Under secure aggregation: the round's one sum, and what its vector means.
    secure: Option<(SecureSum, FitLayout)>,
}

impl Fitting {
    pub(super) fn secure_sum(&mut self) -> Option<&mut SecureSum> {
        self.secure.as_mut().map(|(s, _)| s)
    }

    /// A centre whose masked update is in the sum: its own examples and loss are not known.
    pub(super) fn accept_secure(&mut self, center: &CenterId) {
        self.contributions.push(Contribution {
            center: center.clone(),
            examples: 0,
            train_loss: f64::NAN,
        });
    }

    pub(super) fn note(&mut self, center: &CenterId, gone: Gone) {
        match gone {
            Gone::Silent | Gone::Disconnected => self.silent.push(center.clone()),
            Gone::Failed(why) | Gone::Refused(why) => self.refused.push((center.clone(), why)),
        }
    }
}

/// What comes after a committed round (once it is evaluated, where due).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum After {
    NextRound,
    Finish(Outcome),
}

/// A closed round, waiting for the store.
pub(super) struct Committing {
    record: RoundRecord,
    /// Federated Newton: the fit, where this round converged.
    converged: Option<LogisticFit>,
}

impl Committing {
    pub(super) fn round(&self) -> u32 {
        self.record.round
    }
}

impl Coordinator {
    /// Sends the round's fit task to every connected training centre.
    pub(super) fn start_round(&mut self, now: Instant) {
        let round = self.committed + 1;
        self.first_task_of_round = self.next_task;
        let mut tasks = TaskSet::new(now + self.settings.deadline);
        let mut to = Vec::new();
        let training: Vec<CenterId> = self
            .connected
            .keys()
            .filter(|c| self.roles.get(*c) == Some(&Role::Train))
            .cloned()
            .collect();
        for center in training {
            let id = self.new_task();
            tasks.add(id, center.clone());
            to.push((center, id));
        }
        let objective = match self.settings.strategy {
            Strategy::FedAvg => LocalObjective::Plain,
            Strategy::FedProx { mu } => LocalObjective::Proximal { mu },
            Strategy::Newton => LocalObjective::NewtonStep,
            Strategy::Landmarks => LocalObjective::Landmarks,
        };
        let sum = match &self.newton {
            Some(solver) => {
                let p = solver.point().len();
                Sum::Newton {
                    template: newton_weights(&LogisticStats::zeros(p))
                        .expect("zeros of the coefficients' own shape encode"),
                    by_centre: BTreeMap::new(),
                }
            }
            None => Sum::Mean(FedAvg::keeping(
                &self.global,
                self.settings.keeps_batch_norm_local(),
            )),
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
            keep_batch_norm_local: self.settings.keeps_batch_norm_local(),
            dp: self.settings.dp.map(|d| d.task(self.settings.strategy)),
        };
        tracing::info!(
            round,
            centers = to.len(),
            retry = self.retries,
            "round started"
        );
        let norm_limit = self.settings.norm_bound.limit(&self.global);
        let mut secure = None;
        if let Some(threshold) = self.settings.secure_threshold {
            let layout = match FitLayout::of(&task) {
                Ok(l) => l,
                Err(e) => return self.finish_failed(format!("round {round}: {e}")),
            };
            // Landmarks are no step from the global model: no norm bounds them (their sum is checked instead).
            let bounded = self.newton.is_none() && self.settings.strategy != Strategy::Landmarks;
            let norm = (bounded && norm_limit.is_finite()).then_some(norm_limit);
            match self.start_secure_sum(&mut tasks, &to, threshold, layout.length(), norm, now) {
                Ok(sum) => secure = Some((sum, layout)),
                Err(e) => {
                    return self.finish_failed(format!("round {round}: secure aggregation: {e}"))
                }
            }
        }
        self.phase = Phase::Fitting(Box::new(Fitting {
            round,
            started: now,
            tasks,
            sum,
            norm_limit,
            contributions: Vec::new(),
            refused: Vec::new(),
            silent: Vec::new(),
            secure,
        }));
        self.actions.push_back(Action::SendFit {
            task: Arc::new(task),
            to,
        });
    }

    /// Every check of an answer, in order; folds it in when all pass.
    pub(super) fn take_fit(
        &mut self,
        center: &CenterId,
        task: TaskId,
        result: FitResult,
    ) -> Result<(), UpdateRefusal> {
        if self.roles.get(center) != Some(&Role::Train) {
            return Err(UpdateRefusal::NotTraining);
        }
        if self.settings.secure_threshold.is_some() {
            return Err(UpdateRefusal::NotMasked);
        }
        let stale = self.stale(task);
        let first_of_round = self.first_task_of_round;
        let Phase::Fitting(f) = &mut self.phase else {
            return Err(stale);
        };
        if f.tasks.owner(task).is_none() {
            return Err(if task < first_of_round {
                UpdateRefusal::Late {
                    round: f.round.saturating_sub(1),
                }
            } else {
                UpdateRefusal::NoTask
            });
        }
        Coordinator::owned_and_pending(&f.tasks, center, task, f.round)?;
        if result.round != f.round {
            return Err(UpdateRefusal::WrongRound {
                got: result.round,
                expected: f.round,
            });
        }
        if result.examples == 0 {
            return Err(UpdateRefusal::NoExamples);
        }
        // No centre outweighs the others by claiming more patients than it declared, or other patients
        // than it trained on before (the same fold every round).
        let declared = self.declared.get(center).map_or(0, |d| {
            if self.settings.model.is_network() {
                d.with_images
            } else {
                d.patients
            }
        });
        if result.examples > declared {
            return Err(UpdateRefusal::MoreExamplesThanDeclared {
                claimed: result.examples,
                declared,
            });
        }
        if let Some(&earlier) = self.examples.get(center) {
            if earlier != result.examples {
                return Err(UpdateRefusal::ExamplesChanged {
                    claimed: result.examples,
                    earlier,
                });
            }
        }
        // Under differential privacy the loss is not released: NaN says so.
        let unreleased = self.settings.dp.is_some() && result.train_loss.is_nan();
        if !result.train_loss.is_finite() && !unreleased {
            return Err(UpdateRefusal::NonFiniteLoss(result.train_loss));
        }
        match &mut f.sum {
            Sum::Mean(avg) if self.settings.strategy == Strategy::Landmarks => {
                // Landmarks are no step from the global model: each sequence's own scale instead.
                check_update(&self.global, &result.weights, None)?;
                plausible_landmarks(&result.weights).map_err(UpdateRefusal::Landmarks)?;
                avg.fold(&result.weights, result.examples)?;
            }
            Sum::Mean(avg) => {
                check_update(&self.global, &result.weights, Some(f.norm_limit))?;
                avg.fold(&result.weights, result.examples)?;
            }
            Sum::Newton {
                template,
                by_centre,
            } => {
                // The same tensors as the template: names, shapes, dtypes and finite values checked.
                check_update(template, &result.weights, None)?;
                let local = newton_stats(&result.weights, result.examples)
                    .map_err(|e| UpdateRefusal::NewtonStatistics(e.to_string()))?;
                plausible(&local).map_err(UpdateRefusal::NewtonStatistics)?;
                by_centre.insert(center.clone(), local);
            }
        }
        f.tasks.settle(task, center);
        self.examples.insert(center.clone(), result.examples);
        f.contributions.push(Contribution {
            center: center.clone(),
            examples: result.examples,
            train_loss: result.train_loss,
        });
        Ok(())
    }

    /// Closes the round: with enough answers, the next global model, to be committed; with too few, the
    /// round again (or the run fails).
    pub(super) fn close_round(&mut self, now: Instant) {
        let Phase::Fitting(f) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        let f = *f;
        let required = if self.newton.is_some() {
            self.training()
        } else {
            self.settings.quorum
        };
        if f.contributions.len() < required {
            self.retries += 1;
            let why = format!(
                "round {}: {} of the {required} answers needed{}{}",
                f.round,
                f.contributions.len(),
                if f.silent.is_empty() {
                    String::new()
                } else {
                    format!("; no answer from {}", join(&f.silent))
                },
                if f.refused.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; refused: {}",
                        f.refused
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
        let mut secure_totals = None;
        // Federated Newton through a secure sum: the total statistics (no centre's own were seen).
        let mut secure_stats = None;
        let mut sum = f.sum;
        if let Some((mut secure, layout)) = f.secure {
            let folded = match secure.take_result() {
                Some(Ok(v)) => fold_secure(&mut sum, &layout, &v).map(|(totals, stats)| {
                    secure_totals = Some(totals);
                    secure_stats = stats;
                }),
                Some(Err(e)) => Err(e),
                None => Err("the round's deadline passed".into()),
            };
            if let Err(e) = folded {
                return self.finish_failed(format!("round {}: secure aggregation: {e}", f.round));
            }
        }
        match sum {
            Sum::Mean(avg) => match avg.finish() {
                Ok(Some(w)) if self.settings.strategy == Strategy::Landmarks => {
                    // Through secure sums no centre's landmarks were seen: their mean must still be a scale.
                    if let Err(e) = plausible_landmarks(&w) {
                        return self.finish_failed(format!(
                            "round {}: the centres' mean landmarks are no intensity scale: {e}",
                            f.round
                        ));
                    }
                    self.global = Arc::new(w);
                }
                Ok(Some(w)) => self.global = Arc::new(w),
                Ok(None) => {
                    return self.finish_failed(format!("round {}: nothing to average", f.round))
                }
                Err(e) => return self.finish_failed(format!("round {}: {e}", f.round)),
            },
            Sum::Newton { by_centre, .. } => {
                let p = self.newton.as_ref().map_or(0, |s| s.point().len());
                let mut stats = LogisticStats::zeros(p);
                let parts = secure_stats.iter().chain(by_centre.values());
                for local in parts {
                    if let Err(e) = stats.add(local) {
                        return self
                            .finish_failed(format!("federated Newton at round {}: {e}", f.round));
                    }
                }
                log_likelihood = Some(stats.log_likelihood);
                newton = Some(stats.clone());
                let solver = self
                    .newton
                    .as_mut()
                    .expect("a Newton sum is made only where the run has a solver");
                match observe(solver, &self.settings, stats, f.round) {
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
                            .finish_failed(format!("federated Newton at round {}: {e}", f.round))
                    }
                }
            }
        }
        let record = RoundRecord {
            round: f.round,
            retries: std::mem::take(&mut self.retries),
            contributions: f.contributions,
            refused: f.refused,
            silent: f.silent,
            duration: now.saturating_duration_since(f.started),
            log_likelihood,
            newton,
            secure: secure_totals,
        };
        self.actions.push_back(Action::CommitRound {
            record: record.clone(),
            weights: self.global.clone(),
        });
        // The round's tasks are closed: an answer to one now is late.
        self.first_task_of_round = self.next_task;
        self.phase = Phase::Committing(Box::new(Committing { record, converged }));
    }

    /// The store says round `round` is durable: announce it, then evaluate, go on, or finish.
    pub(super) fn round_stored(&mut self, round: u32, now: Instant) {
        let Phase::Committing(c) = &self.phase else {
            return;
        };
        if c.record.round != round {
            return;
        }
        let Phase::Committing(c) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        let Committing { record, converged } = *c;
        self.committed = record.round;
        self.actions.push_back(Action::AnnounceRound(record));
        let after = self.after_commit(converged);
        if self.evaluation_due(&after) {
            self.evaluate(now, after);
        } else {
            self.proceed(now, after);
        }
    }

    /// What follows the round just committed: the next round, or the run's end.
    pub(super) fn after_commit(&self, converged: Option<LogisticFit>) -> After {
        if let Some(fit) = converged {
            After::Finish(Outcome::Completed {
                rounds: self.committed,
                weights: self.global.clone(),
                fit: Some(fit),
            })
        } else if self.committed >= self.settings.rounds {
            if self.newton.is_some() {
                After::Finish(Outcome::Failed {
                    rounds: self.committed,
                    reason: format!(
                        "federated Newton did not converge within {} rounds; raise rounds",
                        self.settings.rounds
                    ),
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
}

/// Folds an unmasked secure sum into the round's FedAvg sum, or reads the Newton statistics out of it, which
/// the server checks as it would one centre's (it cannot check each centre's); with the examples and mean loss.
fn fold_secure(
    sum: &mut Sum,
    layout: &FitLayout,
    v: &[f64],
) -> Result<(SecureTotals, Option<LogisticStats>), String> {
    let (flat, examples, train_loss) = layout.split(v).map_err(|e| e.to_string())?;
    let totals = SecureTotals {
        examples,
        train_loss,
    };
    match sum {
        Sum::Mean(avg) => {
            avg.fold_sum(flat, examples).map_err(|e| e.to_string())?;
            Ok((totals, None))
        }
        Sum::Newton { template, .. } => {
            let sums = layout.totals(v).map_err(|e| e.to_string())?.sums;
            check_update(template, &sums, None).map_err(|e| e.to_string())?;
            let stats = newton_stats(&sums, examples).map_err(|e| e.to_string())?;
            plausible(&stats)
                .map_err(|e| format!("the Newton statistics cannot be summed: {e}"))?;
            Ok((totals, Some(stats)))
        }
    }
}

/// Whether a centre's Newton statistics are ones `n` patients can have made. The clinical model's covariates
/// are the intercept and 0/1 indicators (DESIGN.md §5), so each gradient entry, a sum of `x (y - p)`, lies
/// within `[-n, n]`, each Hessian entry, a sum of `x x' p (1 - p)`, within `[0, n / 4]` on the diagonal and
/// `[-n / 4, n / 4]` off it, and the log-likelihood is at most 0.
fn plausible(s: &LogisticStats) -> Result<(), String> {
    let n = s.n as f64;
    let tolerance = 1e-9 * n.max(1.0);
    if let Some(g) = s.gradient.iter().find(|g| g.abs() > n + tolerance) {
        return Err(format!("a gradient entry of {g:e} from {} patients", s.n));
    }
    let p = s.gradient.len();
    for (i, h) in s.hessian.iter().enumerate() {
        let diagonal = i / p.max(1) == i % p.max(1);
        let low = if diagonal {
            -tolerance
        } else {
            -n / 4.0 - tolerance
        };
        if *h < low || *h > n / 4.0 + tolerance {
            return Err(format!("a Hessian entry of {h:e} from {} patients", s.n));
        }
    }
    if s.log_likelihood > tolerance || s.fitted_exactly > s.n {
        return Err(format!(
            "a log-likelihood of {} with {} of {} patients fitted exactly",
            s.log_likelihood, s.fitted_exactly, s.n
        ));
    }
    Ok(())
}

/// One observation of the Newton solver: in the clear with step-halving until it converges; under
/// differential privacy (noised statistics) every step taken whole, and the fit stated at the run's last round.
pub(super) fn observe(
    solver: &mut fedslm_metrics::NewtonSolver,
    settings: &super::RoundSettings,
    stats: LogisticStats,
    round: u32,
) -> Result<NewtonStep, fedslm_metrics::LogisticError> {
    match settings.dp {
        None => solver.observe(stats),
        Some(_) => solver.observe_noised(stats, round >= settings.rounds),
    }
}

/// The clinical model's weights at `beta`; the covariance is zero until the fit has converged.
pub(super) fn clinical_weights(beta: &[f64], covariance: Option<&[f64]>) -> Weights {
    let p = beta.len();
    let zeros = vec![0.0; p * p];
    let tensors = vec![
        Tensor::from_f64(COEFFICIENTS, vec![p], TensorRole::Parameter, beta)
            .expect("p coefficients fill a [p] tensor"),
        Tensor::from_f64(
            COVARIANCE,
            vec![p, p],
            TensorRole::Parameter,
            covariance.unwrap_or(&zeros),
        )
        .expect("a p x p covariance fills a [p, p] tensor"),
    ];
    Weights::from_tensors(tensors).expect("two tensors of different names")
}

fn join(centers: &[CenterId]) -> String {
    centers
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A centre's landmarks as `fedslm_cohort::landmarks` makes them: each sequence from 0 (its 1st percentile) to
/// 1 (its 99th), never decreasing.
fn plausible_landmarks(w: &Weights) -> Result<(), String> {
    let landmarks = landmarks_of(w).map_err(|e| e.to_string())?;
    for (name, l) in SEQUENCES.iter().zip(&landmarks) {
        let ends = l[0] == 0.0 && l[10] == 1.0;
        if !ends || l.windows(2).any(|p| p[0] > p[1]) {
            return Err(format!("{name} {l:?} does not rise from 0 to 1"));
        }
    }
    Ok(())
}
