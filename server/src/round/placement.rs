//! The paired tests' second pass as a phase of the machine: once every centre named is connected (or the
//! deadline has passed), each gets its placement task on a fresh stream; the answers come back in the tasks'
//! order, or why there is none, and the pass finishes with them ([`Action::FinishPlacements`]). No rounds, nothing
//! stored: the comparisons are computed from the answers by [`crate::evaluation::paired_comparison`].
//!
//! Under secure aggregation, consecutive tasks that ask the same question (one side of one comparison) form a
//! group: a group of three or more centres is one secure sum, answered by its first survivor's task (the others
//! answer `None`); a centre alone answers in the clear; two are never asked.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedslm_protocol::{CenterId, ModelKind, PlacementReport, PlacementTask, Role, Weights};

use fedslm_secagg::layout::{placement_totals, PLACEMENT_LENGTH};

use super::io::{PlacementAnswer, Unanswered};
use super::secure::SecureSum;
use super::{
    Action, Coordinator, EvaluationSettings, Gone, NormBound, Phase, RoundSettings, Strategy,
    TaskId, TaskSet,
};
use crate::aggregate::UpdateRefusal;

/// Consecutive tasks with the same question, in order.
fn groups(
    queued: Vec<(usize, CenterId, PlacementTask)>,
) -> Vec<Vec<(usize, CenterId, PlacementTask)>> {
    let mut out: Vec<Vec<(usize, CenterId, PlacementTask)>> = Vec::new();
    for q in queued {
        match out.last_mut() {
            Some(g) if g[0].2 == q.2 => g.push(q),
            _ => out.push(vec![q]),
        }
    }
    out
}

/// The second pass: tasks waiting for their centres, tasks out, and the answers so far.
pub(super) struct Placing {
    /// Tasks not yet sent, with their place in the answers.
    queued: Vec<(usize, CenterId, PlacementTask)>,
    pub(super) tasks: TaskSet,
    place: BTreeMap<TaskId, usize>,
    answers: Vec<Option<PlacementAnswer>>,
    /// Under secure aggregation, each group's sum.
    secure: Vec<SecureSum>,
}

impl Placing {
    pub(super) fn secure_sums(&mut self) -> Vec<&mut SecureSum> {
        self.secure.iter_mut().collect()
    }

    /// A centre whose sums are in its group's secure sum: its own answer is `None` until the sum is read.
    pub(super) fn accept_secure(&mut self, task: TaskId, _center: &CenterId) {
        if let Some(&i) = self.place.get(&task) {
            self.answers[i] = Some(Ok(None));
        }
    }

    pub(super) fn note(&mut self, task: TaskId, center: &CenterId, gone: Gone) {
        let why = match gone {
            Gone::Silent => "no answer before the deadline".to_string(),
            Gone::Disconnected => "disconnected".to_string(),
            Gone::Failed(why) | Gone::Refused(why) => why,
        };
        if let Some(&i) = self.place.get(&task) {
            self.answers[i] = Some(Err(Unanswered {
                center: center.clone(),
                reason: why,
            }));
        }
    }

    /// The deadline passed before every centre named connected: the tasks fail unsent, naming who was
    /// missing.
    pub(super) fn expire_unsent(&mut self, connected: &BTreeMap<CenterId, u64>) {
        let missing: Vec<String> = self
            .queued
            .iter()
            .filter(|(_, c, _)| !connected.contains_key(c))
            .map(|(_, c, _)| c.to_string())
            .collect();
        for (i, center, _) in self.queued.drain(..) {
            let why = if connected.contains_key(&center) {
                format!("not sent: {} did not connect in time", missing.join(", "))
            } else {
                "not connected".to_string()
            };
            self.answers[i] = Some(Err(Unanswered {
                center,
                reason: why,
            }));
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.queued.is_empty() && self.tasks.is_done()
    }
}

impl Coordinator {
    /// A machine for the paired tests' second pass over the enrolled `roles`: `tasks` (each for one centre),
    /// answered within `deadline` of `now`.
    pub fn placements(
        roles: BTreeMap<CenterId, Role>,
        tasks: Vec<(CenterId, PlacementTask)>,
        deadline: Duration,
        secure_threshold: Option<usize>,
        now: Instant,
    ) -> Coordinator {
        // Only the deadline applies to this pass: it has no rounds, no model and no quorum.
        let settings = RoundSettings {
            model: ModelKind::Clinical,
            rounds: 0,
            local_epochs: 0,
            learning_rate: 0.0,
            batch_size: 0,
            quorum: 0,
            deadline,
            start_grace: Duration::ZERO,
            retries: 0,
            strategy: Strategy::Newton,
            norm_bound: NormBound::DEFAULT,
            seed: 0,
            fold: None,
            evaluation: EvaluationSettings {
                bins: 0,
                every: 0,
                adapt_batch_norm: false,
            },
            dp: None,
            batch_norm_local: false,
            secure_threshold,
        };
        let answers = vec![None; tasks.len()];
        let queued = tasks
            .into_iter()
            .enumerate()
            .map(|(i, (c, t))| (i, c, t))
            .collect();
        let mut c = Coordinator {
            settings,
            roles,
            connected: BTreeMap::new(),
            declared: BTreeMap::new(),
            examples: BTreeMap::new(),
            global: Arc::new(Weights::default()),
            committed: 0,
            retries: 0,
            phase: Phase::Placing(Box::new(Placing {
                queued,
                tasks: TaskSet::new(now + deadline),
                place: BTreeMap::new(),
                answers,
                secure: Vec::new(),
            })),
            next_task: 1,
            first_task_of_round: 1,
            newton: None,
            actions: VecDeque::new(),
            evaluation_due: None,
            short_since: None,
        };
        c.maybe_close(now);
        c
    }

