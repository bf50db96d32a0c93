//! An evaluation round's aggregates, pure: each centre's counts, loss and score histograms, pooled into the
//! internal estimate (training centres: their held-out fold under cross-validation) and the external one
//! (validation centres, whole cohorts), with AUC and DeLong's CI exactly for the binned scores. Nothing here is
//! per patient.

use std::collections::BTreeMap;

use fedslm_metrics::{Comparison, PlacementSums, ScoreHistograms};
use fedslm_protocol::{CenterId, EvalReport, Fold, PlacementReport, Role};
use serde::{Deserialize, Serialize};

/// What one centre reported.
#[derive(Debug, Clone, PartialEq)]
pub struct CenterEvaluation {
    pub center: CenterId,
    pub role: Role,
    pub examples: u64,
    pub positives: u64,
    /// Mean log-loss.
    pub loss: f64,
    pub histogram: ScoreHistograms,
    /// The centre was asked to score with batch-norm statistics recomputed from its own images (AdaBN).
    pub adapted_batch_norm: bool,
}

/// Why an evaluation report is refused: it must be the aggregate of what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportError {
    #[error("evaluation of round {got}, but round {asked} was asked")]
    Round { got: u32, asked: u32 },
    #[error("{positive} and {negative} histogram bins, but {asked} were asked")]
    Bins {
        positive: usize,
        negative: usize,
        asked: u32,
    },
    #[error(
        "the histograms count {positive} positive and {negative} negative patients, the report says {positives} of {examples}"
    )]
    Counts {
        positive: u64,
        negative: u64,
        positives: u64,
        examples: u64,
    },
    #[error("no patient evaluated")]
    Empty,
    #[error("loss {0} is not a finite log-loss")]
    Loss(f64),
}

/// Checks a report against what was asked (`noised`: with histogram noise, under which the loss is not
/// released and reads NaN); its histograms when it holds.
pub fn check_report(
    report: &EvalReport,
    round: u32,
    bins: u32,
    noised: bool,
) -> Result<ScoreHistograms, ReportError> {
    if report.round != round {
        return Err(ReportError::Round {
            got: report.round,
            asked: round,
        });
    }
    let h = &report.histogram;
    if h.positive.len() != bins as usize || h.negative.len() != bins as usize {
        return Err(ReportError::Bins {
            positive: h.positive.len(),
            negative: h.negative.len(),
            asked: bins,
        });
    }
    let pos: u64 = h.positive.iter().sum();
    let neg: u64 = h.negative.iter().sum();
    if pos != report.positives || pos.checked_add(neg) != Some(report.examples) {
        return Err(ReportError::Counts {
            positive: pos,
            negative: neg,
            positives: report.positives,
            examples: report.examples,
        });
    }
    if report.examples == 0 {
        return Err(ReportError::Empty);
    }
    let unreleased = noised && report.loss.is_nan();
    if !unreleased && (!report.loss.is_finite() || report.loss < 0.0) {
        return Err(ReportError::Loss(report.loss));
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
    pub centers: Vec<CenterEvaluation>,
    /// Sums of three or more centres' reports, under secure aggregation.
    pub secure: Vec<SecureEvaluation>,
    /// Centres asked that did not report, and why.
    pub missing: Vec<(CenterId, String)>,
}

/// The securely aggregated reports of one side: the server saw only their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureEvaluation {
    pub role: Role,
    /// The centres whose reports are in the sum.
    pub centers: Vec<CenterId>,
    pub examples: u64,
    pub positives: u64,
    /// Mean log-loss; NaN unless every centre released its loss.
    pub loss: f64,
    pub histogram: ScoreHistograms,
    /// The AUCs centres released of their own patients, where their policies let them.
    pub own_auc: Vec<(CenterId, f64)>,
}

impl Evaluation {
    /// The merged histograms of the centres with `role`; `None` if none reported.
    pub fn pooled(&self, role: Role) -> Option<ScoreHistograms> {
        let clear = self.centers.iter().filter(|c| c.role == role);
        let secure = self.secure.iter().filter(|s| s.role == role);
        let mut it = clear
            .map(|c| &c.histogram)
            .chain(secure.map(|s| &s.histogram));
        let mut pooled = it.next()?.clone();
        for h in it {
            // Every report was checked to have `bins` bins.
            pooled.merge(h).ok()?;
        }
        Some(pooled)
    }

