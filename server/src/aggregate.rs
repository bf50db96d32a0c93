//! The next global model from the centres' updates: every update is checked against the global model before
//! anything of it is used, then folded in as it arrives into f64 accumulators, so that FedAvg's memory stays
//! about one model however many centres answer.

use fedslm_protocol::{DType, Tensor, TensorRole, Weights, WeightsError};

/// Why an update was not folded in; each names the tensor where there is one. Sent back to the centre.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdateRefusal {
    #[error("tensor {0} of the global model is missing")]
    Missing(String),
    #[error("tensor {0} is not part of the global model")]
    Unexpected(String),
    #[error("tensor {name} has shape {got:?}, the global model's has {expected:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name} is {got:?}, the global model's is {expected:?}")]
    DType {
        name: String,
        got: DType,
        expected: DType,
    },
    #[error("tensor {name} has role {got:?}, the global model's has {expected:?}")]
    Role {
        name: String,
        got: TensorRole,
        expected: TensorRole,
    },
    #[error("tensor {name} holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    #[error("the update moves the model by {norm:.4e} (L2), beyond the bound of {bound:.4e}")]
    Norm { norm: f64, bound: f64 },
    #[error("the update claims no training examples")]
    NoExamples,
    #[error("the update claims {claimed} examples; this centre declared {declared} in its Hello")]
    MoreExamplesThanDeclared { claimed: u64, declared: u64 },
    #[error("the update claims {claimed} examples; this centre's earlier rounds had {earlier}")]
    ExamplesChanged { claimed: u64, earlier: u64 },
    #[error("this centre validates: it is never asked to train, so it may not send an update")]
    NotTraining,
    #[error("no fit task of this server asked for this update")]
    NoTask,
    #[error("the update came after round {round} had closed")]
    Late { round: u32 },
    #[error("the update is for round {got}, the task was for round {expected}")]
    WrongRound { got: u32, expected: u32 },
    #[error("this centre already answered round {round}: only its first answer counts")]
    Duplicate { round: u32 },
    #[error("the task was sent to centre {owner}, not this one")]
    NotYours { owner: String },
    #[error("the update's loss {0} is not finite")]
    NonFiniteLoss(f64),
    #[error("the evaluation report is refused: {0}")]
    BadReport(#[from] crate::evaluation::ReportError),
    #[error("the Newton statistics cannot be summed: {0}")]
    NewtonStatistics(String),
    #[error("secure aggregation: {0}")]
    Secure(String),
    #[error("this run aggregates securely: an answer in the clear is refused")]
    NotMasked,
    #[error("the landmarks are refused: {0}")]
    Landmarks(String),
}

impl UpdateRefusal {
    /// A short name of the rule broken, for metrics (a fixed set: never a peer's text).
    pub fn kind(&self) -> &'static str {
        match self {
            UpdateRefusal::Missing(_) | UpdateRefusal::Unexpected(_) => "tensors",
            UpdateRefusal::Shape { .. } => "shape",
            UpdateRefusal::DType { .. } => "dtype",
            UpdateRefusal::Role { .. } => "role",
            UpdateRefusal::NonFinite { .. } | UpdateRefusal::NonFiniteLoss(_) => "non_finite",
            UpdateRefusal::Norm { .. } => "norm",
            UpdateRefusal::Landmarks(_) => "landmarks",
            UpdateRefusal::NoExamples
            | UpdateRefusal::MoreExamplesThanDeclared { .. }
            | UpdateRefusal::ExamplesChanged { .. } => "examples",
            UpdateRefusal::NotTraining | UpdateRefusal::NoTask | UpdateRefusal::NotYours { .. } => {
                "not_asked"
            }
            UpdateRefusal::Late { .. } => "late",
            UpdateRefusal::WrongRound { .. } => "wrong_round",
            UpdateRefusal::Duplicate { .. } => "duplicate",
            UpdateRefusal::BadReport(_) => "evaluation_report",
            UpdateRefusal::NewtonStatistics(_) => "newton_statistics",
            UpdateRefusal::Secure(_) | UpdateRefusal::NotMasked => "secure_aggregation",
        }
    }
}

