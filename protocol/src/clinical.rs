//! The clinical logistic model on the wire: its tensor names, and the statistics a centre sends for a
//! federated Newton step (`LocalObjective::NewtonStep`), all f64 so that the pooled fit is exact.

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

/// A centre's statistics for one Newton step; the patient count travels as `FitResult::examples`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewtonUpdate {
    pub gradient: Vec<f64>,
    pub hessian: Vec<f64>,
    pub log_likelihood: f64,
    pub fitted_exactly: u64,
}

impl NewtonUpdate {
    /// Zeros for `p` coefficients: the shape every centre's update must have.
    pub fn zeros(p: usize) -> NewtonUpdate {
        NewtonUpdate {
            gradient: vec![0.0; p],
            hessian: vec![0.0; p * p],
            log_likelihood: 0.0,
            fitted_exactly: 0,
        }
    }

    pub fn to_weights(&self) -> Result<Weights, WeightsError> {
        let p = self.gradient.len();
        Weights::from_tensors(vec![
            Tensor::from_f64(GRADIENT, vec![p], TensorRole::Parameter, &self.gradient)?,
            Tensor::from_f64(HESSIAN, vec![p, p], TensorRole::Parameter, &self.hessian)?,
            Tensor::from_f64(
                LOG_LIKELIHOOD,
                vec![],
                TensorRole::Parameter,
                &[self.log_likelihood],
            )?,
            Tensor::from_f64(
                FITTED_EXACTLY,
                vec![],
                TensorRole::Parameter,
                &[self.fitted_exactly as f64],
            )?,
        ])
    }

    /// The statistics in `w`, which has already passed the server's checks against
    /// [`NewtonUpdate::zeros`]'s weights.
    pub fn from_weights(w: &Weights) -> Result<NewtonUpdate, WeightsError> {
        let scalar = |name: &str| -> Result<f64, WeightsError> {
            Ok(w.require(name)?
                .to_f64_vec()
                .first()
                .copied()
                .unwrap_or(f64::NAN))
        };
        Ok(NewtonUpdate {
            gradient: w.require(GRADIENT)?.to_f64_vec(),
            hessian: w.require(HESSIAN)?.to_f64_vec(),
            log_likelihood: scalar(LOG_LIKELIHOOD)?,
            fitted_exactly: scalar(FITTED_EXACTLY)?.max(0.0) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_round_trip_exactly() {
        let u = NewtonUpdate {
            gradient: vec![0.1, -2.5],
            hessian: vec![4.0, 0.5, 0.5, 3.0],
            log_likelihood: -12.345678901234,
            fitted_exactly: 2,
        };
        let w = u.to_weights().unwrap();
        assert_eq!(NewtonUpdate::from_weights(&w).unwrap(), u);
        assert_eq!(w.get(HESSIAN).unwrap().shape(), &[2, 2]);
    }
}
