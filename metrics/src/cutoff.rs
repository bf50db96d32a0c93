//! Cut-offs: the confusion matrix and its measures at a threshold, and the Youden-optimal threshold.

use crate::error::MetricsError;
use crate::roc::{check, roc_curve};

/// Counts at a cut-off and the measures built on them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AtCutoff {
    pub threshold: f64,
    pub true_positive: usize,
    pub false_positive: usize,
    pub true_negative: usize,
    pub false_negative: usize,
}

impl AtCutoff {
    fn ratio(num: usize, den: usize) -> Option<f64> {
        (den > 0).then(|| num as f64 / den as f64)
    }

    pub fn n(&self) -> usize {
        self.true_positive + self.false_positive + self.true_negative + self.false_negative
    }

    /// `None` when there is no positive patient.
    pub fn sensitivity(&self) -> Option<f64> {
        Self::ratio(self.true_positive, self.true_positive + self.false_negative)
    }

    pub fn specificity(&self) -> Option<f64> {
        Self::ratio(self.true_negative, self.true_negative + self.false_positive)
    }

    pub fn accuracy(&self) -> Option<f64> {
        Self::ratio(self.true_positive + self.true_negative, self.n())
    }

    /// Positive predictive value; `None` when nobody is called positive.
    pub fn ppv(&self) -> Option<f64> {
        Self::ratio(self.true_positive, self.true_positive + self.false_positive)
    }

    /// Negative predictive value; `None` when nobody is called negative.
    pub fn npv(&self) -> Option<f64> {
        Self::ratio(self.true_negative, self.true_negative + self.false_negative)
    }
}

/// The confusion matrix with patients called positive when `score >= threshold`, so that a cut-off fixed on
/// one cohort can be applied unchanged to another.
pub fn at_cutoff(
    labels: &[bool],
    scores: &[f64],
    threshold: f64,
) -> Result<AtCutoff, MetricsError> {
    check(labels, scores)?;
    let mut c = AtCutoff {
        threshold,
        true_positive: 0,
        false_positive: 0,
        true_negative: 0,
        false_negative: 0,
    };
    for (&label, &score) in labels.iter().zip(scores) {
        match (label, score >= threshold) {
            (true, true) => c.true_positive += 1,
            (false, true) => c.false_positive += 1,
            (false, false) => c.true_negative += 1,
            (true, false) => c.false_negative += 1,
        }
    }
    Ok(c)
}

/// The threshold maximising sensitivity + specificity among pROC's ROC thresholds (midpoints between
/// adjacent distinct scores), as `coords(roc, "best", best.method = "youden")`. Where several thresholds tie,
/// the lowest is taken (the most sensitive, in a screening for metastases). Infinite thresholds, which call
/// everyone negative or everyone positive, are never chosen.
pub fn youden(labels: &[bool], scores: &[f64]) -> Result<AtCutoff, MetricsError> {
    let roc = roc_curve(labels, scores)?;
    let best =
        roc.iter()
            .filter(|p| p.threshold.is_finite())
            .fold(None::<(f64, f64)>, |best, p| {
                let j = p.sensitivity + p.specificity;
                match best {
                    Some((_, bj)) if bj >= j => best,
                    _ => Some((p.threshold, j)),
                }
            });
    // With a single distinct score there is no finite threshold: the best is to call everyone positive.
    let threshold = best.map_or(f64::NEG_INFINITY, |b| b.0);
    at_cutoff(labels, scores, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_measures() {
        let labels = [true, true, true, false, false, false, false];
        let scores = [0.9, 0.6, 0.3, 0.6, 0.2, 0.1, 0.05];
        let c = at_cutoff(&labels, &scores, 0.6).unwrap();
        assert_eq!(
            (
                c.true_positive,
                c.false_negative,
                c.false_positive,
                c.true_negative
            ),
            (2, 1, 1, 3)
        );
        assert_eq!(c.sensitivity(), Some(2.0 / 3.0));
        assert_eq!(c.specificity(), Some(0.75));
        assert_eq!(c.ppv(), Some(2.0 / 3.0));
        assert_eq!(c.npv(), Some(0.75));
        assert_eq!(c.accuracy(), Some(5.0 / 7.0));
        assert_eq!(at_cutoff(&labels, &scores, 2.0).unwrap().ppv(), None);

        let y = youden(&labels, &scores).unwrap();
        // Midpoint between 0.2 and 0.3: sens 1, spec 0.75.
        assert!((y.threshold - 0.25).abs() < 1e-15);
        assert_eq!((y.sensitivity(), y.specificity()), (Some(1.0), Some(0.75)));
    }
}
