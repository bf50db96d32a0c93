//! The clinical model: logistic regression of SLM on the coded clinical factors, fitted in f64 by the metrics
//! crate's Newton method. Locally from patients, or federated from centres' summed statistics.

use fedslm_cohort::{ClinicalCoding, Patient};
use fedslm_metrics::{fit_logistic, logistic_stats, LogisticFit, LogisticStats};
use fedslm_protocol::{Tensor, TensorRole, Weights};

use crate::error::ModelError;

/// Tensor names of a clinical model in `Weights` and model files (the wire contract's).
pub use fedslm_protocol::clinical::{COEFFICIENTS, COVARIANCE};

/// Coefficient names: the intercept, then [`ClinicalCoding::FEATURES`].
pub fn names() -> Vec<&'static str> {
    std::iter::once("intercept")
        .chain(ClinicalCoding::FEATURES)
        .collect()
}

/// The design row of a patient: 1, then the coded factors.
pub fn row(coding: &ClinicalCoding, p: &Patient) -> Vec<f64> {
    std::iter::once(1.0).chain(coding.encode(p)).collect()
}

/// The design of the patients with a known outcome.
pub fn design(coding: &ClinicalCoding, patients: &[&Patient]) -> (Vec<f64>, Vec<bool>) {
    let labelled: Vec<&&Patient> = patients.iter().filter(|p| p.slm.is_some()).collect();
    let x = labelled.iter().flat_map(|p| row(coding, p)).collect();
    let y = labelled.iter().map(|p| p.slm == Some(true)).collect();
    (x, y)
}

/// The maximum-likelihood fit on `patients` (those with a known outcome).
pub fn fit(coding: &ClinicalCoding, patients: &[&Patient]) -> Result<LogisticFit, ModelError> {
    let (x, y) = design(coding, patients);
    if y.is_empty() {
        return Err(ModelError::NoLabels);
    }
    Ok(fit_logistic(&names(), &x, &y, None)?)
}

/// The maximum-likelihood coefficients on image samples' coded clinical vectors (those with a known outcome).
pub fn fit_samples(samples: &[&fedslm_cohort::Sample]) -> Result<Vec<f64>, ModelError> {
    let labelled: Vec<&&fedslm_cohort::Sample> =
        samples.iter().filter(|s| s.label.is_some()).collect();
    if labelled.is_empty() {
        return Err(ModelError::NoLabels);
    }
    let p = names().len();
    let mut x = Vec::with_capacity(labelled.len() * p);
    for s in &labelled {
        if s.clinical.len() < p - 1 {
            return Err(ModelError::Input {
                patient: s.patient_id.clone(),
                center: s.center.clone(),
                reason: format!(
                    "{} clinical factors where the model takes {}",
                    s.clinical.len(),
                    p - 1
                ),
            });
        }
        x.push(1.0);
        x.extend(s.clinical.iter().take(p - 1).map(|&v| f64::from(v)));
    }
    let y: Vec<bool> = labelled.iter().map(|s| s.label == Some(true)).collect();
    Ok(fit_logistic(&names(), &x, &y, None)?.coefficients)
}

/// A centre's gradient, Hessian and log-likelihood at `beta`: what it sends for a federated Newton step.
pub fn local_stats(
    coding: &ClinicalCoding,
    patients: &[&Patient],
    beta: &[f64],
) -> Result<LogisticStats, ModelError> {
    let (x, y) = design(coding, patients);
    Ok(logistic_stats(&x, &y, None, beta)?)
}

/// The predicted probability of SLM for a patient.
pub fn predict(coding: &ClinicalCoding, coefficients: &[f64], p: &Patient) -> f64 {
    let eta: f64 = row(coding, p)
        .iter()
        .zip(coefficients)
        .map(|(x, b)| x * b)
        .sum();
    1.0 / (1.0 + (-eta).exp())
}

/// The fitted coefficients and their covariance as f64 tensors.
pub fn to_weights(coefficients: &[f64], covariance: &[f64]) -> Result<Weights, ModelError> {
    let p = coefficients.len();
    Ok(Weights::from_tensors(vec![
        Tensor::from_f64(COEFFICIENTS, vec![p], TensorRole::Parameter, coefficients)?,
        Tensor::from_f64(COVARIANCE, vec![p, p], TensorRole::Parameter, covariance)?,
    ])?)
}

/// The coefficients stored in `weights`.
pub fn coefficients(weights: &Weights) -> Result<Vec<f64>, ModelError> {
    let t = weights.require(COEFFICIENTS)?;
    let values = t.to_f64_vec();
    if values.len() != names().len() {
        return Err(ModelError::Shape {
            name: COEFFICIENTS,
            got: values.len(),
            expected: names().len(),
        });
    }
    Ok(values)
}
