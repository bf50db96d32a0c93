//! The wire's aggregates as the statistics crate's values and back: the one place where a histogram or a
//! placement report crosses between `fedslm_protocol` and `fedslm_metrics`.

use fedslm_metrics::{PlacementSums, ScoreHistograms};

use crate::{PlacementReport, PlacementTask, ScoreHistogram};

impl From<&ScoreHistogram> for ScoreHistograms {
    fn from(h: &ScoreHistogram) -> ScoreHistograms {
        ScoreHistograms {
            positive: h.positive.clone(),
            negative: h.negative.clone(),
        }
    }
}

impl From<&ScoreHistograms> for ScoreHistogram {
    fn from(h: &ScoreHistograms) -> ScoreHistogram {
        ScoreHistogram {
            positive: h.positive.clone(),
            negative: h.negative.clone(),
        }
    }
}

impl From<PlacementSums> for PlacementReport {
    fn from(s: PlacementSums) -> PlacementReport {
        PlacementReport {
            n_positive: s.n_positive,
            n_negative: s.n_negative,
            positive: s.positive,
            negative: s.negative,
        }
    }
}

impl From<&PlacementReport> for PlacementSums {
    fn from(r: &PlacementReport) -> PlacementSums {
        PlacementSums {
            n_positive: r.n_positive,
            n_negative: r.n_negative,
            positive: r.positive,
            negative: r.negative,
        }
    }
}

impl PlacementTask {
    /// The second pass's task for a centre: the runs whose kept scores to pair, and both models' pooled
    /// histograms.
    pub fn new(
        a_runs: Vec<String>,
        b_runs: Vec<String>,
        pooled_a: &ScoreHistograms,
        pooled_b: &ScoreHistograms,
    ) -> PlacementTask {
        PlacementTask {
            a_runs,
            b_runs,
            pooled_a: pooled_a.into(),
            pooled_b: pooled_b.into(),
        }
    }
}