    /// The record the store keeps and the report reads: per centre and pooled, AUC with DeLong's 95% CI where
    /// both classes are present, and the histograms themselves (for pooling folds later).
    pub fn record(&self) -> EvaluationRecord {
        EvaluationRecord {
            round: self.round,
            fold: self.fold.map(|f| FoldRecord {
                index: f.index,
                count: f.count,
                seed: f.seed,
            }),
            bins: self.bins,
            internal: self
                .pooled(Role::Train)
                .map(|h| AucSummary::of_histograms(&h)),
            external: self
                .pooled(Role::Validate)
                .map(|h| AucSummary::of_histograms(&h)),
            centers: self
                .centers
                .iter()
                .map(|c| CenterRecord {
                    center: c.center.to_string(),
                    role: c.role.name().to_string(),
                    examples: c.examples,
                    positives: c.positives,
                    loss: c.loss,
                    auc: AucSummary::of_histograms(&c.histogram),
                    histogram: HistogramRecord {
                        positive: c.histogram.positive.clone(),
                        negative: c.histogram.negative.clone(),
                    },
                    adapted_batch_norm: c.adapted_batch_norm,
                })
                .collect(),
            secure: self
                .secure
                .iter()
                .map(|s| SecureRecord {
                    role: s.role.name().to_string(),
                    centers: s.centers.iter().map(|c| c.to_string()).collect(),
                    examples: s.examples,
                    positives: s.positives,
                    loss: s.loss,
                    auc: AucSummary::of_histograms(&s.histogram),
                    histogram: HistogramRecord {
                        positive: s.histogram.positive.clone(),
                        negative: s.histogram.negative.clone(),
                    },
                    own_auc: s.own_auc.iter().map(|(c, a)| (c.to_string(), *a)).collect(),
                })
                .collect(),
            missing: self
                .missing
                .iter()
                .map(|(c, why)| MissingRecord {
                    center: c.to_string(),
                    reason: why.clone(),
                })
                .collect(),
        }
    }

    /// `round 5 evaluated: internal AUC 0.812 (0.702-0.922; 25+/95-), external AUC 0.790 (...)`.
    pub fn summary(&self) -> String {
        let side = |role| match self.pooled(role).map(|h| AucSummary::of_histograms(&h)) {
            None => "none reported".to_string(),
            Some(a) => a.to_string(),
        };
        let mut line = format!(
            "round {} evaluated{}: internal {}, external {}",
            self.round,
            self.fold
                .map(|f| format!(" (fold {} of {})", f.index + 1, f.count))
                .unwrap_or_default(),
            side(Role::Train),
            side(Role::Validate)
        );
        for (c, why) in &self.missing {
            line.push_str(&format!("; {c}: {why}"));
        }
        line
    }
}

/// The number of positive and negative patients behind a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClassCounts {
    pub positives: u64,
    pub negatives: u64,
}

/// An AUC with DeLong's 95% CI and its class counts: the one shape of an AUC in every stored and reported
/// record. The AUC and CI are absent (null) where a class is missing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AucSummary {
    pub auc: Option<f64>,
    pub ci95: Option<[f64; 2]>,
    pub n: ClassCounts,
}

impl AucSummary {
    /// Of binned scores, exactly for the bins.
    pub fn of_histograms(h: &ScoreHistograms) -> AucSummary {
        let n = ClassCounts {
            positives: h.n_positive(),
            negatives: h.n_negative(),
        };
        match h.delong() {
            Ok(e) => AucSummary::of(&e, n),
            Err(_) => AucSummary {
                auc: None,
                ci95: None,
                n,
            },
        }
    }

