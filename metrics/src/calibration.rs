//! How well predicted probabilities match outcomes: Brier score, calibration intercept and slope,
//! Hosmer-Lemeshow.

use crate::dist::chi_square_sf;
use crate::error::MetricsError;
use crate::logistic::fit_logistic;
use crate::roc::check;

/// Probabilities are clipped to [EPS, 1 - EPS] before taking logits.
const EPS: f64 = 1e-15;

/// Whether every score is a probability; calibration statistics are defined only then.
pub fn are_probabilities(scores: &[f64]) -> bool {
    scores.iter().all(|s| (0.0..=1.0).contains(s))
}

fn check_probabilities(labels: &[bool], probs: &[f64]) -> Result<(), MetricsError> {
    check(labels, probs)?;
    match probs
        .iter()
        .enumerate()
        .find(|(_, p)| !(0.0..=1.0).contains(*p))
    {
        Some((index, &value)) => Err(MetricsError::NotAProbability { index, value }),
        None => Ok(()),
    }
}

/// Mean squared difference between probability and outcome (scikit-learn's `brier_score_loss`).
pub fn brier(labels: &[bool], probs: &[f64]) -> Result<f64, MetricsError> {
    check_probabilities(labels, probs)?;
    let n = labels.len() as f64;
    Ok(labels
        .iter()
        .zip(probs)
        .map(|(&y, &p)| (p - if y { 1.0 } else { 0.0 }).powi(2))
        .sum::<f64>()
        / n)
}

/// Calibration of predicted probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Calibration-in-the-large: the intercept of a logistic model with the prediction's logit as offset
    /// (0 when the average risk is right).
    pub intercept: f64,
    /// Slope of the outcome's logistic regression on the prediction's logit (1 when spread is right,
    /// below 1 when predictions are too extreme).
    pub slope: f64,
    pub hosmer_lemeshow: HosmerLemeshow,
}

/// Hosmer-Lemeshow goodness of fit over groups of predicted risk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HosmerLemeshow {
    pub statistic: f64,
    pub groups: usize,
    /// groups - 2.
    pub df: usize,
    pub p: f64,
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(EPS, 1.0 - EPS);
    (p / (1.0 - p)).ln()
}

/// Calibration intercept, slope and Hosmer-Lemeshow over deciles of predicted risk.
pub fn calibration(labels: &[bool], probs: &[f64]) -> Result<Calibration, MetricsError> {
    check_probabilities(labels, probs)?;
    let lp: Vec<f64> = probs.iter().map(|&p| logit(p)).collect();
    let ones = vec![1.0; labels.len()];
    let intercept = fit_logistic(&["intercept"], &ones, labels, Some(&lp))?.coefficients[0];
    let design: Vec<f64> = lp.iter().flat_map(|&l| [1.0, l]).collect();
    let slope = fit_logistic(&["intercept", "logit"], &design, labels, None)?.coefficients[1];
    Ok(Calibration {
        intercept,
        slope,
        hosmer_lemeshow: hosmer_lemeshow(labels, probs, 10)?,
    })
}

/// A group of patients of similar predicted risk: how many, how many had the outcome, and the sum of their
/// predicted risks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RiskGroup {
    pub count: f64,
    pub observed: f64,
    pub expected: f64,
}

impl RiskGroup {
    /// (mean predicted risk, observed rate): a point of the calibration curve; `None` for an empty group.
    pub fn point(&self) -> Option<(f64, f64)> {
        (self.count > 0.0).then(|| (self.expected / self.count, self.observed / self.count))
    }
}

