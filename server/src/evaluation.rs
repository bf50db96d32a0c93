//! An evaluation round's aggregates, pure: each centre's counts, loss and score histograms, pooled into the
//! internal estimate (training centres: their held-out fold under cross-validation) and the external one
//! (validation centres, whole cohorts), with AUC and DeLong's CI exactly for the binned scores. Nothing here is
//! per patient.

use fedslm_metrics::ScoreHistograms;
use fedslm_protocol::{CenterId, EvalReport, Fold, Role};
use serde_json::{json, Value};

/// What one centre reported.
#[derive(Debug, Clone, PartialEq)]
pub struct CentreEvaluation {
    pub center: CenterId,
    pub role: Role,
    pub examples: u64,
    pub positives: u64,
    /// Mean log-loss.
    pub loss: f64,
    pub histogram: ScoreHistograms,
}

/// Why a report is refused: it must be the aggregate of what was asked.
pub fn check_report(report: &EvalReport, round: u32, bins: u32) -> Result<ScoreHistograms, String> {
    if report.round != round {
        return Err(format!(
            "evaluation of round {}, but round {round} was asked",
            report.round
        ));
    }
    let h = &report.histogram;
    if h.positive.len() != bins as usize || h.negative.len() != bins as usize {
        return Err(format!(
            "{} and {} histogram bins, but {bins} were asked",
            h.positive.len(),
            h.negative.len()
        ));
    }
    let pos: u64 = h.positive.iter().sum();
    let neg: u64 = h.negative.iter().sum();
    if pos != report.positives || pos.checked_add(neg) != Some(report.examples) {
        return Err(format!(
            "the histograms count {pos} positive and {neg} negative patients, the report says {} of {}",
            report.positives, report.examples
        ));
    }
    if report.examples == 0 {
        return Err("no patient evaluated".into());
    }
    if !report.loss.is_finite() || report.loss < 0.0 {
        return Err(format!("loss {} is not a finite log-loss", report.loss));
    }
    Ok(ScoreHistograms {
        positive: h.positive.clone(),
        negative: h.negative.clone(),
    })
}

/// One evaluation round.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub round: u32,
    /// The training centres' held-out fold, under cross-validation.
    pub fold: Option<Fold>,
    pub bins: u32,
    pub centres: Vec<CentreEvaluation>,
    /// Centres asked that did not report, and why.
    pub missing: Vec<(CenterId, String)>,
}

impl Evaluation {
    /// The merged histograms of the centres with `role`; `None` if none reported.
    pub fn pooled(&self, role: Role) -> Option<ScoreHistograms> {
        let mut it = self.centres.iter().filter(|c| c.role == role);
        let mut pooled = it.next()?.histogram.clone();
        for c in it {
            // Every report was checked to have `bins` bins.
            pooled.merge(&c.histogram).ok()?;
        }
        Some(pooled)
    }

    /// The record the store keeps and the report reads: per centre and pooled, AUC with DeLong's 95% CI where
    /// both classes are present, and the histograms themselves (for pooling folds later).
    pub fn to_json(&self) -> Value {
        let centres: Vec<Value> = self
            .centres
            .iter()
            .map(|c| {
                json!({
                    "center": c.center.as_str(),
                    "role": role_name(c.role),
                    "examples": c.examples,
                    "positives": c.positives,
                    "loss": c.loss,
                    "auc": auc_json(&c.histogram),
                    "histogram": {"positive": c.histogram.positive, "negative": c.histogram.negative},
                })
            })
            .collect();
        let pooled = |role| {
            self.pooled(role)
                .map(|h| auc_json(&h))
                .unwrap_or(Value::Null)
        };
        json!({
            "round": self.round,
            "fold": self.fold.map(|f| json!({"index": f.index, "count": f.count, "seed": f.seed})),
            "bins": self.bins,
            "internal": pooled(Role::Train),
            "external": pooled(Role::Validate),
            "centres": centres,
            "missing": self.missing.iter().map(|(c, why)| json!({"center": c.as_str(), "reason": why})).collect::<Vec<_>>(),
        })
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Train => "train",
        Role::Validate => "validate",
    }
}