    /// Sends every queued task once all their centres are connected.
    pub(super) fn maybe_send_placements(&mut self, now: Instant) {
        let Phase::Placing(p) = &self.phase else {
            return;
        };
        if p.queued.is_empty()
            || !p
                .queued
                .iter()
                .all(|(_, c, _)| self.connected.contains_key(c))
        {
            return;
        }
        let Phase::Placing(mut p) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        for group in groups(std::mem::take(&mut p.queued)) {
            let mut sent = Vec::new();
            for (i, center, _) in &group {
                let id = self.new_task();
                p.tasks.add(id, center.clone());
                p.place.insert(id, *i);
                sent.push((center.clone(), id));
            }
            let task = Arc::new(group[0].2.clone());
            if let Some(threshold) = self.settings.secure_threshold.filter(|_| sent.len() > 1) {
                // The group's majority, at least what the run asks of its training centres where it can.
                let t = threshold.min(sent.len()).max(sent.len() / 2 + 1);
                // Fewer than three are refused by the sum itself, saying so.
                match self.start_secure_sum(&mut p.tasks, &sent, t, PLACEMENT_LENGTH, None, now) {
                    Ok(sum) => p.secure.push(sum),
                    Err(why) => {
                        for (center, id) in sent {
                            p.tasks.settle(id, &center);
                            let i = p.place[&id];
                            p.answers[i] = Some(Err(Unanswered {
                                center,
                                reason: format!("not asked: secure aggregation: {why}"),
                            }));
                        }
                        continue;
                    }
                }
            }
            if self.settings.secure_threshold.is_some() {
                self.actions
                    .push_back(Action::SendPlacement { task, to: sent });
            } else {
                for to in sent {
                    self.actions.push_back(Action::SendPlacement {
                        task: task.clone(),
                        to: vec![to],
                    });
                }
            }
        }
        self.phase = Phase::Placing(p);
    }

    /// Takes a centre's placement sums (the paired test checks them against the pooled histograms).
    pub(super) fn take_placement(
        &mut self,
        center: &CenterId,
        task: TaskId,
        report: PlacementReport,
    ) -> Result<(), UpdateRefusal> {
        let stale = self.stale(task);
        let Phase::Placing(p) = &mut self.phase else {
            return Err(stale);
        };
        Coordinator::owned_and_pending(&p.tasks, center, task, 0)?;
        if p.secure.iter().any(|s| s.has(task)) {
            return Err(UpdateRefusal::NotMasked);
        }
        p.tasks.settle(task, center);
        if let Some(&i) = p.place.get(&task) {
            p.answers[i] = Some(Ok(Some(report)));
        }
        Ok(())
    }

    /// Every task answered or failed: the run finishes with the answers.
    pub(super) fn close_placements(&mut self) {
        let Phase::Placing(mut p) = std::mem::replace(&mut self.phase, Phase::Waiting(None)) else {
            return;
        };
        for sum in &p.secure {
            let Some(Ok(v)) = sum.result() else { continue };
            // The group's sum is the answer of its first task whose centre is in it.
            let first = sum
                .tasks()
                .keys()
                .filter_map(|t| p.place.get(t))
                .copied()
                .filter(|i| matches!(p.answers[*i], Some(Ok(None))))
                .min();
            if let (Some(i), Ok(total)) = (first, placement_totals(v)) {
                p.answers[i] = Some(Ok(Some(total)));
            }
        }
        let answers = p
            .answers
            .into_iter()
            .map(|a| a.expect("a finished pass has settled every task"))
            .collect();
        self.phase = Phase::Done;
        self.actions.push_back(Action::FinishPlacements(answers));
    }
}