/// The `g` groups of predicted risk that Hosmer-Lemeshow and the calibration figure share, as R's
/// `ResourceSelection::hoslem.test` cuts them: breaks at `quantile(p, 0:g/g)` (type 7), duplicates dropped (so
/// ties can give fewer groups), each group closed on the right and the first also on the left.
pub fn risk_groups(
    labels: &[bool],
    probs: &[f64],
    g: usize,
) -> Result<Vec<RiskGroup>, MetricsError> {
    check_probabilities(labels, probs)?;
    let mut sorted = probs.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len();
    let quantile = |q: f64| {
        let h = (n as f64 - 1.0) * q;
        let lo = h.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
    };
    let mut breaks: Vec<f64> = (0..=g).map(|k| quantile(k as f64 / g as f64)).collect();
    breaks.dedup();
    let groups = breaks.len().saturating_sub(1).max(1);
    let mut out = vec![RiskGroup::default(); groups];
    for (&y, &p) in labels.iter().zip(probs) {
        // Group k holds (breaks[k], breaks[k+1]]; the first also holds its lower end.
        let k = breaks[1..].partition_point(|&b| b < p).min(groups - 1);
        out[k].observed += if y { 1.0 } else { 0.0 };
        out[k].expected += p;
        out[k].count += 1.0;
    }
    Ok(out)
}

/// Hosmer-Lemeshow with `g` groups cut at the quantiles of predicted risk ([`risk_groups`]), as R's
/// `ResourceSelection::hoslem.test`.
pub fn hosmer_lemeshow(
    labels: &[bool],
    probs: &[f64],
    g: usize,
) -> Result<HosmerLemeshow, MetricsError> {
    let groups = risk_groups(labels, probs, g)?;
    let statistic: f64 = groups
        .iter()
        .filter(|k| k.count > 0.0)
        .map(|k| {
            let (o, e, c) = (k.observed, k.expected, k.count);
            let var = e * (1.0 - e / c);
            if var > 0.0 {
                (o - e).powi(2) / var
            } else {
                0.0
            }
        })
        .sum();
    let df = groups.len().saturating_sub(2);
    Ok(HosmerLemeshow {
        statistic,
        groups: groups.len(),
        df,
        p: if df == 0 {
            f64::NAN
        } else {
            chi_square_sf(statistic, df as f64)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfectly_calibrated_predictions() {
        // Each risk level r holds 20 patients of whom exactly 20 r have the outcome.
        let mut labels = Vec::new();
        let mut probs = Vec::new();
        for r in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95] {
            for k in 0..20 {
                labels.push((k as f64) < 20.0 * r);
                probs.push(r);
            }
        }
        let c = calibration(&labels, &probs).unwrap();
        assert!(c.intercept.abs() < 1e-2, "{c:?}");
        assert!((c.slope - 1.0).abs() < 0.05, "{c:?}");
        assert_eq!(c.hosmer_lemeshow.groups, 10, "{c:?}");
        assert!(c.hosmer_lemeshow.statistic < 1e-20, "{c:?}");
        assert!((c.hosmer_lemeshow.p - 1.0).abs() < 1e-12);
    }

    #[test]
    fn overconfident_predictions_have_a_slope_below_one() {
        let mut labels = Vec::new();
        let mut probs = Vec::new();
        for (r, true_rate) in [
            (0.05, 0.2),
            (0.25, 0.3),
            (0.5, 0.5),
            (0.75, 0.7),
            (0.95, 0.8),
        ] {
            for k in 0..100 {
                labels.push((k as f64) < 100.0 * true_rate);
                probs.push(r);
            }
        }
        let c = calibration(&labels, &probs).unwrap();
        assert!(c.slope < 0.6, "{c:?}");
        assert!(c.hosmer_lemeshow.df >= 2, "{c:?}");
        assert!(c.hosmer_lemeshow.p < 1e-6, "{c:?}");
    }

    #[test]
    fn brier_by_hand_and_refusals() {
        assert!((brier(&[true, false], &[0.8, 0.4]).unwrap() - (0.04 + 0.16) / 2.0).abs() < 1e-15);
        assert!(matches!(
            brier(&[true, false], &[1.5, 0.4]),
            Err(MetricsError::NotAProbability { index: 0, .. })
        ));
        assert!(are_probabilities(&[0.0, 1.0]));
        assert!(!are_probabilities(&[-0.1]));
    }
}