/// Checks `update` against `global`: the same tensors (names, shapes, dtypes, roles), finite values, and, with
/// `norm_bound`, an L2 distance from the global model within it (batch-norm statistics excluded: their scale is
/// the data's, not the optimiser's).
pub fn check_update(
    global: &Weights,
    update: &Weights,
    norm_bound: Option<f64>,
) -> Result<(), UpdateRefusal> {
    for t in update.tensors() {
        if global.get(t.name()).is_none() {
            // The name is the peer's: escaped before it reaches a log or the audit.
            return Err(UpdateRefusal::Unexpected(
                fedslm_protocol::text::escape_peer(t.name()),
            ));
        }
    }
    // Each tensor checked on its own (over the machine's threads for a large model), then the first refusal
    // in the global model's order and the distances added in that order: the same verdict and the same sum
    // as one pass over the tensors.
    let checked = per_tensor(values(global), global.tensors().iter().collect(), |g| {
        check_tensor(g, update, norm_bound.is_some())
    });
    let mut squared = 0.0;
    for distance in checked {
        if let Some(d) = distance? {
            squared += d;
        }
    }
    if let Some(bound) = norm_bound {
        let norm = squared.sqrt();
        if norm > bound {
            return Err(UpdateRefusal::Norm { norm, bound });
        }
    }
    Ok(())
}

/// One tensor of the global model against the update's: present with the same shape, dtype and role, finite,
/// and, when `distance` asks, its squared L2 distance from the global tensor (`None` for batch-norm statistics).
fn check_tensor(
    g: &Tensor,
    update: &Weights,
    distance: bool,
) -> Result<Option<f64>, UpdateRefusal> {
    let name = g.name();
    let u = update
        .get(name)
        .ok_or_else(|| UpdateRefusal::Missing(name.to_string()))?;
    if u.shape() != g.shape() {
        return Err(UpdateRefusal::Shape {
            name: name.to_string(),
            got: u.shape().to_vec(),
            expected: g.shape().to_vec(),
        });
    }
    if u.dtype() != g.dtype() {
        return Err(UpdateRefusal::DType {
            name: name.to_string(),
            got: u.dtype(),
            expected: g.dtype(),
        });
    }
    if u.role() != g.role() {
        return Err(UpdateRefusal::Role {
            name: name.to_string(),
            got: u.role(),
            expected: g.role(),
        });
    }
    let non_finite = |index| UpdateRefusal::NonFinite {
        name: name.to_string(),
        index,
    };
    if !distance || g.role() == TensorRole::BatchNormStatistic {
        return match u.first_non_finite() {
            Some(index) => Err(non_finite(index)),
            None => Ok(None),
        };
    }
    // One pass over the update where a distance is measured: a non-finite value makes the sum of squares
    // non-finite (a sum of non-negative terms never comes back from infinity or NaN), so only a non-finite
    // sum sends us looking for the value; one that is finite everywhere and overflowed is left to the bound.
    let squared = u.squared_distance(g);
    if !squared.is_finite() {
        if let Some(index) = u.first_non_finite() {
            return Err(non_finite(index));
        }
    }
    Ok(Some(squared))
}

/// Models of this many values or more are checked and folded over the machine's threads, a tensor per task:
/// ResNet-18's 11 M in half the time on two cores, while the server's network side waits for the next answer.
/// Smaller ones (the study's networks) stay on the calling thread.
const PARALLEL_FROM: usize = 1 << 20;

/// The values of all of a model's tensors.
fn values(model: &Weights) -> usize {
    model.tensors().iter().map(Tensor::element_count).sum()
}

/// `work` on each of `items` (one per tensor of a model of `values` values), in order; over rayon's threads
/// when the model has [`PARALLEL_FROM`] values or more. Each item's result is the same either way.
fn per_tensor<T: Send, R: Send>(
    values: usize,
    items: Vec<T>,
    work: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    if values >= PARALLEL_FROM {
        items.into_par_iter().map(work).collect()
    } else {
        items.into_iter().map(work).collect()
    }
}

/// The L2 norm of a model's parameters, batch-norm statistics excluded (the quantity a norm bound measures).
pub fn parameter_norm(w: &Weights) -> f64 {
    let mut squared = 0.0;
    for t in w.tensors() {
        if t.role() != TensorRole::BatchNormStatistic {
            t.for_each_f64(|v| squared += v * v);
        }
    }
    squared.sqrt()
}

