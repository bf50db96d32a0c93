//! Secure aggregation inside a phase: one [`Collector`] per sum with its participants' tasks, and the
//! deadline of its current step. Each step closes when every live participant has answered or its deadline
//! passes; the phase reads the unmasked sum (or why there is none) when the last step closes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fedslm_protocol::secure::{Secure, SecureBegin, SUM_ID_LEN};
use fedslm_protocol::CenterId;
use fedslm_secagg::collector::Stage;
use fedslm_secagg::fixed::FixedPoint;
use fedslm_secagg::{Collector, SecureError};

use super::TaskId;

/// Steps of a sum after the first, each with its own deadline: shares, masked inputs, survivors' signatures,
/// revealed shares.
const LATER_STEPS: u32 = 4;

/// One secure sum of a phase.
pub(crate) struct SecureSum {
    collector: Collector,
    tasks: BTreeMap<TaskId, CenterId>,
    /// How long each step waits.
    step: Duration,
    deadline: Instant,
    result: Option<Result<Vec<f64>, String>>,
}

/// The longest a phase with secure sums may take: a step's deadline for each of its steps.
fn phase_deadline(now: Instant, step: Duration) -> Instant {
    now + step * (LATER_STEPS + 1)
}

/// A fresh sum id from the operating system's generator.
fn sum_id() -> Result<[u8; SUM_ID_LEN], String> {
    let r = fedslm_secagg::crypto::random32().map_err(|e| e.to_string())?;
    let mut id = [0u8; SUM_ID_LEN];
    id.copy_from_slice(&r[..SUM_ID_LEN]);
    Ok(id)
}

impl SecureSum {
    /// A sum over the centres of `tasks` (three or more), `threshold` of which must stay, of `length`
    /// elements, in the one fixed point every kind of sum uses; returns it with the Begin message its tasks
    /// are sent after.
    fn new(
        tasks: BTreeMap<TaskId, CenterId>,
        threshold: usize,
        length: u64,
        norm_bound: Option<f64>,
        step: Duration,
        now: Instant,
    ) -> Result<(SecureSum, SecureBegin), String> {
        let fixed = FixedPoint::DEFAULT;
        let mut participants: Vec<CenterId> = tasks.values().cloned().collect();
        participants.sort();
        let begin = SecureBegin {
            sum: sum_id()?,
            participants,
            threshold: threshold as u32,
            length,
            scale_bits: fixed.scale_bits,
            bound: fixed.bound,
            norm_bound,
        };
        let collector = Collector::new(begin.clone()).map_err(|e| e.to_string())?;
        Ok((
            SecureSum {
                collector,
                tasks,
                step,
                deadline: now + step,
                result: None,
            },
            begin,
        ))
    }

    pub(crate) fn has(&self, task: TaskId) -> bool {
        self.tasks.contains_key(&task)
    }

    /// The sum's tasks, with their centres.
    pub(crate) fn tasks(&self) -> &BTreeMap<TaskId, CenterId> {
        &self.tasks
    }

    fn task_of(&self, center: &CenterId) -> Option<TaskId> {
        self.tasks
            .iter()
            .find(|(_, c)| *c == center)
            .map(|(t, _)| *t)
    }

    /// When the current step closes; `None` once the sum is over.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.result.is_none().then_some(self.deadline)
    }

    /// The unmasked sum, or why there is none, once the last step has closed.
    pub(crate) fn result(&self) -> Option<&Result<Vec<f64>, String>> {
        self.result.as_ref()
    }

    /// The AUCs the survivors released of their own patients (evaluations), by centre: each came with a
    /// masked input.
    pub(crate) fn own_auc(&self) -> Vec<(CenterId, f64)> {
        self.collector
            .own_auc()
            .iter()
            .map(|(c, a)| (c.clone(), *a))
            .collect()
    }

    /// Takes the unmasked sum out (the phase closing): its memory goes with it.
    pub(crate) fn take_result(&mut self) -> Option<Result<Vec<f64>, String>> {
        self.result.take()
    }

    /// Whether `center`'s input is in the sum (it sent its masked input).
    pub(crate) fn survived(&self, center: &CenterId) -> bool {
        self.collector.survivors().contains(center)
    }

    /// `center`'s message on its task; what to send next, if the step closed. A refused message is the error:
    /// the caller then takes the centre out of the sum ([`SecureSum::gone`]).
    pub(crate) fn take(
        &mut self,
        center: &CenterId,
        msg: Secure,
        now: Instant,
    ) -> Result<Vec<(CenterId, TaskId, Secure)>, SecureError> {
        self.collector.take(center, msg)?;
        Ok(self.close_if_answered(now))
    }

    /// `center` is gone (disconnected, failed, refused); what to send next, if the step closed.
    pub(crate) fn gone(
        &mut self,
        center: &CenterId,
        now: Instant,
    ) -> Vec<(CenterId, TaskId, Secure)> {
        self.collector.gone(center);
        self.close_if_answered(now)
    }

    /// The step's deadline has passed: it closes with the answers it has.
    pub(crate) fn timeout(&mut self, now: Instant) -> Vec<(CenterId, TaskId, Secure)> {
        if self.result.is_some() || now < self.deadline {
            return Vec::new();
        }
        let mut out = self.close(now);
        out.extend(self.close_if_answered(now));
        out
    }

    fn close_if_answered(&mut self, now: Instant) -> Vec<(CenterId, TaskId, Secure)> {
        let mut out = Vec::new();
        while self.result.is_none() && self.collector.waiting().is_empty() {
            out.extend(self.close(now));
        }
        out
    }

    /// Closes the current step.
    fn close(&mut self, now: Instant) -> Vec<(CenterId, TaskId, Secure)> {
        if self.collector.stage() == Stage::Reveal {
            self.result = Some(self.collector.unmask().map_err(|e| e.to_string()));
            return Vec::new();
        }
        match self.collector.advance() {
            Ok(next) => {
                self.deadline = now + self.step;
                next.into_iter()
                    .filter_map(|(c, m)| self.task_of(&c).map(|t| (c, t, m)))
                    .collect()
            }
            Err(e) => {
                self.result = Some(Err(e.to_string()));
                Vec::new()
            }
        }
    }
}

