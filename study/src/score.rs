//! The study's statistics of one set of scores: AUC with DeLong's CI, the Youden cut-off with its confusion,
//! Brier score, calibration, decision curve; paired DeLong tests between scores. `fedslm evaluate` prints
//! them, `fedslm simulate` reports them for the pooled histograms.

use fedslm_metrics as m;
use serde::{Deserialize, Serialize};

use crate::{Context, StudyError};

/// Named values as a JSON object whose keys keep their order.
fn in_order<S: serde::Serializer>(
    pairs: &[(String, ScoreReport)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// Net benefit thresholds of the decision curves: 0.05 to 0.95 by 0.05.
pub const THRESHOLDS: [f64; 19] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9, 0.95,
];

/// Labels and named score columns of the same patients.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    pub labels: Vec<bool>,
    pub scores: Vec<(String, Vec<f64>)>,
}

/// The binned scores as rows, positives first: each patient stands at its bin's centre. Rows are not
/// patients' and carry no pairing between models; ROC, Youden, decision curves and calibration depend only on
/// each class's distribution, which the histograms hold exactly (to the bin).
pub fn binned_rows(h: &m::ScoreHistograms) -> (Vec<bool>, Vec<f64>) {
    let center = |b: usize| h.bin_value(b) + 0.5 / h.bins() as f64;
    let mut labels = Vec::new();
    let mut scores = Vec::new();
    for (class, counts) in [(true, &h.positive), (false, &h.negative)] {
        for (b, &n) in counts.iter().enumerate() {
            for _ in 0..n {
                labels.push(class);
                scores.push(center(b));
            }
        }
    }
    (labels, scores)
}

/// The score report of binned scores (their rows, [`binned_rows`]), or `None` where their AUC is not defined
/// (a class with fewer than 2 patients). Histograms released under differential privacy carry noisy counts,
/// kept non-negative: a small centre's few positives can come back as none, and the study then reports that
/// side as `no AUC (0+/8-)`, as its round summaries do, rather than failing.
pub fn histogram_report(
    name: &str,
    h: &m::ScoreHistograms,
) -> Result<Option<ScoreReport>, StudyError> {
    if h.delong().is_err() {
        return Ok(None);
    }
    let (labels, scores) = binned_rows(h);
    score_report(name, &labels, &scores, &THRESHOLDS).map(Some)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub n: usize,
    pub n_positive: usize,
    /// By score name, in the predictions file's order.
    #[serde(serialize_with = "in_order")]
    pub scores: Vec<(String, ScoreReport)>,
    pub comparisons: Vec<ComparisonReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    pub auc: f64,
    pub ci95: [f64; 2],
    pub delong_var: f64,
    pub youden: YoudenReport,
    pub brier: Option<f64>,
    pub calibration: Option<CalibrationReport>,
    /// Net benefit is defined for predicted probabilities only.
    pub dca: Option<DcaReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct YoudenReport {
    pub threshold: f64,
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
    pub accuracy: Option<f64>,
    pub ppv: Option<f64>,
    pub npv: Option<f64>,
    pub true_positive: usize,
    pub false_positive: usize,
    pub true_negative: usize,
    pub false_negative: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    pub intercept: f64,
    pub slope: f64,
    pub hosmer_lemeshow_p: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DcaReport {
    pub thresholds: Vec<f64>,
    pub net_benefit: Vec<f64>,
    pub treat_all: Vec<f64>,
    pub treat_none: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonReport {
    pub a: String,
    pub b: String,
    pub z: f64,
    pub p: f64,
}

pub fn score_report(
    name: &str,
    labels: &[bool],
    scores: &[f64],
    thresholds: &[f64],
) -> Result<ScoreReport, StudyError> {
    let ctx = || format!("score {name:?}");
    let d = m::auc_delong(labels, scores).context(ctx)?;
    let (lo, hi) = d.ci95();
    let y = m::youden(labels, scores).context(ctx)?;
    let probabilities = m::are_probabilities(scores);
    let dca = if probabilities {
        let c = m::decision_curve(labels, scores, thresholds).context(ctx)?;
        Some(DcaReport {
            thresholds: c.thresholds,
            net_benefit: c.model,
            treat_all: c.treat_all,
            treat_none: c.treat_none,
        })
    } else {
        None
    };
    let calibration = if probabilities {
        match m::calibration(labels, scores) {
            Ok(c) => Some(CalibrationReport {
                intercept: c.intercept,
                slope: c.slope,
                hosmer_lemeshow_p: Some(c.hosmer_lemeshow.p).filter(|p| p.is_finite()),
            }),
            Err(e) => {
                tracing::warn!(score = name, error = %e, "no calibration");
                None
            }
        }
    } else {
        None
    };
    Ok(ScoreReport {
        auc: d.auc,
        ci95: [lo, hi],
        delong_var: d.variance,
        youden: YoudenReport {
            threshold: y.threshold,
            sensitivity: y.sensitivity(),
            specificity: y.specificity(),
            accuracy: y.accuracy(),
            ppv: y.ppv(),
            npv: y.npv(),
            true_positive: y.true_positive,
            false_positive: y.false_positive,
            true_negative: y.true_negative,
            false_negative: y.false_negative,
        },
        brier: if probabilities {
            Some(m::brier(labels, scores)?)
        } else {
            None
        },
        calibration,
        dca,
    })
}

/// Every statistic of every score, and a paired DeLong test for every pair of scores.
pub fn evaluate(
    p: &Predictions,
    thresholds: &[f64],
) -> Result<(Report, Vec<(String, ScoreReport)>), StudyError> {
    let mut per_score = Vec::new();
    for (name, scores) in &p.scores {
        per_score.push((
            name.clone(),
            score_report(name, &p.labels, scores, thresholds)?,
        ));
    }
    let mut comparisons = Vec::new();
    for i in 0..p.scores.len() {
        for j in i + 1..p.scores.len() {
            let (a, b) = (&p.scores[i], &p.scores[j]);
            let t = m::paired_delong(&p.labels, &a.1, &b.1)
                .context(|| format!("comparing {:?} with {:?}", a.0, b.0))?;
            comparisons.push(ComparisonReport {
                a: a.0.clone(),
                b: b.0.clone(),
                z: t.z,
                p: t.p,
            });
        }
    }
    let scores = per_score
        .iter()
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect();
    Ok((
        Report {
            n: p.labels.len(),
            n_positive: p.labels.iter().filter(|&&l| l).count(),
            scores,
            comparisons,
        },
        per_score,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binned_scores_with_an_empty_class_have_no_report_and_no_error() {
        // What DP noise can leave of a small centre's two positives: none.
        let empty = m::ScoreHistograms {
            positive: vec![0; 10],
            negative: vec![1, 0, 2, 0, 3, 0, 1, 0, 1, 0],
        };
        assert_eq!(histogram_report("combined", &empty).unwrap(), None);
        let one = m::ScoreHistograms {
            positive: vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            ..empty.clone()
        };
        assert_eq!(histogram_report("combined", &one).unwrap(), None);
        let two = m::ScoreHistograms {
            positive: vec![0, 0, 0, 0, 0, 0, 1, 0, 1, 0],
            ..empty
        };
        let r = histogram_report("combined", &two).unwrap().unwrap();
        assert!(r.auc > 0.5 && r.auc <= 1.0, "{r:?}");
    }
}