/// FedAvg: the example-weighted mean of the updates folded in, tensor by tensor, in f64.
#[derive(Debug)]
pub struct FedAvg {
    /// Names, shapes, dtypes and roles of the result, in the global model's order.
    template: Vec<(String, Vec<usize>, DType, TensorRole)>,
    sums: Vec<Vec<f64>>,
    /// Under FedBN, the global model's batch-norm tensors, which the result keeps as they are (the centres'
    /// own stay at the centres); `None` for a tensor that is averaged.
    kept: Vec<Option<Tensor>>,
    /// The global model's values, all tensors together (what decides [`per_tensor`]'s threads).
    values: usize,
    examples: f64,
    updates: usize,
}

impl FedAvg {
    /// An empty aggregate shaped like `global`.
    pub fn new(global: &Weights) -> FedAvg {
        FedAvg::keeping(global, false)
    }

    /// An empty aggregate shaped like `global`; with `batch_norm_local` (FedBN, Li et al., ICLR 2021), its
    /// batch-norm parameters and statistics are not averaged but kept from `global`.
    pub fn keeping(global: &Weights, batch_norm_local: bool) -> FedAvg {
        let local = |t: &Tensor| batch_norm_local && t.role() != TensorRole::Parameter;
        FedAvg {
            kept: global
                .tensors()
                .iter()
                .map(|t| local(t).then(|| t.clone()))
                .collect(),
            template: global
                .tensors()
                .iter()
                .map(|t| {
                    (
                        t.name().to_string(),
                        t.shape().to_vec(),
                        t.dtype(),
                        t.role(),
                    )
                })
                .collect(),
            // Allocated at the first fold: a round whose sum is secure holds only the masked one until it closes.
            sums: vec![Vec::new(); global.tensors().len()],
            values: values(global),
            examples: 0.0,
            updates: 0,
        }
    }

    /// Folds in an update that [`check_update`] accepted, trained on `examples` examples.
    pub fn fold(&mut self, update: &Weights, examples: u64) -> Result<(), UpdateRefusal> {
        if examples == 0 {
            return Err(UpdateRefusal::NoExamples);
        }
        // Re-checked cheaply here so that a fold can never mix tensors of different shapes.
        for (name, shape, _, _) in &self.template {
            let t = update
                .get(name)
                .ok_or_else(|| UpdateRefusal::Missing(name.clone()))?;
            if t.shape() != shape.as_slice() {
                return Err(UpdateRefusal::Shape {
                    name: name.clone(),
                    got: t.shape().to_vec(),
                    expected: shape.clone(),
                });
            }
        }
        let w = examples as f64;
        let averaged: Vec<(&Tensor, &mut Vec<f64>)> = self
            .template
            .iter()
            .zip(&mut self.sums)
            .zip(&self.kept)
            .filter(|(_, kept)| kept.is_none())
            .filter_map(|(((name, _, _, _), sum), _)| update.get(name).map(|t| (t, sum)))
            .collect();
        per_tensor(self.values, averaged, |(t, sum)| {
            // The first update made the sums (zeros plus it); the others add to them.
            if sum.is_empty() {
                t.scaled_into(w, sum)
            } else {
                t.add_scaled_to(w, sum)
            }
        });
        self.examples += w;
        self.updates += 1;
        Ok(())
    }

    /// Folds in a secure sum: `flat` holds, for each averaged tensor in the global model's order, the sum over
    /// the centres of their examples times their weights, and `examples` the centres' examples; the sum counts
    /// as one update.
    pub fn fold_sum(&mut self, flat: &[f64], examples: u64) -> Result<(), UpdateRefusal> {
        if examples == 0 {
            return Err(UpdateRefusal::NoExamples);
        }
        let averaged: usize = self
            .template
            .iter()
            .zip(&self.kept)
            .filter(|(_, k)| k.is_none())
            .map(|((_, shape, _, _), _)| shape.iter().product::<usize>())
            .sum();
        if flat.len() != averaged {
            return Err(UpdateRefusal::Secure(format!(
                "a sum of {} elements for {averaged} averaged ones",
                flat.len()
            )));
        }
        self.allocate();
        let mut at = 0;
        for (((name, _, _, _), sum), kept) in
            self.template.iter().zip(&mut self.sums).zip(&self.kept)
        {
            if kept.is_some() {
                continue;
            }
            let part = &flat[at..at + sum.len()];
            if let Some(index) = part.iter().position(|v| !v.is_finite()) {
                return Err(UpdateRefusal::NonFinite {
                    name: name.clone(),
                    index,
                });
            }
            for (s, v) in sum.iter_mut().zip(part) {
                *s += v;
            }
            at += sum.len();
        }
        self.examples += examples as f64;
        self.updates += 1;
        Ok(())
    }