    /// Of per-patient scores (higher = more likely positive).
    pub fn of_scores(labels: &[bool], scores: &[f64]) -> AucSummary {
        let positives = labels.iter().filter(|&&y| y).count() as u64;
        let n = ClassCounts {
            positives,
            negatives: labels.len() as u64 - positives,
        };
        match fedslm_metrics::auc_delong(labels, scores) {
            Ok(e) => AucSummary::of(&e, n),
            Err(_) => AucSummary {
                auc: None,
                ci95: None,
                n,
            },
        }
    }

    fn of(e: &fedslm_metrics::AucEstimate, n: ClassCounts) -> AucSummary {
        let (lo, hi) = e.ci95();
        AucSummary {
            auc: Some(e.auc),
            ci95: Some([lo, hi]),
            n,
        }
    }
}

/// `AUC 0.812 (0.702-0.922; 25+/95-)`, or `no AUC (0+/12-)`.
impl std::fmt::Display for AucSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ClassCounts {
            positives: p,
            negatives: n,
        } = self.n;
        match (self.auc, self.ci95) {
            (Some(auc), Some([lo, hi])) => {
                write!(f, "AUC {auc:.3} ({lo:.3}-{hi:.3}; {p}+/{n}-)")
            }
            _ => write!(f, "no AUC ({p}+/{n}-)"),
        }
    }
}

/// A stored evaluation round: what the store keeps with the round, what `server status`, `server compare`
/// and the model card read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationRecord {
    pub round: u32,
    pub fold: Option<FoldRecord>,
    pub bins: u32,
    /// The training centres pooled (their held-out fold under cross-validation).
    pub internal: Option<AucSummary>,
    /// The validation centres pooled.
    pub external: Option<AucSummary>,
    pub centers: Vec<CenterRecord>,
    /// Sums of centres' reports under secure aggregation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secure: Vec<SecureRecord>,
    pub missing: Vec<MissingRecord>,
}

/// A securely aggregated side of a stored evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRecord {
    pub role: String,
    pub centers: Vec<String>,
    pub examples: u64,
    pub positives: u64,
    #[serde(deserialize_with = "crate::store::f64_or_nan")]
    pub loss: f64,
    pub auc: AucSummary,
    pub histogram: HistogramRecord,
    /// Each centre's own AUC, as it released it (its policy may withhold it).
    #[serde(default)]
    pub own_auc: BTreeMap<String, f64>,
}

/// A cross-validation fold in a stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldRecord {
    pub index: u32,
    pub count: u32,
    pub seed: u64,
}

/// One centre's report in a stored evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CenterRecord {
    pub center: String,
    pub role: String,
    pub examples: u64,
    pub positives: u64,
    /// NaN (JSON null) where the centre did not release it (differential privacy).
    #[serde(deserialize_with = "crate::store::f64_or_nan")]
    pub loss: f64,
    pub auc: AucSummary,
    pub histogram: HistogramRecord,
    /// Scored with batch-norm statistics recomputed from the centre's own images (AdaBN).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adapted_batch_norm: bool,
}

/// Per-class counts of binned scores, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramRecord {
    pub positive: Vec<u64>,
    pub negative: Vec<u64>,
}

/// A centre asked that did not report, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingRecord {
    pub center: String,
    pub reason: String,
}

/// Why a stored evaluation cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("centre {name:?} in the evaluation record: {reason}")]
    Center { name: String, reason: String },
    #[error("{center}: histograms of {positive} and {negative} bins")]
    Bins {
        center: String,
        positive: usize,
        negative: usize,
    },
}

