//! An evaluation round's aggregates, pure: each centre's counts, loss and score histograms, pooled into the
//! internal estimate (training centres: their held-out fold under cross-validation) and the external one
//! (validation centres, whole cohorts), with AUC and DeLong's CI exactly for the binned scores. Nothing here is
//! per patient.

use fedslm_metrics::{Comparison, PlacementSums, ScoreHistograms};
use fedslm_protocol::{CenterId, EvalReport, Fold, PlacementReport, Role};
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
    Ok(h.into())
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

/// The histograms of the centres with `role` in a stored evaluation record (what [`Evaluation::to_json`]
/// wrote), by centre.
pub fn histograms_from_json(
    record: &Value,
    role: Role,
) -> Result<Vec<(CenterId, ScoreHistograms)>, String> {
    let centres = record["centres"]
        .as_array()
        .ok_or("the evaluation record has no centres")?;
    let mut out = Vec::new();
    for c in centres {
        if c["role"].as_str() != Some(role_name(role)) {
            continue;
        }
        let name = c["center"].as_str().ok_or("a centre without a name")?;
        let center = CenterId::new(name).map_err(|e| format!("centre {name:?}: {e}"))?;
        let counts = |class: &str| -> Result<Vec<u64>, String> {
            c["histogram"][class]
                .as_array()
                .ok_or_else(|| format!("{center}: no {class} histogram"))?
                .iter()
                .map(|n| {
                    n.as_u64()
                        .ok_or_else(|| format!("{center}: a count {n} in its {class} histogram"))
                })
                .collect()
        };
        let h = ScoreHistograms {
            positive: counts("positive")?,
            negative: counts("negative")?,
        };
        if h.positive.len() != h.negative.len() || h.positive.is_empty() {
            return Err(format!(
                "{center}: histograms of {} and {} bins",
                h.positive.len(),
                h.negative.len()
            ));
        }
        out.push((center, h));
    }
    Ok(out)
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

/// The paired DeLong test between models A and B from every centre's placement sums (the second pass, DESIGN.md
/// §3). Each report must be sums a centre can have made (placements lie in [0, 1]), and the centres together
/// must have placed every patient of the pooled histograms exactly once: otherwise the test would not be of
/// the patients the AUCs are of.
pub fn paired_comparison(
    pooled_a: &ScoreHistograms,
    pooled_b: &ScoreHistograms,
    reports: &[(CenterId, PlacementReport)],
) -> Result<Comparison, String> {
    let mut total = PlacementSums::default();
    for (center, r) in reports {
        for (class, n, sums) in [
            ("positive", r.n_positive, &r.positive),
            ("negative", r.n_negative, &r.negative),
        ] {
            let n = n as f64;
            // V, V and their products lie in [0, 1]: each sum in [0, n], up to rounding.
            if sums
                .iter()
                .any(|s| !s.is_finite() || *s < -1e-9 || *s > n * (1.0 + 1e-9) + 1e-9)
            {
                return Err(format!(
                    "{center}: placement sums {sums:?} over {n} {class} patients cannot be"
                ));
            }
        }
        total.add(&r.into());
    }
    let want = (pooled_a.n_positive(), pooled_a.n_negative());
    if (total.n_positive, total.n_negative) != want {
        return Err(format!(
            "the centres placed {}+/{}- patients, the pooled histograms hold {}+/{}-",
            total.n_positive, total.n_negative, want.0, want.1
        ));
    }
    if (pooled_b.n_positive(), pooled_b.n_negative()) != want {
        return Err("the two models' pooled histograms are not of the same patients".into());
    }
    total.paired_test().map_err(|e| e.to_string())
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
        // What the store keeps gives the same histograms back.
        let back = histograms_from_json(&e.to_json(), Role::Train).unwrap();
        assert_eq!(back.len(), 3);
        for ((c, h), orig) in back.iter().zip(&e.centres) {
            assert_eq!((c, h), (&orig.center, &orig.histogram));
        }
        assert!(histograms_from_json(&e.to_json(), Role::Validate)
            .unwrap()
            .is_empty());
        assert!(histograms_from_json(
            &json!({"centres": [{"center": "c0", "role": "train",
            "histogram": {"positive": [1, 2], "negative": [1]}}]}),
            Role::Train
        )
        .is_err());
        assert_eq!(e.to_json()["internal"]["auc"], json!(pooled.auc));
    }

    /// The second pass: the centres' placement sums against the pooled histograms give the paired test of all
    /// patients' binned scores, computed directly.
    #[test]
    fn the_paired_test_from_placement_sums_is_the_direct_paired_delong() {
        let bins = 40;
        let mut rng = 0x9e37_79b9_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let centres: Vec<(Vec<bool>, Vec<f64>, Vec<f64>)> = [35usize, 60, 22]
            .into_iter()
            .map(|n| {
                let labels: Vec<bool> = (0..n).map(|_| next() < 0.4).collect();
                let a = labels
                    .iter()
                    .map(|&y| (next() * 0.7 + if y { 0.2 } else { 0.0 }).min(1.0))
                    .collect();
                let b = labels
                    .iter()
                    .map(|&y| (next() * 0.6 + if y { 0.35 } else { 0.0 }).min(1.0))
                    .collect();
                (labels, a, b)
            })
            .collect();
        let (mut ha, mut hb) = (
            ScoreHistograms::new(bins).unwrap(),
            ScoreHistograms::new(bins).unwrap(),
        );
        for (labels, a, b) in &centres {
            ha.merge(&ScoreHistograms::from_scores(labels, a, bins).unwrap())
                .unwrap();
            hb.merge(&ScoreHistograms::from_scores(labels, b, bins).unwrap())
                .unwrap();
        }
        let reports: Vec<(CenterId, PlacementReport)> = centres
            .iter()
            .enumerate()
            .map(|(i, (labels, a, b))| {
                let s = PlacementSums::from_patients(&ha, &hb, labels, a, b).unwrap();
                (
                    CenterId::new(format!("c{i}")).unwrap(),
                    PlacementReport::from(s),
                )
            })
            .collect();
        let federated = paired_comparison(&ha, &hb, &reports).unwrap();
        let binned = |h: &ScoreHistograms, x: &[f64]| -> Vec<f64> {
            x.iter().map(|&p| h.bin_value(h.bin_of(p))).collect()
        };
        let (mut labels, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for (l, sa, sb) in &centres {
            labels.extend(l);
            a.extend(binned(&ha, sa));
            b.extend(binned(&hb, sb));
        }
        let direct = fedslm_metrics::paired_delong(&labels, &a, &b).unwrap();
        assert!((federated.auc_a - direct.auc_a).abs() < 1e-12);
        assert!((federated.auc_b - direct.auc_b).abs() < 1e-12);
        assert!(
            (federated.z - direct.z).abs() < 1e-9,
            "{federated:?} {direct:?}"
        );
        assert!((federated.p - direct.p).abs() < 1e-9);

        // A centre missing, or sums no centre can have made, are refused by name.
        let e = paired_comparison(&ha, &hb, &reports[..2]).unwrap_err();
        assert!(e.contains("the pooled histograms hold"), "{e}");
        let mut bad = reports.clone();
        bad[1].1.positive[2] = bad[1].1.n_positive as f64 + 5.0;
        let e = paired_comparison(&ha, &hb, &bad).unwrap_err();
        assert!(e.starts_with("c1:"), "{e}");
        bad[1].1.positive[2] = f64::NAN;
        assert!(paired_comparison(&ha, &hb, &bad).is_err());
    }
}
