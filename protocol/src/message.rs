//! The messages of a round (DESIGN.md §3). No message can carry an image or a patient row: only weights,
//! counts and aggregates.

use crate::center::CenterId;
use crate::weights::Weights;

/// What a centre does in a run; set in the server's configuration only, never by the centre.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub enum Role {
    /// Trains locally and is evaluated internally.
    Train,
    /// Held out: only evaluates, for external validation.
    Validate,
}

impl Role {
    /// The role's name in configuration files, audit entries and results: `train` or `validate`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Train => "train",
            Role::Validate => "validate",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A role name that is neither `train` nor `validate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: a centre's role is train or validate")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        [Role::Train, Role::Validate]
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// Which of the study's three models: the one model kind of every layer (tasks, model files, commands,
/// results), named `clinical`, `mri` and `combined` wherever it is written.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, bincode::Encode, bincode::Decode,
)]
pub enum ModelKind {
    /// Logistic regression on the coded clinical factors.
    Clinical,
    /// The ResNet on the MRI crops.
    Mri,
    /// The ResNet with the coded clinical factors joined to its pooled features.
    Combined,
}

impl ModelKind {
    /// The three, in the study's order.
    pub const ALL: [ModelKind; 3] = [ModelKind::Clinical, ModelKind::Mri, ModelKind::Combined];

    /// The model's name in files, commands and results.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Clinical => "clinical",
            ModelKind::Mri => "mri",
            ModelKind::Combined => "combined",
        }
    }

    /// Whether the model is an image network (trained by gradient steps, not fitted by Newton).
    pub fn is_network(self) -> bool {
        self != ModelKind::Clinical
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A model name that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model {0:?}: the models are clinical, mri and combined")]
pub struct UnknownModel(pub String);

impl std::str::FromStr for ModelKind {
    type Err = UnknownModel;

    fn from_str(s: &str) -> Result<ModelKind, UnknownModel> {
        ModelKind::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownModel(s.to_string()))
    }
}

/// What a client optimises locally during a fit task.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub enum LocalObjective {
    /// The model's own loss (FedAvg, FedBN, robust aggregation).
    Plain,
    /// The loss plus `mu / 2 * ||w - w_global||^2` (FedProx).
    Proximal { mu: f64 },
    /// No training: return the logistic model's gradient, Hessian and log-likelihood at the global
    /// coefficients, for the server's Newton step.
    NewtonStep,
    /// No training: return the mean intensity landmarks of the centre's images (`crate::landmarks`), with the
    /// images counted as `examples`, so that the server's example-weighted mean is the consortium's standard
    /// intensity scale (Nyúl-Udupa).
    Landmarks,
}

/// A centre's data, as counts only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, bincode::Encode, bincode::Decode)]
pub struct SampleCounts {
    pub patients: u64,
    pub positives: u64,
    pub with_images: u64,
}

/// Client → server, first message on the control stream.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct Hello {
    pub protocol_version: u16,
    pub software_version: String,
    /// The centre the client believes it is; must equal its certificate's.
    pub center: CenterId,
    /// SHA-256 of the client's clinical coding and preprocessing settings; must equal the run's.
    pub settings_hash: [u8; 32],
    /// SHA-256 of the site's disclosure policy (`[privacy]`), recorded by the server in the audit log and the
    /// model card.
    pub policy_hash: [u8; 32],
    /// Whether that policy requires differential privacy of every release (`privacy.require_dp`).
    pub requires_dp: bool,
    pub counts: SampleCounts,
}

/// Server → client: admitted.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct Welcome {
    pub run_id: String,
    /// The centre as the server identified it from the certificate.
    pub center: CenterId,
    pub role: Role,
    pub rounds: u32,
}

/// A cross-validation fold of every training centre's labelled patients: stratified by outcome, dealt out by a
/// generator seeded with `seed` mixed with the centre's id, so that a centre's folds are the same in every
/// task of a run and differ between centres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Fold {
    /// The fold held out, `0..count`.
    pub index: u32,
    pub count: u32,
    pub seed: u64,
}

/// The most folds a task may name.
pub const MAX_FOLDS: u32 = 100;

impl Fold {
    /// `None` unless `index < count` and `2 <= count <= MAX_FOLDS`.
    pub fn new(index: u32, count: u32, seed: u64) -> Option<Fold> {
        ((2..=MAX_FOLDS).contains(&count) && index < count).then_some(Fold { index, count, seed })
    }
}

/// Server → training client: train locally from these weights.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct FitTask {
    pub round: u32,
    pub model: ModelKind,
    pub weights: Weights,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// Cross-validation fold held out of this fit, if any: train on the other folds.
    pub fold: Option<Fold>,
    pub seed: u64,
    pub objective: LocalObjective,
    /// FedBN: keep batch-norm parameters and statistics local, use only the rest of `weights`.
    pub keep_batch_norm_local: bool,
    /// Differential privacy: train by DP-SGD, or noise the Newton statistics, with these parameters.
    pub dp: Option<DpSgd>,
}

/// The parameters of a patient-level differentially private release of an update (DESIGN.md §5, README
/// "Privacy"). Training: each local step samples each patient with probability `sample_rate` (Poisson),
/// clips each patient's gradient to L2 norm `clip`, and adds Gaussian noise of standard deviation
/// `noise_multiplier * clip` to their sum; an epoch is `ceil(1 / sample_rate)` steps. Newton statistics: each
/// patient's (gradient, Hessian, log-likelihood) contribution clipped to `clip`, their sum noised once
/// (`sample_rate` must be 1).
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct DpSgd {
    pub noise_multiplier: f64,
    pub clip: f64,
    pub sample_rate: f64,
}

/// The largest noise multiplier (and histogram noise) a task may ask for: far beyond any useful one, and
/// small enough that noised counts stay far inside u64.
pub const MAX_NOISE: f64 = 1e6;

/// The smallest sampling rate a task may ask for: at most 10 000 steps an epoch.
pub const MIN_SAMPLE_RATE: f64 = 1e-4;

impl DpSgd {
    /// Why these parameters cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(self.noise_multiplier > 0.0 && self.noise_multiplier <= MAX_NOISE) {
            return Err(format!(
                "noise multiplier {:?} (0 to {MAX_NOISE:e})",
                self.noise_multiplier
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(format!("clipping norm {:?}", self.clip));
        }
        if !(self.sample_rate >= MIN_SAMPLE_RATE && self.sample_rate <= 1.0) {
            return Err(format!(
                "sampling rate {:?} ({MIN_SAMPLE_RATE:e} to 1)",
                self.sample_rate
            ));
        }
        Ok(())
    }

    /// Local steps in `epochs` epochs: `ceil(1 / sample_rate)` each.
    pub fn steps(&self, epochs: u32) -> u64 {
        u64::from(epochs) * (1.0 / self.sample_rate).ceil() as u64
    }
}

/// Training client → server: the local result of a fit task.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct FitResult {
    pub round: u32,
    pub weights: Weights,
    pub examples: u64,
    pub train_loss: f64,
}

/// Server → any client: evaluate these weights on local data.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct EvaluateTask {
    pub round: u32,
    pub model: ModelKind,
    pub weights: Weights,
    /// Evaluate only this cross-validation fold; `None`: all local patients.
    pub fold: Option<Fold>,
    /// Number of equal-width bins over [0, 1] for the score histograms.
    pub histogram_bins: u32,
    /// Differential privacy: Gaussian noise of this standard deviation on each count (a patient changes one
    /// count by one), rounded and kept non-negative; the loss is then not released (NaN).
    pub histogram_noise: Option<f64>,
    /// AdaBN: before scoring, recompute the network's batch-norm statistics from the centre's own images in
    /// the selection (no label is read); the learnt weights are used as sent.
    pub adapt_batch_norm: bool,
}

/// Per-class counts of predicted probabilities in equal-width bins over [0, 1].
#[derive(Debug, Clone, PartialEq, Eq, Default, bincode::Encode)]
pub struct ScoreHistogram {
    pub positive: Vec<u64>,
    pub negative: Vec<u64>,
}

/// Client → server: the result of an evaluate task, as aggregates only.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct EvalReport {
    pub round: u32,
    pub examples: u64,
    pub positives: u64,
    pub loss: f64,
    pub histogram: ScoreHistogram,
}

/// The most runs a placement task may name on one side.
pub const MAX_PLACEMENT_RUNS: usize = 100;

/// Server → client: the second pass of a paired DeLong test between models A and B (DESIGN.md §3). The centre
/// takes the scores it kept from the last evaluation of each run named (A's cross-validation folds, or the
/// final run), pairs them by patient, and places each patient's two scores in the pooled histograms.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct PlacementTask {
    pub a_runs: Vec<String>,
    pub b_runs: Vec<String>,
    /// Every centre's scores under A, pooled, as the server computed them from the evaluation reports.
    pub pooled_a: ScoreHistogram,
    pub pooled_b: ScoreHistogram,
}

/// Client → server: sums over the centre's patients of their DeLong placement values under A and B, per class
/// (`V_A, V_B, V_A², V_B², V_A·V_B`): aggregates from which no patient's score can be told apart.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct PlacementReport {
    pub n_positive: u64,
    pub n_negative: u64,
    pub positive: [f64; 5],
    pub negative: [f64; 5],
}

/// Server → client: the run is over.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct Finish {
    pub run_id: String,
    pub rounds_completed: u32,
    pub reason: String,
}

/// The most rounds a [`StatusReport`] lists (the latest).
pub const MAX_STATUS_ROUNDS: usize = 200;

/// Client → server, as the first frame instead of a Hello: how far is the run, and what was this centre's
/// part in it? The connection is answered and closed; it is never admitted as the centre's node, so it
/// replaces no node's connection.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct StatusRequest {
    pub protocol_version: u16,
    /// Must be the certificate's centre.
    pub center: CenterId,
}

/// What became of the asking centre in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum RoundOutcome {
    /// Its update was folded in.
    Contributed,
    /// Its update was refused (the reason says why) or it could not train.
    Refused,
    /// No answer before the round closed, or it was not connected.
    Silent,
    /// It was not asked (a validation centre, or not connected when the round began).
    NotAsked,
}

/// The asking centre's part in one round.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct RoundPart {
    pub round: u32,
    pub outcome: RoundOutcome,
    /// The examples and training loss of its update, where it contributed (0 otherwise).
    pub examples: u64,
    pub train_loss: f64,
    /// Why it was refused, where it was (empty otherwise).
    pub reason: String,
}

/// The last evaluation's pooled AUCs: a side's is given only where it pools two or more centres, or the
/// asking centre alone (so that no other single centre's figure is ever told).
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct StatusEvaluation {
    pub round: u32,
    pub internal_auc: Option<f64>,
    pub external_auc: Option<f64>,
}

/// Server → client: the run's progress and the asking centre's own part in it.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct StatusReport {
    pub run_id: String,
    /// `waiting`, `running`, `completed` or `failed`.
    pub state: String,
    pub rounds_planned: u32,
    pub rounds_committed: u32,
    /// The latest rounds (at most [`MAX_STATUS_ROUNDS`]), oldest first.
    pub rounds: Vec<RoundPart>,
    pub evaluation: Option<StatusEvaluation>,
}

/// Why a peer refuses or aborts; both sides also log the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub enum ErrorCode {
    UnsupportedVersion,
    NotEnrolled,
    IdentityMismatch,
    SettingsMismatch,
    Malformed,
    Unexpected,
    Superseded,
    Internal,
    /// A fit result failed the server's checks (the message says which); the round goes on without it.
    UpdateRefused,
    /// The site's disclosure policy does not let it answer the task (the message names the rule).
    PolicyRefused,
    /// The run requires every centre's policy to require differential privacy, and this one's does not.
    PrivacyRequired,
    /// A step of secure aggregation failed its checks (the message says which): the centre leaves the sum.
    SecureAggregation,
}

/// Either side: a refusal or an abort, with a message for people.
#[derive(Debug, Clone, PartialEq, bincode::Encode)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

/// One frame's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    FitTask(FitTask),
    FitResult(FitResult),
    EvaluateTask(EvaluateTask),
    EvalReport(EvalReport),
    Finish(Finish),
    Error(ErrorMessage),
    PlacementTask(PlacementTask),
    PlacementReport(PlacementReport),
    StatusRequest(StatusRequest),
    StatusReport(StatusReport),
    /// A step of secure aggregation's conversation on a task's stream.
    Secure(crate::secure::Secure),
}

/// The kind byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Hello = 1,
    Welcome = 2,
    FitTask = 3,
    FitResult = 4,
    EvaluateTask = 5,
    EvalReport = 6,
    Finish = 7,
    Error = 8,
    PlacementTask = 9,
    PlacementReport = 10,
    StatusRequest = 11,
    StatusReport = 12,
    Secure = 13,
}

impl MessageKind {
    pub const ALL: [MessageKind; 13] = [
        MessageKind::Hello,
        MessageKind::Welcome,
        MessageKind::FitTask,
        MessageKind::FitResult,
        MessageKind::EvaluateTask,
        MessageKind::EvalReport,
        MessageKind::Finish,
        MessageKind::Error,
        MessageKind::PlacementTask,
        MessageKind::PlacementReport,
        MessageKind::StatusRequest,
        MessageKind::StatusReport,
        MessageKind::Secure,
    ];

    pub fn from_code(code: u8) -> Option<MessageKind> {
        MessageKind::ALL.into_iter().find(|k| *k as u8 == code)
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// Whether frames of this kind carry model weights (and so get the large limit).
    pub fn carries_weights(self) -> bool {
        matches!(
            self,
            MessageKind::FitTask | MessageKind::FitResult | MessageKind::EvaluateTask
        )
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::Welcome(_) => MessageKind::Welcome,
            Message::FitTask(_) => MessageKind::FitTask,
            Message::FitResult(_) => MessageKind::FitResult,
            Message::EvaluateTask(_) => MessageKind::EvaluateTask,
            Message::EvalReport(_) => MessageKind::EvalReport,
            Message::Finish(_) => MessageKind::Finish,
            Message::Error(_) => MessageKind::Error,
            Message::PlacementTask(_) => MessageKind::PlacementTask,
            Message::PlacementReport(_) => MessageKind::PlacementReport,
            Message::StatusRequest(_) => MessageKind::StatusRequest,
            Message::StatusReport(_) => MessageKind::StatusReport,
            Message::Secure(_) => MessageKind::Secure,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorMessage {
            code,
            message: message.into(),
        })
    }
}
