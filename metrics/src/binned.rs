//! Federated evaluation without patient rows: per-class histograms of predicted probabilities, mergeable
//! across centres, from which AUC, DeLong variance and CI, ROC points and net benefit follow exactly for the
//! binned scores (each score rounded down to its bin's lower edge, `floor(p * B) / B`).
//!
//! A paired DeLong test needs each patient's two placements together, which histograms cannot give: given the
//! pooled histograms of both models, each centre returns [`PlacementSums`] over its patients, and the sums
//! from all centres give the test.

use crate::dca::{check_thresholds, net_benefit, DecisionCurve};
use crate::error::MetricsError;
use crate::roc::{
    check, comparison, estimate_from_runs, require, run_placements, AucEstimate, Comparison,
    RocPoint,
};

/// The default number of bins: fine enough that binning moves an AUC by well under 1e-3.
pub const DEFAULT_BINS: usize = 10_000;

/// Counts of positive and negative patients per bin of predicted probability over [0, 1].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreHistograms {
    pub positive: Vec<u64>,
    pub negative: Vec<u64>,
}

fn check_probability(index: usize, p: f64) -> Result<(), MetricsError> {
    if !p.is_finite() {
        return Err(MetricsError::NonFinite { index, value: p });
    }
    if !(0.0..=1.0).contains(&p) {
        return Err(MetricsError::NotAProbability { index, value: p });
    }
    Ok(())
}

impl ScoreHistograms {
    pub fn new(bins: usize) -> Result<ScoreHistograms, MetricsError> {
        if bins == 0 {
            return Err(MetricsError::NoBins);
        }
        Ok(ScoreHistograms {
            positive: vec![0; bins],
            negative: vec![0; bins],
        })
    }

    /// Histograms of probabilities in [0, 1].
    pub fn from_scores(
        labels: &[bool],
        probs: &[f64],
        bins: usize,
    ) -> Result<ScoreHistograms, MetricsError> {
        check(labels, probs)?;
        let mut h = ScoreHistograms::new(bins)?;
        for (i, (&y, &p)) in labels.iter().zip(probs).enumerate() {
            check_probability(i, p)?;
            let b = h.bin_of(p);
            if y {
                h.positive[b] += 1;
            } else {
                h.negative[b] += 1;
            }
        }
        Ok(h)
    }

    pub fn bins(&self) -> usize {
        self.positive.len()
    }

    /// The bin of probability `p`: `floor(p * B)`, with 1 in the last bin.
    pub fn bin_of(&self, p: f64) -> usize {
        let b = self.bins();
        ((p * b as f64).floor() as usize).min(b - 1)
    }

    /// The score a bin stands for: its lower edge.
    pub fn bin_value(&self, bin: usize) -> f64 {
        bin as f64 / self.bins() as f64
    }

    /// Adds another centre's histograms.
    pub fn merge(&mut self, other: &ScoreHistograms) -> Result<(), MetricsError> {
        if other.bins() != self.bins() || other.negative.len() != self.negative.len() {
            return Err(MetricsError::BinMismatch(self.bins(), other.bins()));
        }
        for (a, b) in self.positive.iter_mut().zip(&other.positive) {
            *a += b;
        }
        for (a, b) in self.negative.iter_mut().zip(&other.negative) {
            *a += b;
        }
        Ok(())
    }

    pub fn n_positive(&self) -> u64 {
        self.positive.iter().sum()
    }

    pub fn n_negative(&self) -> u64 {
        self.negative.iter().sum()
    }

    /// V10 of each bin (for a positive patient there) and V01 (for a negative one), in one pass each way.
    fn placements(&self) -> (Vec<f64>, Vec<f64>) {
        run_placements(&self.runs()).into_iter().unzip()
    }

    /// Each bin as a run of tied scores: (positives, negatives).
    fn runs(&self) -> Vec<(u64, u64)> {
        self.positive
            .iter()
            .copied()
            .zip(self.negative.iter().copied())
            .collect()
    }

    /// AUC and DeLong variance of the binned scores: each bin is a run of tied scores.
    pub fn delong(&self) -> Result<AucEstimate, MetricsError> {
        estimate_from_runs(&self.runs())
    }

    /// The ROC curve of the binned scores, with thresholds between adjacent occupied bins.
    pub fn roc_curve(&self) -> Result<Vec<RocPoint>, MetricsError> {
        let (m, n) = (self.n_positive(), self.n_negative());
        require(m as usize, n as usize, 1)?;
        let occupied: Vec<usize> = (0..self.bins())
            .filter(|&i| self.positive[i] + self.negative[i] > 0)
            .collect();
        let mut points = vec![RocPoint {
            threshold: f64::NEG_INFINITY,
            sensitivity: 1.0,
            specificity: 0.0,
        }];
        let (mut fn_, mut tn) = (0u64, 0u64);
        for (k, &i) in occupied.iter().enumerate() {
            fn_ += self.positive[i];
            tn += self.negative[i];
            let threshold = occupied.get(k + 1).map_or(f64::INFINITY, |&next| {
                (self.bin_value(i) + self.bin_value(next)) / 2.0
            });
            points.push(RocPoint {
                threshold,
                sensitivity: (m - fn_) as f64 / m as f64,
                specificity: tn as f64 / n as f64,
            });
        }
        Ok(points)
    }

