//! ROC curves, AUC and DeLong's variance, as R's pROC computes them with `direction = "<"`: a higher score
//! means positive, and the direction is never flipped to make an AUC look better than 0.5.
//!
//! DeLong by the midrank algorithm of Sun and Xu (2014): O(n log n), one sort, ties counted half.

use crate::dist::{two_sided_p, Z_975};
use crate::error::MetricsError;

/// Validated labels (true = positive) and scores of the same patients.
pub(crate) fn check(labels: &[bool], scores: &[f64]) -> Result<(usize, usize), MetricsError> {
    if labels.len() != scores.len() {
        return Err(MetricsError::LengthMismatch {
            labels: labels.len(),
            scores: scores.len(),
        });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(MetricsError::NonFinite { index, value });
    }
    let positives = labels.iter().filter(|&&l| l).count();
    Ok((positives, labels.len() - positives))
}

pub(crate) fn require(
    positives: usize,
    negatives: usize,
    needed: usize,
) -> Result<(), MetricsError> {
    if positives < needed || negatives < needed {
        return Err(MetricsError::TooFewPerClass {
            needed,
            positives,
            negatives,
        });
    }
    Ok(())
}

/// An AUC with DeLong's variance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AucEstimate {
    pub auc: f64,
    /// DeLong's variance of the AUC (pROC's `var(roc, method = "delong")`).
    pub variance: f64,
    pub n_positive: usize,
    pub n_negative: usize,
}

impl AucEstimate {
    /// 95% CI, `auc ± 1.96 sd`, clipped to [0, 1] (pROC's `ci.auc(method = "delong")`).
    pub fn ci95(&self) -> (f64, f64) {
        let half = Z_975 * self.variance.sqrt();
        ((self.auc - half).max(0.0), (self.auc + half).min(1.0))
    }
}

/// AUC with its DeLong placement values.
#[derive(Debug, Clone, PartialEq)]
pub struct DeLong {
    pub estimate: AucEstimate,
    /// V10: for each positive, the share of negatives it outranks (ties half).
    pub v10: Vec<f64>,
    /// V01: for each negative, the share of positives that outrank it (ties half).
    pub v01: Vec<f64>,
}

fn sample_covariance(a: &[f64], b: &[f64], mean_a: f64, mean_b: f64) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - mean_a) * (y - mean_b))
        .sum::<f64>()
        / (a.len() as f64 - 1.0)
}

/// AUC and DeLong variance from runs of tied scores in ascending order, each run given as (positives,
/// negatives) in it. Within a run each positive outranks the negatives below the run and half of the run's
/// negatives (its V10); each negative is outranked by the positives above the run and half of the run's
/// positives (its V01): Sun and Xu's midrank formula without computing rankings.
pub(crate) fn estimate_from_runs(runs: &[(u64, u64)]) -> Result<AucEstimate, MetricsError> {
    let m: u64 = runs.iter().map(|r| r.0).sum();
    let n: u64 = runs.iter().map(|r| r.1).sum();
    require(m as usize, n as usize, 2)?;
    let (mf, nf) = (m as f64, n as f64);
    let placements = run_placements(runs);
    let auc = runs
        .iter()
        .zip(&placements)
        .map(|(r, v)| r.0 as f64 * v.0)
        .sum::<f64>()
        / mf;
    let (s10, s01) = runs
        .iter()
        .zip(&placements)
        .fold((0.0, 0.0), |(a, b), (r, v)| {
            (
                a + r.0 as f64 * (v.0 - auc).powi(2),
                b + r.1 as f64 * (v.1 - auc).powi(2),
            )
        });
    Ok(AucEstimate {
        auc,
        variance: s10 / (mf - 1.0) / mf + s01 / (nf - 1.0) / nf,
        n_positive: m as usize,
        n_negative: n as usize,
    })
}

