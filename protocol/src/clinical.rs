//! The clinical logistic model on the wire: its tensor names, and the statistics a centre sends for a
//! federated Newton step (`LocalObjective::NewtonStep`), all f64 so that the pooled fit is exact.

use fedslm_metrics::LogisticStats;

use crate::weights::{Tensor, TensorRole, Weights, WeightsError};

/// The model's coefficients, `[p]`: the intercept, then the coded clinical factors.
pub const COEFFICIENTS: &str = "clinical.coefficients";
/// Their covariance, `[p, p]`.
pub const COVARIANCE: &str = "clinical.covariance";

/// Gradient of the log-likelihood at the task's coefficients, `[p]`.
pub const GRADIENT: &str = "newton.gradient";
/// Fisher information X'WX at the task's coefficients, `[p, p]`, row-major.
pub const HESSIAN: &str = "newton.hessian";
/// Log-likelihood at the task's coefficients, a scalar.
pub const LOG_LIKELIHOOD: &str = "newton.log_likelihood";
/// Patients whose fitted probability is within 1e-10 of their label (a sign of separation), a scalar.
pub const FITTED_EXACTLY: &str = "newton.fitted_exactly";

/// A centre's statistics for one Newton step as tensors (gradient `[p]`, Hessian `[p, p]`, log-likelihood and
/// the count of exactly fitted patients as scalars); the patient count travels as `FitResult::examples`.
pub fn newton_weights(stats: &LogisticStats) -> Result<Weights, WeightsError> {
    let p = stats.gradient.len();
    Weights::from_tensors(vec![
        Tensor::from_f64(GRADIENT, vec![p], TensorRole::Parameter, &stats.gradient)?,
        Tensor::from_f64(HESSIAN, vec![p, p], TensorRole::Parameter, &stats.hessian)?,
        Tensor::from_f64(
            LOG_LIKELIHOOD,
            vec![],
            TensorRole::Parameter,
            &[stats.log_likelihood],
        )?,
        Tensor::from_f64(
            FITTED_EXACTLY,
            vec![],
            TensorRole::Parameter,
            &[stats.fitted_exactly as f64],
        )?,
    ])
}

/// The statistics in `w` from a centre of `n` patients; `w` has already passed the server's checks against
/// the weights of [`LogisticStats::zeros`].
pub fn newton_stats(w: &Weights, n: u64) -> Result<LogisticStats, WeightsError> {
    let scalar = |name: &str| -> Result<f64, WeightsError> {
        Ok(w.require(name)?
            .to_f64_vec()
            .first()
            .copied()
            .unwrap_or(f64::NAN))
    };
    Ok(LogisticStats {
        gradient: w.require(GRADIENT)?.to_f64_vec(),
        hessian: w.require(HESSIAN)?.to_f64_vec(),
        log_likelihood: scalar(LOG_LIKELIHOOD)?,
        n,
        fitted_exactly: scalar(FITTED_EXACTLY)?.max(0.0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_round_trip_exactly() {
        let u = LogisticStats {
            gradient: vec![0.1, -2.5],
            hessian: vec![4.0, 0.5, 0.5, 3.0],
            log_likelihood: -12.345678901234,
            n: 40,
            fitted_exactly: 2,
        };
        let w = newton_weights(&u).unwrap();
        assert_eq!(newton_stats(&w, 40).unwrap(), u);
        assert_eq!(w.get(HESSIAN).unwrap().shape(), &[2, 2]);
    }
}