    /// Net benefit of the binned scores: a bin is treated when its value is at least the threshold.
    pub fn decision_curve(&self, thresholds: &[f64]) -> Result<DecisionCurve, MetricsError> {
        check_thresholds(thresholds)?;
        let (m, n) = (self.n_positive() as f64, self.n_negative() as f64);
        let total = m + n;
        if total == 0.0 {
            return Err(MetricsError::TooFewPerClass {
                needed: 1,
                positives: 0,
                negatives: 0,
            });
        }
        let mut curve = DecisionCurve {
            thresholds: thresholds.to_vec(),
            model: Vec::new(),
            treat_all: Vec::new(),
            treat_none: vec![0.0; thresholds.len()],
        };
        for &pt in thresholds {
            let (mut tp, mut fp) = (0u64, 0u64);
            for i in (0..self.bins()).filter(|&i| self.bin_value(i) >= pt) {
                tp += self.positive[i];
                fp += self.negative[i];
            }
            curve
                .model
                .push(net_benefit(tp as f64, fp as f64, total, pt));
            curve.treat_all.push(net_benefit(m, n, total, pt));
        }
        Ok(curve)
    }
}

/// One centre's sums of DeLong placement values of two models, against the pooled histograms of both.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PlacementSums {
    pub n_positive: u64,
    pub n_negative: u64,
    /// Over positive patients: sums of V10_A, V10_B, V10_A², V10_B², V10_A·V10_B.
    pub positive: [f64; 5],
    /// Over negative patients: the same for V01.
    pub negative: [f64; 5],
}

impl PlacementSums {
    /// A centre's sums for its patients' probabilities under models A and B, given the pooled histograms.
    pub fn from_patients(
        pooled_a: &ScoreHistograms,
        pooled_b: &ScoreHistograms,
        labels: &[bool],
        probs_a: &[f64],
        probs_b: &[f64],
    ) -> Result<PlacementSums, MetricsError> {
        check(labels, probs_a)?;
        check(labels, probs_b)?;
        let counts = |h: &ScoreHistograms| (h.n_positive(), h.n_negative());
        if counts(pooled_a) != counts(pooled_b) {
            return Err(MetricsError::DifferentPatients {
                a: counts(pooled_a),
                b: counts(pooled_b),
            });
        }
        let (a10, a01) = pooled_a.placements();
        let (b10, b01) = pooled_b.placements();
        let mut s = PlacementSums::default();
        for (i, ((&y, &pa), &pb)) in labels.iter().zip(probs_a).zip(probs_b).enumerate() {
            check_probability(i, pa)?;
            check_probability(i, pb)?;
            let (ba, bb) = (pooled_a.bin_of(pa), pooled_b.bin_of(pb));
            let (va, vb, sums) = if y {
                s.n_positive += 1;
                (a10[ba], b10[bb], &mut s.positive)
            } else {
                s.n_negative += 1;
                (a01[ba], b01[bb], &mut s.negative)
            };
            for (k, v) in [va, vb, va * va, vb * vb, va * vb].into_iter().enumerate() {
                sums[k] += v;
            }
        }
        Ok(s)
    }

    pub fn add(&mut self, other: &PlacementSums) {
        self.n_positive += other.n_positive;
        self.n_negative += other.n_negative;
        for k in 0..5 {
            self.positive[k] += other.positive[k];
            self.negative[k] += other.negative[k];
        }
    }

    /// The paired DeLong test from all centres' sums.
    pub fn paired_test(&self) -> Result<Comparison, MetricsError> {
        require(self.n_positive as usize, self.n_negative as usize, 2)?;
        // Sample variances and covariance from sums: (S_xy - k mean_x mean_y) / (k - 1).
        let moments = |s: &[f64; 5], k: f64| {
            let (ma, mb) = (s[0] / k, s[1] / k);
            let var_a = (s[2] - k * ma * ma) / (k - 1.0);
            let var_b = (s[3] - k * mb * mb) / (k - 1.0);
            let cov = (s[4] - k * ma * mb) / (k - 1.0);
            (ma, mb, var_a, var_b, cov)
        };
        let (m, n) = (self.n_positive as f64, self.n_negative as f64);
        let (auc_a, auc_b, pa, pb, pc) = moments(&self.positive, m);
        let (_, _, na, nb, nc) = moments(&self.negative, n);
        let var = (pa + pb - 2.0 * pc) / m + (na + nb - 2.0 * nc) / n;
        Ok(comparison(auc_a, auc_b, var))
    }
}