    /// The f64 accumulators of the averaged tensors, zero, where they are not yet.
    fn allocate(&mut self) {
        for (((_, shape, _, _), sum), kept) in
            self.template.iter().zip(&mut self.sums).zip(&self.kept)
        {
            if kept.is_none() && sum.is_empty() {
                *sum = vec![0.0; shape.iter().product()];
            }
        }
    }

    /// Updates folded in so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Examples behind the updates folded in so far.
    pub fn examples(&self) -> u64 {
        self.examples as u64
    }

    /// The weighted mean in the global model's dtypes, or `None` when nothing was folded in.
    pub fn finish(self) -> Result<Option<Weights>, WeightsError> {
        if self.updates == 0 {
            return Ok(None);
        }
        let examples = self.examples;
        let parts: Vec<_> = self
            .template
            .into_iter()
            .zip(self.sums)
            .zip(self.kept)
            .collect();
        let tensors = per_tensor(
            self.values,
            parts,
            |(((name, shape, dtype, role), sum), kept)| {
                if let Some(t) = kept {
                    return Ok(t);
                }
                // Each tensor's sums are dropped as soon as its mean is made; an f32 mean is written straight
                // into its bytes, without a vector of f64 means or f32 values between.
                let mean = |s: &f64| s / examples;
                match dtype {
                    DType::F32 => {
                        let mut bytes = Vec::with_capacity(4 * sum.len());
                        for s in &sum {
                            bytes.extend_from_slice(&(mean(s) as f32).to_le_bytes());
                        }
                        Tensor::from_raw(name, shape, dtype, role, bytes.into())
                    }
                    DType::F64 => {
                        let means: Vec<f64> = sum.iter().map(mean).collect();
                        Tensor::from_f64(name, shape, role, &means)
                    }
                    other => {
                        let narrow: Vec<f32> = sum.iter().map(|s| mean(s) as f32).collect();
                        Tensor::from_f32_as(name, shape, role, &narrow, other)
                    }
                }
            },
        )
        .into_iter()
        .collect::<Result<Vec<Tensor>, WeightsError>>()?;
        Ok(Some(Weights::from_tensors(tensors)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(a: &[f32], b: &[f64], stat: &[f32]) -> Weights {
        Weights::from_tensors(vec![
            Tensor::from_f32("conv.weight", vec![2, 2], TensorRole::Parameter, a).unwrap(),
            Tensor::from_f64("clinical.coefficients", vec![2], TensorRole::Parameter, b).unwrap(),
            Tensor::from_f32(
                "bn.running_var",
                vec![1],
                TensorRole::BatchNormStatistic,
                stat,
            )
            .unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn fedavg_is_the_example_weighted_mean_in_the_global_dtypes() {
        let global = weights(&[0.0; 4], &[0.0; 2], &[1.0]);
        let a = weights(&[1.0, 2.0, 3.0, 4.0], &[0.1, 1.0 / 3.0], &[2.0]);
        let b = weights(&[5.0, 6.0, 7.0, 8.0], &[0.7, -1.0], &[4.0]);
        let mut agg = FedAvg::new(&global);
        for (u, n) in [(&a, 30), (&b, 10)] {
            check_update(&global, u, None).unwrap();
            agg.fold(u, n).unwrap();
        }
        assert_eq!((agg.updates(), agg.examples()), (2, 40));
        let out = agg.finish().unwrap().unwrap();
        let conv = out.require("conv.weight").unwrap();
        assert_eq!(conv.dtype(), DType::F32);
        assert_eq!(conv.to_f32_vec(), vec![2.0, 3.0, 4.0, 5.0]);
        let coef = out.require("clinical.coefficients").unwrap();
        assert_eq!(coef.dtype(), DType::F64);
        let want = [
            (30.0 * 0.1 + 10.0 * 0.7) / 40.0,
            (30.0 * (1.0 / 3.0) - 10.0) / 40.0,
        ];
        for (g, w) in coef.to_f64_vec().iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{g} vs {w}");
        }
        assert_eq!(
            out.require("bn.running_var").unwrap().to_f32_vec(),
            vec![2.5]
        );
        let names: Vec<&str> = out.tensors().iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            ["conv.weight", "clinical.coefficients", "bn.running_var"]
        );
        assert!(FedAvg::new(&global).finish().unwrap().is_none());
    }

    #[test]
    fn fedbn_averages_the_parameters_and_keeps_the_global_batch_norm() {
        let global = weights(&[0.0; 4], &[0.0; 2], &[1.0]);
        let a = weights(&[1.0, 2.0, 3.0, 4.0], &[0.1, 0.2], &[2.0]);
        let b = weights(&[5.0, 6.0, 7.0, 8.0], &[0.3, 0.4], &[4.0]);
        let mut agg = FedAvg::keeping(&global, true);
        for u in [&a, &b] {
            agg.fold(u, 10).unwrap();
        }
        let out = agg.finish().unwrap().unwrap();
        assert_eq!(
            out.require("conv.weight").unwrap().to_f32_vec(),
            vec![3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(
            out.require("bn.running_var").unwrap().to_f32_vec(),
            vec![1.0],
            "the global model's, not the centres' mean"
        );
    }

    #[test]
    fn each_check_refuses_by_name() {
        let global = weights(&[0.0; 4], &[0.0; 2], &[1.0]);
        let ok = weights(&[0.1; 4], &[0.1; 2], &[50.0]);
        assert_eq!(check_update(&global, &ok, Some(1.0)), Ok(()));

        let mut extra: Vec<Tensor> = ok.tensors().to_vec();
        extra.push(Tensor::from_f32("spy", vec![1], TensorRole::Parameter, &[0.0]).unwrap());
        let extra = Weights::from_tensors(extra).unwrap();
        assert_eq!(
            check_update(&global, &extra, None),
            Err(UpdateRefusal::Unexpected("spy".into()))
        );

        let missing = Weights::from_tensors(ok.tensors()[..2].to_vec()).unwrap();
        assert_eq!(
            check_update(&global, &missing, None),
            Err(UpdateRefusal::Missing("bn.running_var".into()))
        );

        let reshaped = Weights::from_tensors(vec![
            Tensor::from_f32("conv.weight", vec![4], TensorRole::Parameter, &[0.0; 4]).unwrap(),
            ok.tensors()[1].clone(),
            ok.tensors()[2].clone(),
        ])
        .unwrap();
        assert!(matches!(
            check_update(&global, &reshaped, None),
            Err(UpdateRefusal::Shape { name, .. }) if name == "conv.weight"
        ));

        let half = Weights::from_tensors(vec![
            Tensor::from_f32_as(
                "conv.weight",
                vec![2, 2],
                TensorRole::Parameter,
                &[0.0; 4],
                DType::F16,
            )
            .unwrap(),
            ok.tensors()[1].clone(),
            ok.tensors()[2].clone(),
        ])
        .unwrap();
        assert!(matches!(
            check_update(&global, &half, None),
            Err(UpdateRefusal::DType {
                got: DType::F16,
                ..
            })
        ));

        let role = Weights::from_tensors(vec![
            ok.tensors()[0].clone(),
            ok.tensors()[1].clone(),
            Tensor::from_f32("bn.running_var", vec![1], TensorRole::Parameter, &[1.0]).unwrap(),
        ])
        .unwrap();
        assert!(matches!(
            check_update(&global, &role, None),
            Err(UpdateRefusal::Role { name, .. }) if name == "bn.running_var"
        ));

        let nan = weights(&[0.0, 0.0, f32::NAN, 0.0], &[0.0; 2], &[1.0]);
        assert_eq!(
            check_update(&global, &nan, None),
            Err(UpdateRefusal::NonFinite {
                name: "conv.weight".into(),
                index: 2
            })
        );
        let inf = weights(&[0.0; 4], &[f64::INFINITY, 0.0], &[1.0]);
        assert!(matches!(
            check_update(&global, &inf, None),
            Err(UpdateRefusal::NonFinite { name, index: 0 }) if name == "clinical.coefficients"
        ));

        // sqrt(4 * 0.6^2 + 2 * 0.6^2) = 1.47 > 1; the statistic's jump to 50 does not count.
        let far = weights(&[0.6; 4], &[0.6; 2], &[50.0]);
        assert!(matches!(
            check_update(&global, &far, Some(1.0)),
            Err(UpdateRefusal::Norm { norm, .. }) if (norm - (6.0f64 * 0.36).sqrt()).abs() < 1e-6
        ));
        assert_eq!(check_update(&global, &far, None), Ok(()));

        let mut agg = FedAvg::new(&global);
        assert_eq!(agg.fold(&ok, 0), Err(UpdateRefusal::NoExamples));
        assert!(agg.fold(&reshaped, 3).is_err());
        assert_eq!(agg.updates(), 0, "refused folds leave nothing behind");
    }

    #[test]
    fn a_non_finite_value_is_named_with_its_index_when_a_bound_measures_the_distance_too() {
        let global = weights(&[0.0; 4], &[0.0; 2], &[1.0]);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let u = weights(&[0.0, 0.0, 0.0, bad], &[0.0; 2], &[1.0]);
            assert_eq!(
                check_update(&global, &u, Some(1e30)),
                Err(UpdateRefusal::NonFinite {
                    name: "conv.weight".into(),
                    index: 3
                }),
                "{bad}"
            );
        }
        let u = weights(&[0.0; 4], &[0.0, f64::NEG_INFINITY], &[1.0]);
        assert!(matches!(
            check_update(&global, &u, Some(1e30)),
            Err(UpdateRefusal::NonFinite { name, index: 1 }) if name == "clinical.coefficients"
        ));
        // Statistics are outside the distance but not outside the finiteness check.
        let u = weights(&[0.0; 4], &[0.0; 2], &[f32::NAN]);
        assert!(matches!(
            check_update(&global, &u, Some(1e30)),
            Err(UpdateRefusal::NonFinite { name, index: 0 }) if name == "bn.running_var"
        ));
        // Finite values whose squares overflow: no value to name, and far beyond any bound.
        let u = weights(&[0.0; 4], &[1e200, 0.0], &[1.0]);
        assert!(matches!(
            check_update(&global, &u, Some(1e30)),
            Err(UpdateRefusal::Norm { norm, .. }) if norm == f64::INFINITY
        ));
    }

    /// A model large enough for the checks and the fold to run over threads: three tensors, 1.5 M values.
    fn large(fill: impl Fn(usize, usize) -> f32) -> Weights {
        let sizes = [700_000usize, 500_000, 300_000];
        assert!(sizes.iter().sum::<usize>() >= PARALLEL_FROM);
        let tensors = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let v: Vec<f32> = (0..n).map(|i| fill(k, i)).collect();
                Tensor::from_f32(format!("t{k}"), vec![n], TensorRole::Parameter, &v).unwrap()
            })
            .collect();
        Weights::from_tensors(tensors).unwrap()
    }

    #[test]
    fn a_large_model_is_checked_and_averaged_tensor_by_tensor_as_one_pass_would() {
        let global = large(|_, _| 0.0);
        let a = large(|k, i| (i % 7) as f32 * 0.25 + k as f32);
        let b = large(|k, i| -((i % 5) as f32) * 0.5 - k as f32);
        let mut agg = FedAvg::new(&global);
        for (u, n) in [(&a, 3), (&b, 1)] {
            check_update(&global, u, Some(1e9)).unwrap();
            agg.fold(u, n).unwrap();
        }
        let mean = agg.finish().unwrap().unwrap();
        for (k, t) in mean.tensors().iter().enumerate() {
            let got = t.to_f32_vec();
            for i in [0, 1, 4, 6, 34, got.len() - 1] {
                let (x, y) = (
                    f64::from((i % 7) as f32 * 0.25 + k as f32),
                    f64::from(-((i % 5) as f32) * 0.5 - k as f32),
                );
                let want = (((0.0 + 3.0 * x) + 1.0 * y) / 4.0) as f32;
                assert_eq!(got[i].to_bits(), want.to_bits(), "t{k}[{i}]");
            }
        }
        // Two refusals: the first tensor's, in the global model's order, whichever thread finishes first.
        let bad = large(|k, i| match (k, i) {
            (1, 9) => f32::NAN,
            (2, 0) => f32::INFINITY,
            _ => 0.0,
        });
        assert_eq!(
            check_update(&global, &bad, Some(1e9)),
            Err(UpdateRefusal::NonFinite {
                name: "t1".into(),
                index: 9
            })
        );
        // The distance over all three tensors: sqrt(1.5 M * 0.5^2).
        let far = large(|_, _| 0.5);
        assert!(matches!(
            check_update(&global, &far, Some(1.0)),
            Err(UpdateRefusal::Norm { norm, .. }) if (norm - (1.5e6f64 * 0.25).sqrt()).abs() < 1e-9
        ));
    }
}
