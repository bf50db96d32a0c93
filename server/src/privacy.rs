//! What each centre released under the run's differential privacy, as this server received it: its accepted
//! updates (each a DP-SGD run of the task's steps, or one release of noised Newton statistics) and its
//! evaluation reports (one release of noised histogram counts each), composed by the site's accountant
//! (`fedslm_metrics::rdp`) and stated at δ = [`DELTA`]. The audit log records it at the run's end
//! (`privacy_spent`), and the final model's card carries it. A site's own ledger is the authority on what it
//! spent: it also counts releases the server never received or refused, and its δ may differ.

use std::collections::BTreeMap;

use fedslm_metrics::rdp::{self, DEFAULT_ORDERS};
use serde::{Deserialize, Serialize};

use crate::round::{DpSettings, RoundSettings};
use crate::store::StoredRound;

/// The δ at which the server states each centre's ε (the sites' default).
pub const DELTA: f64 = 1e-5;

/// One centre's releases in a run, and their ε at [`DELTA`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Released {
    pub fits: u64,
    pub evaluations: u64,
    pub epsilon: f64,
}

/// Each centre's releases over `rounds` of a run under `settings` (empty when the run is not private).
pub fn released(settings: &RoundSettings, rounds: &[StoredRound]) -> BTreeMap<String, Released> {
    let Some(dp) = settings.dp else {
        return BTreeMap::new();
    };
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in rounds {
        for c in &r.contributions {
            counts.entry(c.center.clone()).or_default().0 += 1;
        }
        for c in r.evaluation.iter().flat_map(|e| &e.centers) {
            counts.entry(c.center.clone()).or_default().1 += 1;
        }
    }
    counts
        .into_iter()
        .map(|(center, (fits, evaluations))| {
            let epsilon = epsilon(&dp, settings, fits, evaluations);
            (
                center,
                Released {
                    fits,
                    evaluations,
                    epsilon,
                },
            )
        })
        .collect()
}

/// The ε of `fits` fit releases and `evaluations` histogram releases under `dp`.
pub fn epsilon(dp: &DpSettings, settings: &RoundSettings, fits: u64, evaluations: u64) -> f64 {
    let releases = dp.releases(settings.strategy, settings.local_epochs, fits, evaluations);
    rdp::composed_releases(&releases, dp.noise_multiplier, &DEFAULT_ORDERS)
        .and_then(|total| rdp::epsilon(&DEFAULT_ORDERS, &total, DELTA))
        .map_or(f64::INFINITY, |e| e.epsilon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::{EvaluationSettings, NormBound, Strategy};
    use crate::store::StoredContribution;
    use fedslm_protocol::ModelKind;
    use std::time::Duration;

    fn settings(dp: Option<DpSettings>) -> RoundSettings {
        RoundSettings {
            model: ModelKind::Mri,
            rounds: 3,
            local_epochs: 2,
            learning_rate: 0.01,
            batch_size: 8,
            quorum: 1,
            deadline: Duration::from_secs(60),
            start_grace: Duration::ZERO,
            retries: 0,
            strategy: Strategy::FedAvg,
            norm_bound: NormBound::DEFAULT,
            seed: 1,
            fold: None,
            evaluation: EvaluationSettings::default(),
            dp,
            batch_norm_local: false,
            secure_threshold: None,
        }
    }

    fn round(n: u32, centers: &[&str]) -> StoredRound {
        StoredRound {
            round: n,
            checkpoint: String::new(),
            retries: 0,
            contributions: centers
                .iter()
                .map(|c| StoredContribution {
                    center: c.to_string(),
                    examples: 10,
                    train_loss: f64::NAN,
                })
                .collect(),
            refused: vec![],
            silent: vec![],
            seconds: 0.0,
            log_likelihood: None,
            newton: None,
            secure: None,
            evaluation: None,
            committed_unix_ms: 0,
        }
    }

    #[test]
    fn each_centre_is_charged_for_the_updates_it_sent_by_the_accountant() {
        let dp = DpSettings {
            noise_multiplier: 1.2,
            clip: 1.0,
            newton_clip: 4.0,
            sample_rate: 0.25,
        };
        let s = settings(Some(dp));
        let rounds = [round(1, &["a", "b"]), round(2, &["a"])];
        let r = released(&s, &rounds);
        assert_eq!((r["a"].fits, r["b"].fits), (2, 1));
        // Two rounds of 2 epochs of 4 steps at q = 0.25, as the accountant composes them.
        let direct = rdp::epsilon(
            &DEFAULT_ORDERS,
            &rdp::composed(0.25, 1.2, 16, &DEFAULT_ORDERS).unwrap(),
            DELTA,
        )
        .unwrap()
        .epsilon;
        assert!((r["a"].epsilon - direct).abs() < 1e-12 * direct);
        assert!(r["b"].epsilon < r["a"].epsilon);
        assert!(released(&settings(None), &rounds).is_empty());
    }
}