impl EvaluationRecord {
    /// The secure sums of the centres with `role`: their centres and summed histograms, checked.
    pub fn secure_sums(
        &self,
        role: Role,
    ) -> Result<Vec<(Vec<CenterId>, ScoreHistograms)>, RecordError> {
        let mut out = Vec::new();
        for s in self.secure.iter().filter(|s| s.role == role.name()) {
            let centers = s
                .centers
                .iter()
                .map(|c| {
                    CenterId::new(c.as_str()).map_err(|e| RecordError::Center {
                        name: c.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let h = &s.histogram;
            if h.positive.len() != h.negative.len() || h.positive.is_empty() {
                return Err(RecordError::Bins {
                    center: s.centers.join("+"),
                    positive: h.positive.len(),
                    negative: h.negative.len(),
                });
            }
            out.push((
                centers,
                ScoreHistograms {
                    positive: h.positive.clone(),
                    negative: h.negative.clone(),
                },
            ));
        }
        Ok(out)
    }

    /// The histograms of the centres with `role`, by centre, checked.
    pub fn histograms(&self, role: Role) -> Result<Vec<(CenterId, ScoreHistograms)>, RecordError> {
        let mut out = Vec::new();
        for c in &self.centers {
            let r = c.role.parse::<Role>().map_err(|e| RecordError::Center {
                name: c.center.clone(),
                reason: e.to_string(),
            })?;
            if r != role {
                continue;
            }
            let center = CenterId::new(c.center.as_str()).map_err(|e| RecordError::Center {
                name: c.center.clone(),
                reason: e.to_string(),
            })?;
            let h = &c.histogram;
            if h.positive.len() != h.negative.len() || h.positive.is_empty() {
                return Err(RecordError::Bins {
                    center: c.center.clone(),
                    positive: h.positive.len(),
                    negative: h.negative.len(),
                });
            }
            out.push((
                center,
                ScoreHistograms {
                    positive: h.positive.clone(),
                    negative: h.negative.clone(),
                },
            ));
        }
        Ok(out)
    }
}

/// Why the paired test cannot be made from the centres' placement sums.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ComparisonError {
    #[error("{center}: placement sums {sums:?} over {n} {class} patients cannot be")]
    ImpossibleSums {
        center: CenterId,
        class: &'static str,
        n: u64,
        sums: [f64; 5],
    },
    #[error(
        "the centres placed {placed_positive}+/{placed_negative}- patients, the pooled histograms hold {pooled_positive}+/{pooled_negative}-"
    )]
    NotEveryPatient {
        placed_positive: u64,
        placed_negative: u64,
        pooled_positive: u64,
        pooled_negative: u64,
    },
    #[error("the two models' pooled histograms are not of the same patients")]
    OtherPatients,
    #[error(transparent)]
    Test(#[from] fedslm_metrics::MetricsError),
}

/// The paired DeLong test between models A and B from every centre's placement sums (the second pass, DESIGN.md
/// §3). Each report must be sums a centre can have made (placements lie in [0, 1]), and the centres together
/// must have placed every patient of the pooled histograms exactly once: otherwise the test would not be of
/// the patients the AUCs are of.
pub fn paired_comparison(
    pooled_a: &ScoreHistograms,
    pooled_b: &ScoreHistograms,
    reports: &[(CenterId, PlacementReport)],
) -> Result<Comparison, ComparisonError> {
    let mut total = PlacementSums::default();
    for (center, r) in reports {
        for (class, n, sums) in [
            ("positive", r.n_positive, &r.positive),
            ("negative", r.n_negative, &r.negative),
        ] {
            let bound = n as f64;
            // V, V and their products lie in [0, 1]: each sum in [0, n], up to rounding.
            if sums
                .iter()
                .any(|s| !s.is_finite() || *s < -1e-9 || *s > bound * (1.0 + 1e-9) + 1e-9)
            {
                return Err(ComparisonError::ImpossibleSums {
                    center: center.clone(),
                    class,
                    n,
                    sums: *sums,
                });
            }
        }
        total.add(&r.into());
    }
    let want = (pooled_a.n_positive(), pooled_a.n_negative());
    if (total.n_positive, total.n_negative) != want {
        return Err(ComparisonError::NotEveryPatient {
            placed_positive: total.n_positive,
            placed_negative: total.n_negative,
            pooled_positive: want.0,
            pooled_negative: want.1,
        });
    }
    if (pooled_b.n_positive(), pooled_b.n_negative()) != want {
        return Err(ComparisonError::OtherPatients);
    }
    Ok(total.paired_test()?)
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
        assert!(check_report(&report(2, vec![0, 1, 2], vec![3, 1, 0]), 2, 3, false).is_ok());
        let e = check_report(&report(1, vec![0, 1, 2], vec![3, 1, 0]), 2, 3, false).unwrap_err();
        assert_eq!(e, ReportError::Round { got: 1, asked: 2 });
        assert!(e.to_string().contains("round 1"), "{e}");
        let e = check_report(&report(2, vec![1, 2], vec![3, 0]), 2, 3, false).unwrap_err();
        assert!(e.to_string().contains("3 were asked"), "{e}");
        let mut r = report(2, vec![0, 1, 2], vec![3, 1, 0]);
        r.examples += 1;
        assert!(check_report(&r, 2, 3, false)
            .unwrap_err()
            .to_string()
            .contains("the report says"));
        let mut r = report(2, vec![0, 1, 2], vec![3, 1, 0]);
        r.loss = f64::NAN;
        assert!(matches!(
            check_report(&r, 2, 3, false),
            Err(ReportError::Loss(_))
        ));
        // Under histogram noise the loss is not released: NaN, and only NaN, is accepted.
        assert!(check_report(&r, 2, 3, true).is_ok());
        r.loss = f64::INFINITY;
        assert!(matches!(
            check_report(&r, 2, 3, true),
            Err(ReportError::Loss(_))
        ));
        assert_eq!(
            check_report(&report(2, vec![0; 3], vec![0; 3]), 2, 3, false),
            Err(ReportError::Empty)
        );
    }

    /// The pooled AUC of several centres' histograms is the AUC of every patient's binned score, computed
    /// directly from the scores.
    #[test]
    fn the_pooled_auc_is_the_auc_of_all_centers_binned_scores() {
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
        let mut centers = Vec::new();
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
            centers.push(CenterEvaluation {
                center: CenterId::new(format!("c{i}")).unwrap(),
                role: Role::Train,
                examples: n as u64,
                positives: labels.iter().filter(|&&y| y).count() as u64,
                loss: 0.5,
                histogram: h,
                adapted_batch_norm: false,
            });
        }
        let e = Evaluation {
            round: 3,
            fold: None,
            bins: bins as u32,
            centers,
            secure: Vec::new(),
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
        let record = e.record();
        assert_eq!(record.external, None);
        // What the store keeps, through its JSON, gives the same histograms back.
        let json = serde_json::to_string(&record).unwrap();
        let back: EvaluationRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
        let hs = back.histograms(Role::Train).unwrap();
        assert_eq!(hs.len(), 3);
        for ((c, h), orig) in hs.iter().zip(&e.centers) {
            assert_eq!((c, h), (&orig.center, &orig.histogram));
        }
        assert!(back.histograms(Role::Validate).unwrap().is_empty());
        let mut broken = back.clone();
        broken.centers[0].histogram.negative.pop();
        assert!(matches!(
            broken.histograms(Role::Train),
            Err(RecordError::Bins { .. })
        ));
        assert_eq!(record.internal.and_then(|a| a.auc), Some(pooled.auc));
        // The stored JSON's shape: one AUC shape everywhere.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["internal"]["n"]["positives"], pooled.n_positive as u64);
        assert_eq!(v["external"], serde_json::Value::Null);
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
        let centers: Vec<(Vec<bool>, Vec<f64>, Vec<f64>)> = [35usize, 60, 22]
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
        for (labels, a, b) in &centers {
            ha.merge(&ScoreHistograms::from_scores(labels, a, bins).unwrap())
                .unwrap();
            hb.merge(&ScoreHistograms::from_scores(labels, b, bins).unwrap())
                .unwrap();
        }
        let reports: Vec<(CenterId, PlacementReport)> = centers
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
        for (l, sa, sb) in &centers {
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
        let e = paired_comparison(&ha, &hb, &reports[..2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("the pooled histograms hold"), "{e}");
        let mut bad = reports.clone();
        bad[1].1.positive[2] = bad[1].1.n_positive as f64 + 5.0;
        let e = paired_comparison(&ha, &hb, &bad).unwrap_err().to_string();
        assert!(e.starts_with("c1:"), "{e}");
        bad[1].1.positive[2] = f64::NAN;
        assert!(paired_comparison(&ha, &hb, &bad).is_err());
    }
}
