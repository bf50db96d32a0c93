//! What each kind of answer adds to a secure sum, as one vector of f64, and how the server reads the sum back.
//! The centre builds the vector from its answer and the task; the server from the task alone knows its
//! length and meaning. Every kind of sum the server folds has one:
//!
//! - a fit's update (FedAvg, FedProx): `n * w` for each averaged tensor (under FedBN the batch-norm tensors
//!   stay out), then the trailer;
//! - federated Newton: the statistics' tensors (already sums over patients), then the trailer;
//! - the trailer: `n`, `n * loss` (0 where the loss is not released) and `n` again where it is (0 otherwise),
//!   so that the mean loss is known only where every centre released it;
//! - an evaluation: examples, positives, the loss trailer, then the positive and the negative histogram;
//! - placement sums: the patient counts, then the five sums of each class.

use fedslm_metrics::LogisticStats;
use fedslm_protocol::clinical::{newton_weights, COEFFICIENTS};
use fedslm_protocol::{
    EvalReport, FitResult, FitTask, LocalObjective, PlacementReport, ScoreHistogram, Tensor,
    TensorRole, Weights,
};

use crate::SecureError;

/// The trailer's three elements: examples, examples times the loss, examples that released a loss.
const TRAILER: usize = 3;

fn trailer(examples: u64, loss: f64) -> [f64; TRAILER] {
    let n = examples as f64;
    if loss.is_finite() {
        [n, n * loss, n]
    } else {
        [n, 0.0, 0.0]
    }
}

/// Examples and their mean loss (NaN unless every centre released its loss) from a summed trailer.
fn totals(t: &[f64]) -> (u64, f64) {
    let n = t[0].round().max(0.0);
    let loss = if t[2].round() == n && n > 0.0 {
        t[1] / n
    } else {
        f64::NAN
    };
    (n as u64, loss)
}

/// A fit's sum: the tensors summed, in order, and whether each centre weighs them by its examples.
#[derive(Debug, Clone, PartialEq)]
pub struct FitLayout {
    tensors: Vec<(String, Vec<usize>)>,
    weighted: bool,
}

/// The secure sum of a fit, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct FitTotals {
    /// The summed tensors (weighted by examples where the layout is), in f64.
    pub sums: Weights,
    pub examples: u64,
    /// The example-weighted mean training loss; NaN where not every centre released one.
    pub train_loss: f64,
}

impl FitLayout {
    /// The layout of `task`'s answers.
    pub fn of(task: &FitTask) -> Result<FitLayout, SecureError> {
        if task.objective == LocalObjective::NewtonStep {
            let p = task
                .weights
                .get(COEFFICIENTS)
                .map(|t| t.element_count())
                .ok_or_else(|| SecureError::Setup("a Newton task without coefficients".into()))?;
            let template = newton_weights(&LogisticStats::zeros(p))
                .map_err(|e| SecureError::Setup(e.to_string()))?;
            return Ok(FitLayout {
                tensors: shapes(template.tensors().iter()),
                weighted: false,
            });
        }
        let kept = |t: &&Tensor| task.keep_batch_norm_local && t.role() != TensorRole::Parameter;
        Ok(FitLayout {
            tensors: shapes(task.weights.tensors().iter().filter(|t| !kept(t))),
            weighted: true,
        })
    }

    /// Elements of the vector.
    pub fn length(&self) -> u64 {
        self.tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum::<u64>()
            + TRAILER as u64
    }

    /// A centre's vector: its result's tensors as the layout sums them (each finite, the update within
    /// `norm_bound` of `global`, batch-norm statistics excluded, as the server would check in the clear).
    pub fn vector(
        &self,
        result: &FitResult,
        global: &Weights,
        norm_bound: Option<f64>,
    ) -> Result<Vec<f64>, SecureError> {
        let mut out = Vec::with_capacity(self.length() as usize);
        let w = if self.weighted {
            result.examples as f64
        } else {
            1.0
        };
        let mut squared = 0.0;
        for (name, shape) in &self.tensors {
            let t = result
                .weights
                .get(name)
                .ok_or_else(|| SecureError::Refused(format!("the update has no tensor {name}")))?;
            if t.shape() != shape.as_slice() {
                return Err(SecureError::Refused(format!(
                    "tensor {name} has shape {:?}, the sum's has {shape:?}",
                    t.shape()
                )));
            }
            let start = out.len();
            t.for_each_f64(|v| out.push(w * v));
            if let Some(i) = out[start..].iter().position(|v| !v.is_finite()) {
                return Err(SecureError::Refused(format!(
                    "tensor {name} holds a non-finite value at index {i}"
                )));
            }
            if let Some(g) = global.get(name) {
                if t.role() != TensorRole::BatchNormStatistic {
                    squared += t.squared_distance(g);
                }
            }
        }
        if let Some(bound) = norm_bound {
            let norm = squared.sqrt();
            if norm > bound {
                return Err(SecureError::NormBound { norm, bound });
            }
        }
        out.extend(trailer(result.examples, result.train_loss));
        Ok(out)
    }

