/// Why a statistic cannot be computed from the data given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("{labels} labels but {scores} scores")]
    LengthMismatch { labels: usize, scores: usize },
    #[error("score {index} is {value}; scores must be finite")]
    NonFinite { index: usize, value: f64 },
    #[error("needs at least {needed} positive and {needed} negative patients; got {positives} positive and {negatives} negative")]
    TooFewPerClass {
        needed: usize,
        positives: usize,
        negatives: usize,
    },
    #[error("threshold {0} is not strictly between 0 and 1")]
    BadThreshold(f64),
    #[error("probability {index} is {value}; calibration needs probabilities in [0, 1]")]
    NotAProbability { index: usize, value: f64 },
    #[error("histograms differ in bins: {0} and {1}")]
    BinMismatch(usize, usize),
    #[error("the two models' pooled histograms count different patients: {a:?} and {b:?} (positive, negative)")]
    DifferentPatients { a: (u64, u64), b: (u64, u64) },
    #[error("histograms need at least one bin")]
    NoBins,
    #[error("logistic regression: {0}")]
    Logistic(#[from] crate::logistic::LogisticError),
}