use super::{Action, Coordinator, Gone, Phase, TaskSet};
use crate::aggregate::UpdateRefusal;

impl Phase {
    /// The secure sums of a phase that has some.
    pub(super) fn secure_sums(&mut self) -> Vec<&mut SecureSum> {
        match self {
            Phase::Fitting(f) => f.secure_sum().into_iter().collect(),
            Phase::Evaluating(e) => e.secure_sums(),
            Phase::Placing(p) => p.secure_sums(),
            _ => Vec::new(),
        }
    }
}

impl Coordinator {
    /// A secure sum over the tasks `to` of a phase (each centre with its task), `threshold` of which must
    /// stay, of `length` elements: the tasks are sent after its Begin, and the phase's `tasks` wait for every
    /// step of the sum.
    pub(super) fn start_secure_sum(
        &mut self,
        tasks: &mut TaskSet,
        to: &[(CenterId, TaskId)],
        threshold: usize,
        length: u64,
        norm_bound: Option<f64>,
        now: Instant,
    ) -> Result<SecureSum, String> {
        let step = self.settings.deadline;
        let ids = to.iter().map(|(c, t)| (*t, c.clone())).collect();
        let (sum, begin) = SecureSum::new(ids, threshold, length, norm_bound, step, now)?;
        self.actions.push_back(Action::BeginSecure {
            begin: std::sync::Arc::new(begin),
            tasks: to.iter().map(|(_, t)| *t).collect(),
        });
        tasks.deadline = tasks.deadline.max(phase_deadline(now, step));
        Ok(sum)
    }

    /// A step of secure aggregation from `center` on `task`.
    pub(super) fn take_secure(
        &mut self,
        center: CenterId,
        task: TaskId,
        msg: Secure,
        now: Instant,
    ) {
        let stale = self.stale(task);
        let mut sums = self.phase.secure_sums();
        let Some(sum) = sums.iter_mut().find(|s| s.has(task)) else {
            return self.refuse(center, task, stale);
        };
        if sum.tasks().get(&task) != Some(&center) {
            let owner = sum
                .tasks()
                .get(&task)
                .map(|c| c.to_string())
                .unwrap_or_default();
            return self.refuse(center, task, UpdateRefusal::NotYours { owner });
        }
        match sum.take(&center, msg, now) {
            Ok(out) => self.send_secure(out),
            Err(e) => {
                self.refuse(center.clone(), task, UpdateRefusal::Secure(e.to_string()));
                return self.secure_gone(&center, now);
            }
        }
        self.settle_secure();
    }

    /// `center` left every secure sum of the phase.
    pub(super) fn secure_gone(&mut self, center: &CenterId, now: Instant) {
        let mut out = Vec::new();
        for sum in self.phase.secure_sums() {
            out.extend(sum.gone(center, now));
        }
        self.send_secure(out);
        self.settle_secure();
    }

    /// Closes the steps whose deadline has passed.
    pub(super) fn secure_timeout(&mut self, now: Instant) {
        let mut out = Vec::new();
        for sum in self.phase.secure_sums() {
            out.extend(sum.timeout(now));
        }
        self.send_secure(out);
        self.settle_secure();
    }

    /// The earliest step deadline of the phase's sums.
    pub(super) fn secure_deadline(&mut self) -> Option<Instant> {
        self.phase
            .secure_sums()
            .iter()
            .filter_map(|s| s.deadline())
            .min()
    }

    fn send_secure(&mut self, out: Vec<(CenterId, TaskId, Secure)>) {
        if !out.is_empty() {
            self.actions.push_back(Action::SendSecure(out));
        }
    }

    /// Ends the tasks of every sum that is over: a survivor's is accepted (its input is in the sum), any other
    /// is dropped as silent.
    fn settle_secure(&mut self) {
        let mut ended = Vec::new();
        for sum in self.phase.secure_sums() {
            let Some(result) = sum.result() else { continue };
            let failed = result.as_ref().err().cloned();
            for (task, center) in sum.tasks() {
                let gone = match &failed {
                    Some(why) => Some(Gone::Failed(format!("the secure sum failed: {why}"))),
                    None if sum.survived(center) => None,
                    None => Some(Gone::Silent),
                };
                ended.push((*task, center.clone(), gone));
            }
        }
        for (task, center, gone) in ended {
            let Some(tasks) = self.phase.tasks_mut() else {
                return;
            };
            if !tasks.settle(task, &center) {
                continue;
            }
            match gone {
                None => {
                    self.phase.accept_secure(task, &center);
                    self.actions.push_back(Action::Accept { center, task });
                }
                Some(gone) => {
                    self.phase.note(task, &center, gone);
                    self.actions.push_back(Action::Cancel { center, task });
                }
            }
        }
    }
}
