//! `fedslm simulate --dp-epsilon E`: the study with every site under a differential-privacy budget of ε = E per
//! federation (δ = 1e-5). Each site's policy requires DP with that budget and keeps a ledger in `ledgers/`;
//! each federation's one noise multiplier is calibrated, before it starts, so that a centre that answers every
//! task of the run (its DP-SGD steps or Newton statistics, and its evaluation's histograms) spends at most E;
//! the nodes' own ledgers then enforce it. Under DP the clinical model's federated Newton stops after
//! [`DP_NEWTON_ROUNDS`] (from zero it needs about five steps in the clear; each more round is a release), and
//! evaluations use [`DP_BINS`] bins unless `--bins` says otherwise (every bin's count is noised: more bins,
//! more noise in the pooled histograms). The paired tests' placement sums carry no noise, so sites that
//! require DP refuse them and the comparisons are reported as not computed.
//!
//! The budget is per federation, as a site's `privacy.epsilon` is per run: the study runs a federation per
//! fold and one on all training data for each model, and the same patients take part in several, so each
//! site's whole-study ε (its ledger's lifetime total, in results.json) is larger.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedslm_client::policy::DEFAULT_DELTA;
use fedslm_client::{Budget, Policy};
use fedslm_metrics::rdp::{noise_for_releases, DEFAULT_ORDERS};
use fedslm_model::ModelKind;
use fedslm_server::round::DpSettings;
use serde::{Deserialize, Serialize};

use super::Settings;
use crate::StudyError;

/// Rounds of federated Newton under DP.
pub const DP_NEWTON_ROUNDS: u32 = 5;

/// Histogram bins of an evaluation under DP, unless asked otherwise.
pub const DP_BINS: u32 = 10;

/// How far below the budget the calibration aims, so that the nodes' own composition of the same releases
/// (summed per release, in another order) cannot exceed it by a rounding.
const MARGIN: f64 = 1e-6;

/// What results.json records of a private study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpRecord {
    /// ε of each federation at each site.
    pub epsilon_per_federation: f64,
    pub delta: f64,
    /// Each model's noise multiplier (every release of its federations).
    pub noise_multipliers: BTreeMap<String, f64>,
    /// Each site's ε over the whole study, from its ledger (every federation composed).
    pub study_epsilon_by_center: BTreeMap<String, f64>,
}

/// The site policy of a private simulation.
pub fn policy(epsilon: f64) -> Policy {
    Policy {
        dp_budget: Some(Budget {
            epsilon,
            lifetime_epsilon: None,
            delta: DEFAULT_DELTA,
        }),
        ..Policy::default()
    }
}

/// Where centre `name` keeps its ledger.
pub fn ledger(out: &Path, name: &str) -> PathBuf {
    out.join("ledgers").join(format!("{name}.jsonl"))
}

/// The noise multiplier of a federation of `model` that spends at most `epsilon` at a centre answering
/// every task.
pub fn noise(model: ModelKind, s: &Settings, epsilon: f64) -> Result<f64, StudyError> {
    let q = DpSettings::DEFAULT_SAMPLE_RATE;
    let fits = match model {
        ModelKind::Clinical => (1.0, u64::from(DP_NEWTON_ROUNDS)),
        _ => {
            let steps = u64::from(s.local_epochs) * (1.0 / q).ceil() as u64;
            (q, u64::from(s.rounds) * steps)
        }
    };
    let sigma = noise_for_releases(
        &[fits, (1.0, 1)],
        DEFAULT_DELTA,
        epsilon * (1.0 - MARGIN),
        &DEFAULT_ORDERS,
    )
    .map_err(|e| StudyError::Refused(format!("--dp-epsilon {epsilon}: {e}")))?;
    if !sigma.is_finite() {
        return Err(StudyError::Refused(format!(
            "--dp-epsilon {epsilon}: no noise multiplier up to 10^6 meets it"
        )));
    }
    Ok(sigma)
}

/// The server's `[privacy]` table of a federation at noise `sigma`.
pub fn server_privacy(sigma: f64) -> fedslm_server::config::PrivacyToml {
    fedslm_server::config::PrivacyToml {
        require_dp: true,
        noise_multiplier: Some(sigma),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_metrics::rdp::{composed, epsilon};

    #[test]
    fn a_federation_that_answers_every_task_spends_just_under_the_budget() {
        let s = Settings::default();
        for model in [ModelKind::Clinical, ModelKind::Mri] {
            let sigma = noise(model, &s, 3.0).unwrap();
            let steps = match model {
                ModelKind::Clinical => (1.0, 5),
                _ => (0.25, 10 * 3 * 4),
            };
            let mut total = composed(steps.0, sigma, steps.1, &DEFAULT_ORDERS).unwrap();
            for (t, h) in total
                .iter_mut()
                .zip(composed(1.0, sigma, 1, &DEFAULT_ORDERS).unwrap())
            {
                *t += h;
            }
            let e = epsilon(&DEFAULT_ORDERS, &total, DEFAULT_DELTA)
                .unwrap()
                .epsilon;
            assert!(e <= 3.0 && e > 2.99, "{model}: {e}");
        }
    }
}
