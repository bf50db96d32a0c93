//! `fedslm simulate --dp-epsilon E`: the study with every site under a differential-privacy budget of ε = E per
//! federation (δ = 1e-5). Each site's policy requires DP with that budget and keeps a ledger in `ledgers/`;
//! each federation's one noise multiplier is calibrated, before it starts, so that a centre that answers every
//! task of the run (its DP-SGD steps or Newton statistics, and its evaluation's histograms) spends at most E;
//! the nodes' own ledgers then enforce it. Under DP the clinical model's federated Newton stops after
//! [`DP_NEWTON_ROUNDS`] (from zero it needs about five steps in the clear; each more round is a release), and
//! evaluations use [`DP_BINS`] bins unless `--bins` says otherwise (every bin's count is noised: more bins,
//! more noise in the pooled histograms). The paired tests' placement sums carry no noise, so sites that
//! require DP refuse them and the comparisons are reported as not computed. The noise is the server's to
//! calibrate (`DpSettings::calibrated`), as server.toml's `privacy.epsilon` asks.
//!
//! The budget is per federation, as a site's `privacy.epsilon` is per run: the study runs a federation per
//! fold and one on all training data for each model, and the same patients take part in several, so each
//! site's whole-study ε (its ledger's lifetime total, in results.json) is larger.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedslm_client::policy::DEFAULT_DELTA;
use fedslm_client::{Budget, Policy};
use serde::{Deserialize, Serialize};

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

/// The server's `[privacy]` table of a federation under a budget of `epsilon`: the server calibrates its
/// noise to it (a hair below, [`MARGIN`]).
pub fn server_privacy(epsilon: f64) -> fedslm_server::config::PrivacyToml {
    fedslm_server::config::PrivacyToml {
        require_dp: true,
        epsilon: Some(epsilon * (1.0 - MARGIN)),
        delta: Some(DEFAULT_DELTA),
        ..Default::default()
    }
}