    /// The sum split: the summed tensors' elements, flat, in order; the examples; the mean loss (NaN unless
    /// every centre released one).
    pub fn split<'a>(&self, sum: &'a [f64]) -> Result<(&'a [f64], u64, f64), SecureError> {
        if sum.len() as u64 != self.length() {
            return Err(SecureError::Length {
                got: sum.len(),
                expected: self.length(),
            });
        }
        let at = sum.len() - TRAILER;
        let (examples, loss) = totals(&sum[at..]);
        Ok((&sum[..at], examples, loss))
    }

    /// The sum read back as tensors (f64).
    pub fn totals(&self, sum: &[f64]) -> Result<FitTotals, SecureError> {
        if sum.len() as u64 != self.length() {
            return Err(SecureError::Length {
                got: sum.len(),
                expected: self.length(),
            });
        }
        let mut tensors = Vec::with_capacity(self.tensors.len());
        let mut at = 0;
        for (name, shape) in &self.tensors {
            let n: usize = shape.iter().product();
            tensors.push(
                Tensor::from_f64(
                    name.clone(),
                    shape.clone(),
                    TensorRole::Parameter,
                    &sum[at..at + n],
                )
                .map_err(|e| SecureError::Refused(e.to_string()))?,
            );
            at += n;
        }
        let (examples, train_loss) = totals(&sum[at..]);
        Ok(FitTotals {
            sums: Weights::from_tensors(tensors)
                .map_err(|e| SecureError::Refused(e.to_string()))?,
            examples,
            train_loss,
        })
    }
}

fn shapes<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Vec<(String, Vec<usize>)> {
    tensors
        .map(|t| (t.name().to_string(), t.shape().to_vec()))
        .collect()
}

/// An evaluation's sum, with `bins` bins a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalLayout {
    pub bins: u32,
}

impl EvalLayout {
    pub fn length(&self) -> u64 {
        2 + TRAILER as u64 + 2 * u64::from(self.bins)
    }

    pub fn vector(&self, report: &EvalReport) -> Result<Vec<f64>, SecureError> {
        let h = &report.histogram;
        if h.positive.len() != self.bins as usize || h.negative.len() != self.bins as usize {
            return Err(SecureError::Refused(format!(
                "{} and {} histogram bins, but {} were asked",
                h.positive.len(),
                h.negative.len(),
                self.bins
            )));
        }
        let mut out = vec![report.examples as f64, report.positives as f64];
        out.extend(trailer(report.examples, report.loss));
        out.extend(h.positive.iter().chain(&h.negative).map(|&c| c as f64));
        Ok(out)
    }

    /// The summed report (its round is the caller's to set).
    pub fn totals(&self, round: u32, sum: &[f64]) -> Result<EvalReport, SecureError> {
        if sum.len() as u64 != self.length() {
            return Err(SecureError::Length {
                got: sum.len(),
                expected: self.length(),
            });
        }
        let count = |v: f64| v.round().max(0.0) as u64;
        let (_, loss) = totals(&sum[2..2 + TRAILER]);
        let examples = count(sum[0]);
        let bins = self.bins as usize;
        let h = &sum[2 + TRAILER..];
        Ok(EvalReport {
            round,
            examples,
            positives: count(sum[1]),
            loss,
            histogram: ScoreHistogram {
                positive: h[..bins].iter().map(|&v| count(v)).collect(),
                negative: h[bins..].iter().map(|&v| count(v)).collect(),
            },
        })
    }
}

