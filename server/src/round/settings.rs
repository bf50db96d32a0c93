//! The run's round settings and why a run cannot be set up with them.

use std::time::Duration;

use fedslm_protocol::clinical::COEFFICIENTS;
use fedslm_protocol::landmarks::LANDMARKS;
use fedslm_protocol::{DpSgd, Fold, ModelKind};

/// How the next global model is made from the centres' answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// The example-weighted mean of the centres' weights.
    FedAvg,
    /// FedAvg, with the clients' loss plus `mu / 2 ||w - w_global||^2`.
    FedProx { mu: f64 },
    /// The clinical logistic model: centres send gradient, Hessian and log-likelihood at the global
    /// coefficients; the server sums them and takes a Newton step, until convergence.
    Newton,
    /// No training: centres send their images' mean intensity landmarks (`fedslm_protocol::landmarks`), and
    /// their example-weighted mean is the consortium's standard intensity scale. No evaluation follows.
    Landmarks,
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedProx { .. } => "fedprox",
            Strategy::Newton => "newton",
            Strategy::Landmarks => "landmarks",
        }
    }
}

/// The run's round settings, from the server's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    pub model: ModelKind,
    /// Rounds to run; under federated Newton, the most rounds allowed to converge.
    pub rounds: u32,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// Training centres that must be connected to start a round and must answer to commit it.
    pub quorum: usize,
    /// How long a round waits for answers.
    pub deadline: Duration,
    /// Once `quorum` training centres are connected, how long to wait for the others before starting without
    /// them (a round starts at once when every training centre is connected).
    pub start_grace: Duration,
    /// How often a round that fell short of its quorum is tried again before the run fails.
    pub retries: u32,
    pub strategy: Strategy,
    /// Largest L2 distance of an update from the global model, batch-norm statistics excluded.
    pub norm_bound: NormBound,
    pub seed: u64,
    /// Under cross-validation: the fold every training centre holds out of training and evaluates on.
    pub fold: Option<Fold>,
    pub evaluation: EvaluationSettings,
    /// Differential privacy of every release the run asks for; `None`: releases in the clear.
    pub dp: Option<DpSettings>,
    /// FedBN (Li et al., ICLR 2021): each training centre keeps its batch-norm layers; the rest is averaged.
    pub batch_norm_local: bool,
    /// Secure aggregation (Bonawitz et al. 2017): every sum of three or more centres is masked, and this many
    /// of a sum's participants must stay to the end; `None`: sums in the clear.
    pub secure_threshold: Option<usize>,
}

impl RoundSettings {
    /// Whether validating centres recompute batch-norm statistics before scoring: asked, for a network.
    pub fn adapts_batch_norm(&self) -> bool {
        self.evaluation.adapt_batch_norm && self.model.is_network()
    }

    /// Whether training centres keep their batch-norm layers (FedBN): asked, for a network.
    pub fn keeps_batch_norm_local(&self) -> bool {
        self.batch_norm_local && self.model.is_network()
    }
}

/// The noise of a run's releases (server.toml `[privacy]`): one noise multiplier for DP-SGD's steps, the
/// clinical model's Newton statistics and the evaluations' histogram counts, so that a run's cost at each
/// centre is the composition of one Gaussian mechanism (`fedslm_metrics::rdp`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSettings {
    pub noise_multiplier: f64,
    /// Each patient's gradient clipped to this L2 norm (training).
    pub clip: f64,
    /// Each patient's contribution to the Newton statistics clipped to this L2 norm.
    pub newton_clip: f64,
    /// DP-SGD's Poisson sampling rate.
    pub sample_rate: f64,
}

impl DpSettings {
    /// Defaults where server.toml names only the noise: clip 1 (DP-SGD's usual), 4 for the Newton statistics
    /// (a patient's standardised clinical vector has a norm of about 2-3), sampling rate 0.25.
    pub const DEFAULT_CLIP: f64 = 1.0;
    pub const DEFAULT_NEWTON_CLIP: f64 = 4.0;
    pub const DEFAULT_SAMPLE_RATE: f64 = 0.25;

    /// The noise multiplier whose releases at a centre that answers every task of a run spend at most
    /// `epsilon` (at `delta`): the run's fits (`rounds` of them, each `local_epochs` epochs of DP-SGD or one
    /// release of Newton statistics) and its evaluations (`evaluation`), by the sites' accountant. A retried
    /// round spends again: a site's own budget then refuses what it cannot pay for.
    #[allow(clippy::too_many_arguments)]
    pub fn calibrated(
        epsilon: f64,
        delta: f64,
        clip: f64,
        newton_clip: f64,
        sample_rate: f64,
        strategy: Strategy,
        rounds: u32,
        local_epochs: u32,
        evaluation: EvaluationSettings,
    ) -> Result<DpSettings, String> {
        let mut dp = DpSettings {
            noise_multiplier: 1.0,
            clip,
            newton_clip,
            sample_rate,
        };
        let releases = dp.releases(
            strategy,
            local_epochs,
            u64::from(rounds),
            evaluation.count(rounds),
        );
        let sigma = fedslm_metrics::rdp::noise_for_releases(
            &releases,
            delta,
            epsilon,
            &fedslm_metrics::rdp::DEFAULT_ORDERS,
        )
        .map_err(|e| format!("privacy.epsilon = {epsilon}: {e}"))?;
        if !sigma.is_finite() {
            return Err(format!(
                "privacy.epsilon = {epsilon}: no noise multiplier up to 10^6 meets it"
            ));
        }
        dp.noise_multiplier = sigma;
        Ok(dp)
    }

