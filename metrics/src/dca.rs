//! Decision-curve analysis (Vickers and Elkin), as the `dcurves` package computes it: a patient is treated
//! when `score >= threshold`, and the net benefit is TP/n - FP/n * pt / (1 - pt).

use crate::error::MetricsError;
use crate::roc::check;

/// Net benefit of the model and of the two default strategies over a threshold grid.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionCurve {
    pub thresholds: Vec<f64>,
    pub model: Vec<f64>,
    pub treat_all: Vec<f64>,
    pub treat_none: Vec<f64>,
}

/// The study's grid: 0.05, 0.10, ..., 0.95.
pub fn default_thresholds() -> Vec<f64> {
    (1..20).map(|i| f64::from(i) / 20.0).collect()
}

pub(crate) fn check_thresholds(thresholds: &[f64]) -> Result<(), MetricsError> {
    match thresholds.iter().find(|t| !(**t > 0.0 && **t < 1.0)) {
        Some(&t) => Err(MetricsError::BadThreshold(t)),
        None => Ok(()),
    }
}

/// Net benefit from counts: `tp` true and `fp` false positives among `n` patients at threshold `pt`.
pub(crate) fn net_benefit(tp: f64, fp: f64, n: f64, pt: f64) -> f64 {
    tp / n - fp / n * (pt / (1.0 - pt))
}

/// The decision curve of `scores` at `thresholds`, each strictly between 0 and 1.
pub fn decision_curve(
    labels: &[bool],
    scores: &[f64],
    thresholds: &[f64],
) -> Result<DecisionCurve, MetricsError> {
    let (positives, _) = check(labels, scores)?;
    check_thresholds(thresholds)?;
    let n = labels.len() as f64;
    // Positives and negatives at or above each score, from a sort: each threshold is then a binary search.
    let mut pairs: Vec<(f64, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let mut pos_from = vec![0usize; pairs.len() + 1];
    for i in (0..pairs.len()).rev() {
        pos_from[i] = pos_from[i + 1] + usize::from(pairs[i].1);
    }
    let mut curve = DecisionCurve {
        thresholds: thresholds.to_vec(),
        model: Vec::with_capacity(thresholds.len()),
        treat_all: Vec::with_capacity(thresholds.len()),
        treat_none: vec![0.0; thresholds.len()],
    };
    for &pt in thresholds {
        let first = pairs.partition_point(|p| p.0 < pt);
        let treated = pairs.len() - first;
        let tp = pos_from[first];
        let fp = treated - tp;
        curve.model.push(net_benefit(tp as f64, fp as f64, n, pt));
        curve
            .treat_all
            .push(net_benefit(positives as f64, n - positives as f64, n, pt));
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        let labels = [true, false, true, false];
        let scores = [0.8, 0.5, 0.3, 0.1];
        let c = decision_curve(&labels, &scores, &[0.5]).unwrap();
        // At 0.5: treated 0.8 (TP) and 0.5 (FP, score equal to the threshold counts): 1/4 - 1/4 * 1.
        assert_eq!(c.model, vec![0.0]);
        assert_eq!(c.treat_all, vec![0.5 - 0.5]);
        assert!(decision_curve(&labels, &scores, &[1.0]).is_err());
        assert_eq!(default_thresholds().len(), 19);
        assert_eq!(default_thresholds()[18], 0.95);
    }
}
