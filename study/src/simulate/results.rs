//! The study's results as typed records: results.json is these serialised, and report.md and the printed
//! table are rendered from them (`report.rs`).

use std::collections::BTreeMap;

use fedslm_server::evaluation::AucSummary;
use serde::{Deserialize, Serialize};

use crate::score::ScoreReport;

/// `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyResults {
    pub software: String,
    pub cohort: String,
    /// The centre held out for external validation.
    pub holdout: Option<String>,
    pub settings: SettingsRecord,
    /// By model name.
    pub models: BTreeMap<String, ModelResults>,
    /// Paired DeLong tests of each model against the combined network.
    pub comparisons: Vec<ComparisonResult>,
    pub wall_seconds: f64,
    pub peak_memory_mib: f64,
    /// Where the wall time went, phase by phase, in order (figures and report.md, written after
    /// results.json, are not among them).
    #[serde(default)]
    pub phases: Vec<Phase>,
}

/// One phase of a run and its wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
}

impl StudyResults {
    /// `cohort 9 s, sites 6 s, clinical federations 3 s, ...`.
    pub fn phases_line(&self) -> String {
        self.phases
            .iter()
            .map(|p| format!("{} {:.1} s", p.name, p.seconds))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The settings a run was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingsRecord {
    pub folds: u32,
    pub rounds: u32,
    pub local_epochs: u32,
    pub bins: u32,
    /// The synthetic cohort's seed (where the run wrote one).
    pub seed: u64,
    /// The seed of initial weights, folds, batches and augmentation.
    #[serde(default)]
    pub training_seed: u64,
    /// The methods against scanner shift (`augment`, `adabn`, `fedbn`, `standardise`, smoothing, field of
    /// view), or `none`.
    #[serde(default)]
    pub shift: Vec<String>,
    /// Under `standardise`: the intensity scale the landmarks round agreed (client.toml's
    /// `[preprocess.intensity_scale]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intensity_scale: Option<fedslm_cohort::IntensityScale>,
    pub network: String,
    /// Under `--dp-epsilon`: the budget, the noise, and each site's whole-study ε.
    #[serde(default)]
    pub dp: Option<super::privacy::DpRecord>,
    /// Whether every federation aggregated securely.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_aggregation: bool,
}

/// One model's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResults {
    /// The combined network's head start ("the clinical model federated on the same patients", or why none).
    pub head_start: Option<String>,
    /// The centralised baseline (absent with `--no-centralised`).
    pub centralised: Option<CentralisedResult>,
    /// The folds' held-out histograms pooled (absent without cross-validation).
    pub internal: Option<SideResult>,
    /// The held-out centre, by the federation on all training data.
    pub external: Option<SideResult>,
    /// Each training centre's out-of-fold AUC.
    pub per_center_internal: BTreeMap<String, AucSummary>,
    pub rounds: RoundsRecord,
    pub final_model: String,
    /// The audit head of the federation on all training data.
    pub audit_head: String,
    /// The Youden cut-off chosen on the internal scores.
    pub youden_cutoff: Option<f64>,
    pub internal_report: Option<ScoreReport>,
    pub external_report: Option<ScoreReport>,
}

/// An AUC, and the sensitivity and specificity at the internal Youden cut-off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SideResult {
    #[serde(flatten)]
    pub auc: AucSummary,
    pub at_internal_youden: Option<AtCutoff>,
}

/// Sensitivity and specificity at a cut-off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AtCutoff {
    pub threshold: f64,
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
}

/// Rounds each federation ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundsRecord {
    /// Each cross-validation fold's federation.
    pub folds: Vec<u32>,
    /// The federation on all training data.
    #[serde(rename = "final")]
    pub all: u32,
}

/// The centralised baseline of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralisedResult {
    /// Out of fold.
    pub internal: Option<AucSummary>,
    /// At the held-out centre.
    pub external: Option<AucSummary>,
    pub model: String,
    pub seconds: f64,
}

/// A paired DeLong test of model `a` against `b`, or why it could not be made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonResult {
    pub a: String,
    pub b: String,
    /// `internal` or `external`.
    pub side: String,
    #[serde(flatten)]
    pub outcome: ComparisonOutcome,
}

/// The test's figures, or the reason there are none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ComparisonOutcome {
    Tested {
        auc_a: f64,
        auc_b: f64,
        z: f64,
        p: f64,
    },
    NotComputed {
        error: String,
    },
}

impl ComparisonResult {
    /// The test's p value, where it was made.
    pub fn p(&self) -> Option<f64> {
        match self.outcome {
            ComparisonOutcome::Tested { p, .. } => Some(p),
            ComparisonOutcome::NotComputed { .. } => None,
        }
    }
}