    /// The (sampling rate, steps) of `fits` fit releases and `evaluations` histogram releases under
    /// `strategy`, all at this noise: what the accountant composes.
    pub fn releases(
        &self,
        strategy: Strategy,
        local_epochs: u32,
        fits: u64,
        evaluations: u64,
    ) -> [(f64, u64); 2] {
        let task = self.task(strategy);
        [
            (task.sample_rate, task.steps(local_epochs).max(1) * fits),
            (1.0, evaluations),
        ]
    }

    /// The parameters a fit task carries under `strategy`.
    pub fn task(&self, strategy: Strategy) -> DpSgd {
        match strategy {
            Strategy::Newton => DpSgd {
                noise_multiplier: self.noise_multiplier,
                clip: self.newton_clip,
                sample_rate: 1.0,
            },
            Strategy::FedAvg | Strategy::FedProx { .. } | Strategy::Landmarks => DpSgd {
                noise_multiplier: self.noise_multiplier,
                clip: self.clip,
                sample_rate: self.sample_rate,
            },
        }
    }
}

/// When and how finely the global model is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaluationSettings {
    /// Bins of the centres' score histograms; 0: no evaluation.
    pub bins: u32,
    /// Also evaluate after every this many rounds; 0: after the last round only.
    pub every: u32,
    /// AdaBN: validating centres recompute a network's batch-norm statistics from their own images before
    /// scoring (`adapt_batch_norm` in server.toml).
    pub adapt_batch_norm: bool,
}

impl EvaluationSettings {
    /// Evaluations in a run of `rounds` rounds that ends as planned: after every `every`-th round and after
    /// the last.
    pub fn count(&self, rounds: u32) -> u64 {
        if self.bins == 0 {
            return 0;
        }
        let periodic = rounds.checked_div(self.every).unwrap_or(0);
        let last = self.every == 0 || !rounds.is_multiple_of(self.every);
        u64::from(periodic) + u64::from(last)
    }
}

impl Default for EvaluationSettings {
    fn default() -> EvaluationSettings {
        EvaluationSettings {
            bins: 1000,
            every: 0,
            adapt_batch_norm: false,
        }
    }
}

/// Why a run cannot be set up as configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetupError {
    #[error("no centre has the role train")]
    NoTrainingCenter,
    #[error("quorum {quorum} is more than the {training} training centres enrolled")]
    Quorum { quorum: usize, training: usize },
    #[error("quorum must be at least 1")]
    ZeroQuorum,
    #[error("rounds must be at least 1")]
    ZeroRounds,
    #[error("the clinical model is fitted by federated Newton (strategy = \"newton\"), not {0}")]
    ClinicalNeedsNewton(&'static str),
    #[error("strategy newton fits the clinical logistic model only, not the {0:?} network")]
    NewtonNeedsClinical(ModelKind),
    #[error("the initial clinical model has no {COEFFICIENTS} vector of {0} coefficients")]
    Coefficients(usize),
    #[error("the initial model has no tensors")]
    EmptyModel,
    #[error("strategy landmarks starts from the {LANDMARKS} tensor of 3 x 11 alone: {0}")]
    Landmarks(String),
    #[error("strategy landmarks releases its landmarks without noise; it cannot run under differential privacy")]
    LandmarksUnderDp,
    #[error("cannot resume the stored run: {0}")]
    Resume(String),
}

/// The seed of a round's local training, before each client mixes in its centre id (splitmix64).
pub fn round_seed(seed: u64, round: u32) -> u64 {
    let mut z = seed ^ (u64::from(round)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How far (L2, batch-norm statistics excluded) an update may move the global model before it is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormBound {
    /// At most this distance.
    Absolute(f64),
    /// At most this multiple of the global model's own L2 norm (batch-norm statistics excluded), or of 1
    /// where that norm is smaller (a model that starts at zero).
    Relative(f64),
}

impl NormBound {
    /// The default: an update may move the model by at most three times its norm. Honest local training moves
    /// a model by a fraction of its norm per round; a scaled or poisoned update (say by 1e30) is refused.
    pub const DEFAULT: NormBound = NormBound::Relative(3.0);

    /// The distance allowed from `global`.
    pub fn limit(&self, global: &fedslm_protocol::Weights) -> f64 {
        match *self {
            NormBound::Absolute(b) => b,
            NormBound::Relative(k) => k * crate::aggregate::parameter_norm(global).max(1.0),
        }
    }
}

impl std::fmt::Display for NormBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NormBound::Absolute(b) => write!(f, "{b}"),
            NormBound::Relative(k) => write!(f, "{k} x max(|global|, 1)"),
        }
    }
}