/// For each run of tied scores (positives, negatives), in ascending order: (V10 of a positive in it, V01 of a
/// negative in it).
pub(crate) fn run_placements(runs: &[(u64, u64)]) -> Vec<(f64, f64)> {
    let m: u64 = runs.iter().map(|r| r.0).sum();
    let n: u64 = runs.iter().map(|r| r.1).sum();
    let (mf, nf) = (m as f64, n as f64);
    let mut below = 0u64;
    let mut above = m;
    runs.iter()
        .map(|&(p, q)| {
            above -= p;
            let v10 = (below as f64 + 0.5 * q as f64) / nf;
            let v01 = (above as f64 + 0.5 * p as f64) / mf;
            below += q;
            (v10, v01)
        })
        .collect()
}

/// AUC and DeLong variance; needs two patients of each class. O(n log n): one sort per class, then a merge.
pub fn auc_delong(labels: &[bool], scores: &[f64]) -> Result<AucEstimate, MetricsError> {
    let (m, n) = check(labels, scores)?;
    require(m, n, 2)?;
    let mut pos = Vec::with_capacity(m);
    let mut neg = Vec::with_capacity(n);
    for (&l, &s) in labels.iter().zip(scores) {
        if l {
            pos.push(s)
        } else {
            neg.push(s)
        }
    }
    pos.sort_unstable_by(f64::total_cmp);
    neg.sort_unstable_by(f64::total_cmp);
    let mut runs = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < pos.len() || j < neg.len() {
        let v = match (pos.get(i), neg.get(j)) {
            (Some(a), Some(b)) => a.min(*b),
            (Some(a), None) => *a,
            (None, Some(b)) => *b,
            (None, None) => break,
        };
        let (i0, j0) = (i, j);
        while i < pos.len() && pos[i] == v {
            i += 1;
        }
        while j < neg.len() && neg[j] == v {
            j += 1;
        }
        runs.push(((i - i0) as u64, (j - j0) as u64));
    }
    estimate_from_runs(&runs)
}

/// AUC and DeLong variance with each patient's placement values, for paired tests.
///
/// One sort of the scores: within a run of tied scores holding `p` positives and `q` negatives, each positive
/// outranks the negatives below the run and half of the `q` (its V10), and each negative is outranked by the
/// positives above the run and half of the `p` (its V01). This is Sun and Xu's midrank formula, V10 =
/// (rank among all - rank among positives) / n, without computing the three rankings.
pub fn delong(labels: &[bool], scores: &[f64]) -> Result<DeLong, MetricsError> {
    let (m, n) = check(labels, scores)?;
    require(m, n, 2)?;
    // Each patient's index among its own class, so that placements keep the input order (paired tests match
    // patients across two scores by it).
    let mut class_index = Vec::with_capacity(labels.len());
    let (mut seen_pos, mut seen_neg) = (0u32, 0u32);
    for &l in labels {
        let counter = if l { &mut seen_pos } else { &mut seen_neg };
        class_index.push(*counter);
        *counter += 1;
    }
    let mut order: Vec<(f64, u32)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, i as u32))
        .collect();
    order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let (mf, nf) = (m as f64, n as f64);
    let mut v10 = vec![0.0; m];
    let mut v01 = vec![0.0; n];
    let mut negatives_below = 0usize;
    let mut positives_above = m;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        let (mut p, mut q) = (0usize, 0usize);
        while j < order.len() && order[j].0 == order[i].0 {
            if labels[order[j].1 as usize] {
                p += 1;
            } else {
                q += 1;
            }
            j += 1;
        }
        positives_above -= p;
        let case_v = (negatives_below as f64 + 0.5 * q as f64) / nf;
        let control_v = (positives_above as f64 + 0.5 * p as f64) / mf;
        for &(_, idx) in &order[i..j] {
            let idx = idx as usize;
            if labels[idx] {
                v10[class_index[idx] as usize] = case_v;
            } else {
                v01[class_index[idx] as usize] = control_v;
            }
        }
        negatives_below += q;
        i = j;
    }
    Ok(DeLong {
        estimate: auc_delong(labels, scores)?,
        v10,
        v01,
    })
}

