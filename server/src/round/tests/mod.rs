//! The round machine driven with a fake clock, one sentence per behaviour.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedslm_metrics::{fit_logistic, logistic_stats, LogisticStats};
use fedslm_protocol::clinical::{newton_weights, COEFFICIENTS, COVARIANCE};
use fedslm_protocol::{
    CenterId, DType, EvalReport, FitResult, Fold, LocalObjective, ModelKind, Role, SampleCounts,
    Tensor, TensorRole, Weights,
};

use super::fit::clinical_weights;
use super::*;
use crate::aggregate::UpdateRefusal;

const MINUTE: Duration = Duration::from_secs(60);

/// What every test centre declares in its Hello: more patients than any test update claims.
const DECLARED: SampleCounts = SampleCounts {
    patients: 1000,
    positives: 300,
    with_images: 1000,
};

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
        norm_bound: NormBound::Absolute(10.0),
        seed: 7,
        fold: None,
        // The machine's evaluation rounds have their own tests.
        evaluation: EvaluationSettings {
            bins: 0,
            every: 0,
            adapt_batch_norm: false,
        },
        dp: None,
        batch_norm_local: false,
        secure_threshold: None,
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
                declared: DECLARED,
            },
            now,
        );
    }
}

/// Every action queued, the store confirming each commit and evaluation at `now`, as a store that
/// never fails would.
fn actions(m: &mut Coordinator, now: Instant) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let batch: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
        if batch.is_empty() {
            return all;
        }
        let stored: Vec<Input> = batch
            .iter()
            .filter_map(|a| match a {
                Action::CommitRound { record, .. } => Some(Input::RoundStored {
                    round: record.round,
                }),
                Action::StoreEvaluation(e) => Some(Input::EvaluationStored { round: e.round }),
                _ => None,
            })
            .collect();
        all.extend(batch);
        for input in stored {
            m.handle(input, now);
        }
    }
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
        Action::CommitRound { record, weights } => Some(CommittedRound {
            record: record.clone(),
            weights: weights.clone(),
        }),
        _ => None,
    })
}

fn conv(w: &Weights) -> Vec<f32> {
    w.require("conv.weight").unwrap().to_f32_vec()
}

mod checks;
mod durability;
mod evaluation;
mod landmarks;
mod newton;
mod placement;
mod rounds;
mod secure;
