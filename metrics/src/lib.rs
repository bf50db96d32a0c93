//! The study's statistics, pure and in f64: ROC curves and AUC, DeLong variance, confidence intervals and
//! paired tests, Youden cut-offs, decision-curve net benefit, Brier score and calibration, score histograms
//! for federated evaluation, and logistic regression by Newton's method from sufficient statistics (shared by
//! the clinical model and the server's federated Newton).
//!
//! Checked against R pROC, scikit-learn, statsmodels and dcurves in `shared/reference` (tests/reference.rs).

pub mod binned;
pub mod calibration;
pub mod cutoff;
pub mod dca;
pub mod dist;
pub mod dp;
mod error;
pub mod logistic;
pub mod rdp;
pub mod roc;

pub use binned::{PlacementSums, ScoreHistograms, DEFAULT_BINS};
pub use calibration::{
    are_probabilities, brier, calibration, hosmer_lemeshow, risk_groups, Calibration,
    HosmerLemeshow, RiskGroup,
};
pub use cutoff::{at_cutoff, youden, AtCutoff};
pub use dca::{decision_curve, default_thresholds, DecisionCurve};
pub use error::MetricsError;
pub use logistic::{
    fit_logistic, fit_newton, logistic_stats, LogisticError, LogisticFit, LogisticStats,
    NewtonOptions, NewtonSolver, NewtonStep,
};
pub use roc::{
    auc_delong, delong, paired_delong, paired_from, roc_curve, unpaired_delong, AucEstimate,
    Comparison, DeLong, RocPoint,
};