/// A test of two AUCs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub auc_a: f64,
    pub auc_b: f64,
    pub z: f64,
    /// Two-sided.
    pub p: f64,
}

/// DeLong's test for two scores of the same patients (pROC's `roc.test(paired = TRUE, method = "delong")`).
pub fn paired_delong(labels: &[bool], a: &[f64], b: &[f64]) -> Result<Comparison, MetricsError> {
    let da = delong(labels, a)?;
    let db = delong(labels, b)?;
    Ok(paired_from(&da, &db))
}

/// The paired test from two DeLong results of the same patients in the same order.
pub fn paired_from(a: &DeLong, b: &DeLong) -> Comparison {
    let (ea, eb) = (a.estimate, b.estimate);
    let (m, n) = (ea.n_positive as f64, ea.n_negative as f64);
    let cov = sample_covariance(&a.v10, &b.v10, ea.auc, eb.auc) / m
        + sample_covariance(&a.v01, &b.v01, ea.auc, eb.auc) / n;
    comparison(ea.auc, eb.auc, ea.variance + eb.variance - 2.0 * cov)
}

/// DeLong's test for AUCs of two independent cohorts (pROC's unpaired `roc.test(method = "delong")`).
pub fn unpaired_delong(a: &AucEstimate, b: &AucEstimate) -> Comparison {
    comparison(a.auc, b.auc, a.variance + b.variance)
}

pub(crate) fn comparison(auc_a: f64, auc_b: f64, variance: f64) -> Comparison {
    let z = (auc_a - auc_b) / variance.sqrt();
    // Identical curves: no evidence of a difference, not NaN.
    let (z, p) = if variance <= 0.0 && auc_a == auc_b {
        (0.0, 1.0)
    } else {
        (z, two_sided_p(z))
    };
    Comparison { auc_a, auc_b, z, p }
}

/// One point of a ROC curve: patients with `score > threshold` are called positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RocPoint {
    pub threshold: f64,
    pub sensitivity: f64,
    pub specificity: f64,
}

