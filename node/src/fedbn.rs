//! FedBN at a training centre (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
//! Normalization", ICLR 2021): the batch-norm layers (parameters and running statistics) a run trains stay at
//! the centre, one set per run; every round starts from the global model with this centre's own layers in
//! place, and the update sent back carries the global model's batch-norm tensors unchanged, so that nothing
//! of the centre's own layers leaves it.

use std::collections::VecDeque;

use fedslm_protocol::{TensorRole, Weights, WeightsError};

/// The most runs whose layers a node keeps (the oldest go first): a simulation runs a few dozen federations.
pub const MAX_RUNS: usize = 64;

/// Each run's batch-norm tensors, as this centre last trained them.
#[derive(Default)]
pub struct LocalBatchNorm {
    runs: VecDeque<(String, Weights)>,
}

impl LocalBatchNorm {
    /// The layers this centre keeps for `run`, if it trained in it under FedBN.
    pub fn get(&self, run: &str) -> Option<&Weights> {
        self.runs.iter().find(|(r, _)| r == run).map(|(_, w)| w)
    }

    /// Keeps the batch-norm tensors of `trained` as `run`'s.
    pub fn keep(&mut self, run: &str, trained: &Weights) -> Result<(), WeightsError> {
        let layers = Weights::from_tensors(
            trained
                .tensors()
                .iter()
                .filter(|t| t.role() != TensorRole::Parameter)
                .cloned()
                .collect(),
        )?;
        self.runs.retain(|(r, _)| r != run);
        if self.runs.len() >= MAX_RUNS {
            self.runs.pop_front();
        }
        self.runs.push_back((run.to_string(), layers));
        Ok(())
    }
}

/// `base` with each batch-norm tensor replaced by `layers`' tensor of the same name and shape (a tensor
/// `layers` lacks stays as it is).
pub fn with_batch_norm_of(base: &Weights, layers: &Weights) -> Result<Weights, WeightsError> {
    Weights::from_tensors(
        base.tensors()
            .iter()
            .map(|t| match layers.get(t.name()) {
                Some(l) if t.role() != TensorRole::Parameter && l.shape() == t.shape() => l.clone(),
                _ => t.clone(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_protocol::Tensor;

    fn w(conv: f32, bn: f32, stat: f32) -> Weights {
        Weights::from_tensors(vec![
            Tensor::from_f32("conv1.weight", vec![2], TensorRole::Parameter, &[conv; 2]).unwrap(),
            Tensor::from_f32(
                "bn1.weight",
                vec![2],
                TensorRole::BatchNormParameter,
                &[bn; 2],
            )
            .unwrap(),
            Tensor::from_f32(
                "bn1.running_mean",
                vec![2],
                TensorRole::BatchNormStatistic,
                &[stat; 2],
            )
            .unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn a_run_keeps_its_own_layers_and_the_rest_comes_from_the_global_model() {
        let mut local = LocalBatchNorm::default();
        assert!(local.get("run-1").is_none());
        local.keep("run-1", &w(1.0, 2.0, 3.0)).unwrap();
        let kept = local.get("run-1").unwrap();
        assert_eq!(kept.tensors().len(), 2, "batch-norm tensors only");
        let start = with_batch_norm_of(&w(9.0, 1.0, 0.0), kept).unwrap();
        assert_eq!(
            start.require("conv1.weight").unwrap().to_f32_vec(),
            [9.0; 2]
        );
        assert_eq!(start.require("bn1.weight").unwrap().to_f32_vec(), [2.0; 2]);
        assert_eq!(
            start.require("bn1.running_mean").unwrap().to_f32_vec(),
            [3.0; 2]
        );
        // What is sent back: the trained parameters with the global model's layers.
        let sent = with_batch_norm_of(&w(5.0, 7.0, 8.0), &w(9.0, 1.0, 0.0)).unwrap();
        assert_eq!(sent.require("conv1.weight").unwrap().to_f32_vec(), [5.0; 2]);
        assert_eq!(sent.require("bn1.weight").unwrap().to_f32_vec(), [1.0; 2]);
        for i in 0..MAX_RUNS + 1 {
            local.keep(&format!("r{i}"), &w(0.0, 0.0, 0.0)).unwrap();
        }
        assert!(
            local.get("run-1").is_none() && local.get("r0").is_none(),
            "oldest dropped"
        );
        assert!(local.get(&format!("r{MAX_RUNS}")).is_some());
    }
}