/// Placement sums: 12 elements.
pub const PLACEMENT_LENGTH: u64 = 12;

pub fn placement_vector(r: &PlacementReport) -> Vec<f64> {
    let mut out = vec![r.n_positive as f64, r.n_negative as f64];
    out.extend(r.positive);
    out.extend(r.negative);
    out
}

pub fn placement_totals(sum: &[f64]) -> Result<PlacementReport, SecureError> {
    if sum.len() as u64 != PLACEMENT_LENGTH {
        return Err(SecureError::Length {
            got: sum.len(),
            expected: PLACEMENT_LENGTH,
        });
    }
    let mut positive = [0.0; 5];
    let mut negative = [0.0; 5];
    positive.copy_from_slice(&sum[2..7]);
    negative.copy_from_slice(&sum[7..12]);
    Ok(PlacementReport {
        n_positive: sum[0].round().max(0.0) as u64,
        n_negative: sum[1].round().max(0.0) as u64,
        positive,
        negative,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_protocol::ModelKind;

    fn weights(a: &[f32], stat: &[f32]) -> Weights {
        Weights::from_tensors(vec![
            Tensor::from_f32("conv.weight", vec![2], TensorRole::Parameter, a).unwrap(),
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

    fn task(global: Weights, keep: bool) -> FitTask {
        FitTask {
            round: 1,
            model: ModelKind::Mri,
            weights: global,
            local_epochs: 1,
            learning_rate: 0.1,
            batch_size: 4,
            fold: None,
            seed: 0,
            objective: LocalObjective::Plain,
            keep_batch_norm_local: keep,
            dp: None,
        }
    }

    #[test]
    fn a_fit_vector_is_the_weighted_update_and_its_trailer_and_reads_back() {
        let global = weights(&[0.0, 0.0], &[1.0]);
        let layout = FitLayout::of(&task(global.clone(), false)).unwrap();
        assert_eq!(layout.length(), 3 + 3);
        let result = FitResult {
            round: 1,
            weights: weights(&[1.0, -2.0], &[4.0]),
            examples: 10,
            train_loss: 0.5,
        };
        let v = layout.vector(&result, &global, Some(3.0)).unwrap();
        assert_eq!(v, vec![10.0, -20.0, 40.0, 10.0, 5.0, 10.0]);
        let t = layout.totals(&v).unwrap();
        assert_eq!((t.examples, t.train_loss), (10, 0.5));
        assert_eq!(
            t.sums.get("conv.weight").unwrap().to_f64_vec(),
            vec![10.0, -20.0]
        );
        // Norm bound: |(1, -2)| = 2.236 (the statistic excluded).
        let e = layout.vector(&result, &global, Some(2.0)).unwrap_err();
        assert!(matches!(e, SecureError::NormBound { .. }), "{e}");
        // FedBN: the batch-norm tensors stay out of the sum.
        let fedbn = FitLayout::of(&task(global, true)).unwrap();
        assert_eq!(fedbn.length(), 2 + 3);
        // A loss not released (NaN) leaves the mean loss unknown.
        let unreleased = FitResult {
            train_loss: f64::NAN,
            ..result
        };
        let v = fedbn
            .vector(&unreleased, &weights(&[0.0; 2], &[1.0]), None)
            .unwrap();
        assert!(fedbn.totals(&v).unwrap().train_loss.is_nan());
    }

    #[test]
    fn an_evaluation_and_placement_sums_read_back_exactly() {
        let layout = EvalLayout { bins: 2 };
        let report = EvalReport {
            round: 3,
            examples: 5,
            positives: 2,
            loss: 0.25,
            histogram: ScoreHistogram {
                positive: vec![0, 2],
                negative: vec![3, 0],
            },
        };
        let v = layout.vector(&report).unwrap();
        assert_eq!(v.len() as u64, layout.length());
        assert_eq!(layout.totals(3, &v).unwrap(), report);
        let p = PlacementReport {
            n_positive: 2,
            n_negative: 3,
            positive: [1.0, 2.0, 3.0, 4.0, 5.0],
            negative: [6.0, 7.0, 8.0, 9.0, 10.0],
        };
        assert_eq!(placement_totals(&placement_vector(&p)).unwrap(), p);
    }
}