/// AUC, DeLong's 95% CI and the class counts of binned scores; the AUC alone is null with one class only.
pub fn auc_json(h: &ScoreHistograms) -> Value {
    let n = json!({"positives": h.n_positive(), "negatives": h.n_negative()});
    match h.delong() {
        Ok(e) => {
            let (lo, hi) = e.ci95();
            json!({"auc": e.auc, "ci95": [lo, hi], "n": n})
        }
        Err(_) => json!({"auc": null, "ci95": null, "n": n}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_protocol::ScoreHistogram;

    fn report(round: u32, pos: Vec<u64>, neg: Vec<u64>) -> EvalReport {
        EvalReport {
            round,
            examples: pos.iter().sum::<u64>() + neg.iter().sum::<u64>(),
            positives: pos.iter().sum(),
            loss: 0.4,
            histogram: ScoreHistogram {
                positive: pos,
                negative: neg,
            },
        }
    }

    #[test]
    fn a_report_must_be_the_aggregate_that_was_asked() {
        assert!(check_report(&report(2, vec![0, 1, 2], vec![3, 1, 0]), 2, 3).is_ok());
        let e = check_report(&report(1, vec![0, 1, 2], vec![3, 1, 0]), 2, 3).unwrap_err();
        assert!(e.contains("round 1"), "{e}");
        let e = check_report(&report(2, vec![1, 2], vec![3, 0]), 2, 3).unwrap_err();
        assert!(e.contains("3 were asked"), "{e}");
        let mut r = report(2, vec![0, 1, 2], vec![3, 1, 0]);
        r.examples += 1;
        assert!(check_report(&r, 2, 3)
            .unwrap_err()
            .contains("the report says"));
        let mut r = report(2, vec![0, 1, 2], vec![3, 1, 0]);
        r.loss = f64::NAN;
        assert!(check_report(&r, 2, 3).is_err());
        assert!(check_report(&report(2, vec![0; 3], vec![0; 3]), 2, 3).is_err());
    }

    /// The pooled AUC of several centres' histograms is the AUC of every patient's binned score, computed
    /// directly from the scores.
    #[test]
    fn the_pooled_auc_is_the_auc_of_all_centres_binned_scores() {
        let bins = 50;
        let mut rng = 0x1234_5678_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut all_labels = Vec::new();
        let mut all_binned = Vec::new();
        let mut centres = Vec::new();
        for (i, n) in [40usize, 73, 25].into_iter().enumerate() {
            let labels: Vec<bool> = (0..n).map(|_| next() < 0.35).collect();
            let scores: Vec<f64> = labels
                .iter()
                .map(|&y| (next() * 0.7 + if y { 0.25 } else { 0.0 }).min(1.0))
                .collect();
            let h = ScoreHistograms::from_scores(&labels, &scores, bins).unwrap();
            for (&y, &s) in labels.iter().zip(&scores) {
                all_labels.push(y);
                all_binned.push(h.bin_value(h.bin_of(s)));
            }
            centres.push(CentreEvaluation {
                center: CenterId::new(format!("c{i}")).unwrap(),
                role: Role::Train,
                examples: n as u64,
                positives: labels.iter().filter(|&&y| y).count() as u64,
                loss: 0.5,
                histogram: h,
            });
        }
        let e = Evaluation {
            round: 3,
            fold: None,
            bins: bins as u32,
            centres,
            missing: vec![],
        };
        let pooled = e.pooled(Role::Train).unwrap().delong().unwrap();
        let direct = fedslm_metrics::auc_delong(&all_labels, &all_binned).unwrap();
        assert!(
            (pooled.auc - direct.auc).abs() < 1e-12,
            "{} vs {}",
            pooled.auc,
            direct.auc
        );
        assert!((pooled.variance - direct.variance).abs() < 1e-12);
        assert_eq!(
            (pooled.n_positive, pooled.n_negative),
            (direct.n_positive, direct.n_negative)
        );
        assert_eq!(e.to_json()["external"], Value::Null);
        assert_eq!(e.to_json()["internal"]["auc"], json!(pooled.auc));
    }
}