/// The empirical ROC curve with pROC's thresholds: -inf, the midpoints between adjacent distinct scores,
/// +inf; from sensitivity 1 down to 0.
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Result<Vec<RocPoint>, MetricsError> {
    let (m, n) = check(labels, scores)?;
    require(m, n, 1)?;
    let mut pairs: Vec<(f64, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let (mf, nf) = (m as f64, n as f64);
    let mut points = vec![RocPoint {
        threshold: f64::NEG_INFINITY,
        sensitivity: 1.0,
        specificity: 0.0,
    }];
    // Sweep upwards: below the threshold are the true and false negatives.
    let (mut fn_, mut tn) = (0usize, 0usize);
    let mut i = 0;
    while i < pairs.len() {
        let value = pairs[i].0;
        while i < pairs.len() && pairs[i].0 == value {
            if pairs[i].1 {
                fn_ += 1;
            } else {
                tn += 1;
            }
            i += 1;
        }
        let threshold = if i < pairs.len() {
            (value + pairs[i].0) / 2.0
        } else {
            f64::INFINITY
        };
        points.push(RocPoint {
            threshold,
            sensitivity: (m - fn_) as f64 / mf,
            specificity: tn as f64 / nf,
        });
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The O(n^2) definitions, for checking the fast ones.
    fn slow(labels: &[bool], scores: &[f64]) -> (f64, f64) {
        let pos: Vec<f64> = labels
            .iter()
            .zip(scores)
            .filter(|p| *p.0)
            .map(|p| *p.1)
            .collect();
        let neg: Vec<f64> = labels
            .iter()
            .zip(scores)
            .filter(|p| !*p.0)
            .map(|p| *p.1)
            .collect();
        let psi = |x: f64, y: f64| {
            if x > y {
                1.0
            } else if x == y {
                0.5
            } else {
                0.0
            }
        };
        let v10: Vec<f64> = pos
            .iter()
            .map(|&x| neg.iter().map(|&y| psi(x, y)).sum::<f64>() / neg.len() as f64)
            .collect();
        let v01: Vec<f64> = neg
            .iter()
            .map(|&y| pos.iter().map(|&x| psi(x, y)).sum::<f64>() / pos.len() as f64)
            .collect();
        let auc = v10.iter().sum::<f64>() / pos.len() as f64;
        let sample_variance = |v: &[f64], mean: f64| {
            v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (v.len() as f64 - 1.0)
        };
        let var = sample_variance(&v10, auc) / pos.len() as f64
            + sample_variance(&v01, auc) / neg.len() as f64;
        (auc, var)
    }

    proptest::proptest! {
        #[test]
        fn fast_delong_equals_the_definition(
            data in proptest::collection::vec((proptest::bool::ANY, 0u8..12), 4..60)
        ) {
            let labels: Vec<bool> = data.iter().map(|d| d.0).collect();
            let scores: Vec<f64> = data.iter().map(|d| f64::from(d.1) / 4.0).collect();
            let (m, n) = check(&labels, &scores).unwrap();
            proptest::prop_assume!(m >= 2 && n >= 2);
            let d = delong(&labels, &scores).unwrap();
            let (auc, var) = slow(&labels, &scores);
            // The placements agree with the estimate.
            proptest::prop_assert!((d.v10.iter().sum::<f64>() / m as f64 - auc).abs() < 1e-12);
            proptest::prop_assert!((d.v01.iter().sum::<f64>() / n as f64 - auc).abs() < 1e-12);
            proptest::prop_assert!((d.estimate.auc - auc).abs() < 1e-12);
            proptest::prop_assert!((d.estimate.variance - var).abs() < 1e-12);
            // The trapezoid under the ROC curve is the same AUC.
            let roc = roc_curve(&labels, &scores).unwrap();
            let area: f64 = roc
                .windows(2)
                .map(|w| (w[1].specificity - w[0].specificity) * (w[0].sensitivity + w[1].sensitivity) / 2.0)
                .sum();
            proptest::prop_assert!((area - auc).abs() < 1e-12);
        }
    }

    #[test]
    fn the_direction_is_never_flipped() {
        let labels = [true, true, false, false];
        let d = delong(&labels, &[0.1, 0.2, 0.8, 0.9]).unwrap();
        assert_eq!(d.estimate.auc, 0.0);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            delong(&[true, false], &[0.1]),
            Err(MetricsError::LengthMismatch { .. })
        ));
        assert!(matches!(
            delong(&[true, true, false, false], &[0.1, f64::NAN, 0.2, 0.3]),
            Err(MetricsError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            delong(&[true, false, false], &[0.1, 0.2, 0.3]),
            Err(MetricsError::TooFewPerClass { positives: 1, .. })
        ));
    }
}

#[cfg(test)]
mod unpaired_tests {
    use super::*;

    #[test]
    fn unpaired_is_the_difference_over_the_summed_variances() {
        // Two cohorts: their variances add, with no covariance term.
        let a = AucEstimate {
            auc: 0.85,
            variance: 0.0016,
            n_positive: 40,
            n_negative: 60,
        };
        let b = AucEstimate {
            auc: 0.70,
            variance: 0.0009,
            n_positive: 12,
            n_negative: 19,
        };
        let t = unpaired_delong(&a, &b);
        let z = 0.15 / 0.0025f64.sqrt();
        assert!((t.z - z).abs() < 1e-12);
        // R: 2 * pnorm(-3) = 0.002699796063260207
        assert!((t.p - 0.002_699_796_063_260_207).abs() < 1e-15);
        assert_eq!(unpaired_delong(&a, &a).p, 1.0);
    }
}
