//! `server.toml`: where to listen, the PKI, the run, its enrolled centres and its rounds. Every key and its
//! default is documented in README.md; an unknown key or a bad value is an error naming it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedslm_certs::ServerTlsFiles;
use fedslm_protocol::hex::from_hex;
use fedslm_protocol::{CenterId, Fold, ModelKind, Role, DEFAULT_CONNECTION_BUDGET, MAX_FOLDS};
use serde::{Deserialize, Serialize};

use crate::admission::Enrolment;
use crate::endpoint::HandshakeLimits;
use crate::round::{DpSettings, NormBound, RoundSettings, Strategy};

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What `server.toml` says, key by key, before it is checked: the typed form in which a program (a
/// simulation) writes a server's configuration without writing TOML. [`ServerConfig::from_toml`] checks it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerToml {
    pub listen: SocketAddr,
    /// Where TLS over TCP is served: `"off"`, or an address; `None`: `listen`'s address on TCP.
    pub tcp_listen: Option<String>,
    pub pki: PathBuf,
    pub run_id: String,
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    pub settings_hash: Option<String>,
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout_secs: u64,
    #[serde(default = "default_budget")]
    pub connection_budget_bytes: u64,
    /// Handshakes in flight, in all and from one source address (`HandshakeLimits`' defaults).
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_address: Option<usize>,
    /// Where to serve Prometheus metrics over HTTP (a local address); `None`: no metrics.
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub center: Vec<CenterEntry>,
    pub initial_model: Option<PathBuf>,
    #[serde(default = "default_output")]
    pub output: PathBuf,
    #[serde(default = "default_local_epochs")]
    pub local_epochs: u32,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    pub quorum: Option<usize>,
    /// `None`: [`default_deadline`] for the run's model.
    pub round_deadline_secs: Option<u64>,
    #[serde(default = "default_grace")]
    pub round_start_grace_secs: u64,
    #[serde(default = "default_retries")]
    pub round_retries: u32,
    pub strategy: Option<StrategyName>,
    pub proximal_mu: Option<f64>,
    pub norm_bound: Option<f64>,
    pub relative_norm_bound: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_evaluation_bins")]
    pub evaluation_bins: u32,
    #[serde(default)]
    pub evaluate_every: u32,
    /// AdaBN: validating centres recompute a network's batch-norm statistics from their own images (no label
    /// is read) before scoring.
    #[serde(default)]
    pub adapt_batch_norm: bool,
    /// FedBN: training centres keep their batch-norm layers (parameters and statistics); only the rest is
    /// averaged.
    #[serde(default)]
    pub fedbn: bool,
    /// Secure aggregation: the server learns only the sums of the centres' answers (updates, Newton
    /// statistics, histograms, placement sums), never one centre's.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Shares needed to unmask a sum: more than half of the training centres; unset: the fewest such.
    pub secure_threshold: Option<usize>,
    /// Cross-validation: the fold (0-based) every training centre holds out, of `cv_folds`.
    pub cv_fold: Option<u32>,
    pub cv_folds: Option<u32>,
    /// Differential privacy of the run's releases.
    #[serde(default)]
    pub privacy: PrivacyToml,
}

/// server.toml's `[privacy]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyToml {
    /// Admit only centres whose own policy requires differential privacy.
    #[serde(default)]
    pub require_dp: bool,
    /// Noise multiplier of every release (DP-SGD steps, Newton statistics, histogram counts); unset: none,
    /// or the one calibrated to `epsilon`.
    pub noise_multiplier: Option<f64>,
    /// The ε (at `delta`) a centre that answers every task of the run may spend: the noise multiplier is
    /// calibrated to it (instead of `noise_multiplier`).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub clip: Option<f64>,
    pub newton_clip: Option<f64>,
    pub sample_rate: Option<f64>,
}

impl ServerToml {
    /// The configuration as server.toml text, for a server run as its own process.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("server.toml's keys are plain values with string keys")
    }

    /// A configuration with every key at its default but the three without one.
    pub fn new(listen: SocketAddr, pki: PathBuf, run_id: String) -> ServerToml {
        ServerToml {
            listen,
            tcp_listen: None,
            pki,
            run_id,
            rounds: default_rounds(),
            settings_hash: None,
            hello_timeout_secs: default_hello_timeout(),
            connection_budget_bytes: default_budget(),
            max_handshakes: None,
            max_handshakes_per_address: None,
            metrics_listen: None,
            center: Vec::new(),
            initial_model: None,
            output: default_output(),
            local_epochs: default_local_epochs(),
            learning_rate: default_learning_rate(),
            batch_size: default_batch_size(),
            quorum: None,
            round_deadline_secs: None,
            round_start_grace_secs: default_grace(),
            round_retries: default_retries(),
            strategy: None,
            proximal_mu: None,
            norm_bound: None,
            relative_norm_bound: None,
            seed: default_seed(),
            evaluation_bins: default_evaluation_bins(),
            evaluate_every: 0,
            adapt_batch_norm: false,
            fedbn: false,
            secure_aggregation: false,
            secure_threshold: None,
            cv_fold: None,
            cv_folds: None,
            privacy: PrivacyToml::default(),
        }
    }
}

fn default_evaluation_bins() -> u32 {
    crate::round::EvaluationSettings::default().bins
}

/// `strategy` in server.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    Fedavg,
    Fedprox,
    Newton,
    Landmarks,
}

/// A `[[center]]` entry: a centre enrolled in the run, with its role (`train` or `validate`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CenterEntry {
    pub id: String,
    pub role: String,
}

fn default_rounds() -> u32 {
    20
}
fn default_hello_timeout() -> u64 {
    10
}
fn default_budget() -> u64 {
    DEFAULT_CONNECTION_BUDGET
}
fn default_output() -> PathBuf {
    PathBuf::from("run")
}
fn default_local_epochs() -> u32 {
    1
}
fn default_learning_rate() -> f64 {
    5e-3
}
fn default_batch_size() -> u32 {
    16
}
/// A round's deadline when server.toml sets none: what one silent centre may cost a round. Federated Newton's
/// statistics take a centre a second; a network's local epoch takes minutes on a hospital's CPU.
pub fn default_deadline(model: ModelKind) -> Duration {
    if model.is_network() {
        Duration::from_secs(15 * 60)
    } else {
        Duration::from_secs(2 * 60)
    }
}
fn default_grace() -> u64 {
    10
}
fn default_retries() -> u32 {
    2
}
fn default_seed() -> u64 {
    42
}

/// The rounds' settings before the model is known (its kind picks the default strategy).
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The initial global model file (`fedslm model init`); `None`: the server only admits centres.
    pub initial_model: Option<PathBuf>,
    /// Where the server writes the run's models.
    pub output: PathBuf,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// `None`: every training centre.
    pub quorum: Option<usize>,
    /// `None`: [`default_deadline`] for the run's model.
    pub deadline: Option<Duration>,
    pub start_grace: Duration,
    pub retries: u32,
    /// `None`: newton for the clinical model, fedavg for the networks.
    strategy: Option<StrategyName>,
    proximal_mu: Option<f64>,
    pub norm_bound: NormBound,
    pub seed: u64,
    pub evaluation: crate::round::EvaluationSettings,
    /// FedBN: training centres keep their batch-norm layers.
    pub batch_norm_local: bool,
    /// Secure aggregation's threshold, where it is on.
    pub secure_threshold: Option<usize>,
    /// Cross-validation: the fold the training centres hold out.
    pub fold: Option<Fold>,
    pub dp: Option<DpPlan>,
}

/// A run's differential privacy before its strategy is known: the noise given, or the budget to calibrate
/// it to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpPlan {
    pub noise: DpNoise,
    pub clip: f64,
    pub newton_clip: f64,
    pub sample_rate: f64,
}

/// How a run's noise is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpNoise {
    Multiplier(f64),
    Budget { epsilon: f64, delta: f64 },
}

/// A checked server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// QUIC's UDP address.
    pub listen: SocketAddr,
    /// TLS over TCP's address, for networks that block UDP; `None`: QUIC only.
    pub tcp_listen: Option<SocketAddr>,
    pub tls: ServerTlsFiles,
    pub enrolment: Enrolment,
    /// How long a connected peer has to send its Hello.
    pub hello_timeout: Duration,
    pub connection_budget: u64,
    pub handshakes: HandshakeLimits,
    pub metrics_listen: Option<SocketAddr>,
    pub run: RunConfig,
    path: PathBuf,
}

impl ServerConfig {
    /// Reads `server.toml`; relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ServerConfig::parse(&text, path)
    }

    /// Parses the text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<ServerConfig, ConfigError> {
        let file: ServerToml = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        ServerConfig::from_toml(file, path)
    }

    /// Checks a configuration given as values; relative paths in it are relative to `path`'s folder, which
    /// errors name.
    pub fn from_toml(file: ServerToml, path: &Path) -> Result<ServerConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if file.center.is_empty() {
            return Err(invalid(
                "no centre is enrolled: add [[center]] entries with an id and a role (train or validate)".into(),
            ));
        }
        let mut centers = BTreeMap::new();
        for c in &file.center {
            let id =
                CenterId::new(c.id.as_str()).map_err(|e| invalid(format!("[[center]] {e}")))?;
            let role = c
                .role
                .parse::<Role>()
                .map_err(|e| invalid(format!("[[center]] {id}: {e}")))?;
            if centers.insert(id.clone(), role).is_some() {
                return Err(invalid(format!("centre {id} is enrolled twice")));
            }
        }
        if !centers.values().any(|r| *r == Role::Train) {
            return Err(invalid("no centre has the role train".into()));
        }
        if file.run_id.trim().is_empty() {
            return Err(invalid("run_id is empty".into()));
        }
        let settings_hash = match &file.settings_hash {
            None => None,
            Some(h) => Some(
                from_hex(h)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        invalid(format!(
                            "settings_hash {h:?} is not 64 hexadecimal digits (a SHA-256)"
                        ))
                    })?,
            ),
        };
        let tcp_listen = match file.tcp_listen.as_deref().map(str::trim) {
            None => Some(file.listen),
            Some("off") => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|e| {
                invalid(format!(
                    "tcp_listen {addr:?}: {e} (an address such as \"0.0.0.0:4433\", or \"off\")"
                ))
            })?),
        };
        let defaults = HandshakeLimits::default();
        let handshakes = HandshakeLimits {
            in_flight: file.max_handshakes.unwrap_or(defaults.in_flight),
            per_address: file
                .max_handshakes_per_address
                .unwrap_or(defaults.per_address),
        };
        if handshakes.in_flight == 0 || handshakes.per_address == 0 {
            return Err(invalid(
                "max_handshakes and max_handshakes_per_address must be at least 1".into(),
            ));
        }
        if file.hello_timeout_secs == 0 {
            return Err(invalid("hello_timeout_secs must be at least 1".into()));
        }
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(invalid(format!("{key} = {v}: must be a positive number")))
            }
        };
        positive("learning_rate", file.learning_rate)?;
        let norm_bound = match (file.norm_bound, file.relative_norm_bound) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "norm_bound and relative_norm_bound: set one of them".into(),
                ))
            }
            (Some(b), None) => {
                positive("norm_bound", b)?;
                NormBound::Absolute(b)
            }
            (None, Some(k)) => {
                positive("relative_norm_bound", k)?;
                NormBound::Relative(k)
            }
            (None, None) => NormBound::DEFAULT,
        };
        match (file.strategy, file.proximal_mu) {
            (Some(StrategyName::Fedprox), None) => {
                return Err(invalid(
                    "strategy = \"fedprox\" needs proximal_mu (e.g. 0.01)".into(),
                ))
            }
            (Some(StrategyName::Fedprox), Some(mu)) => positive("proximal_mu", mu)?,
            (_, Some(_)) => {
                return Err(invalid(
                    "proximal_mu is for strategy = \"fedprox\" only".into(),
                ))
            }
            _ => {}
        }
        if file.local_epochs == 0 {
            return Err(invalid("local_epochs must be at least 1".into()));
        }
        if file.batch_size < 2 {
            return Err(invalid(format!(
                "batch_size = {}: must be at least 2 (batch norm needs two examples)",
                file.batch_size
            )));
        }
        if file.rounds == 0 {
            return Err(invalid("rounds must be at least 1".into()));
        }
        if file.round_deadline_secs == Some(0) {
            return Err(invalid("round_deadline_secs must be at least 1".into()));
        }
        let fold = match (file.cv_fold, file.cv_folds) {
            (None, None) => None,
            (Some(i), Some(k)) => Some(Fold::new(i, k, file.seed).ok_or_else(|| {
                invalid(format!(
                    "cv_fold = {i}, cv_folds = {k}: folds are 2 to {MAX_FOLDS}, the fold 0 to cv_folds - 1"
                ))
            })?),
            _ => return Err(invalid("cv_fold and cv_folds go together".into())),
        };
        if file.evaluation_bins > fedslm_protocol::Limits::default().max_histogram_bins {
            return Err(invalid(format!(
                "evaluation_bins = {}: at most {}",
                file.evaluation_bins,
                fedslm_protocol::Limits::default().max_histogram_bins
            )));
        }
        let training = centers.values().filter(|r| **r == Role::Train).count();
        if let Some(q) = file.quorum {
            if q == 0 || q > training {
                return Err(invalid(format!(
                    "quorum = {q}: must be between 1 and the {training} training centres"
                )));
            }
        }
        let dp = dp_plan(&file.privacy).map_err(invalid)?;
        let validating = centers.len() - training;
        let secure_threshold = secure_threshold(&file, training, validating).map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(ServerConfig {
            path: path.to_path_buf(),
            run: RunConfig {
                initial_model: file.initial_model.map(|p| base.join(p)),
                output: base.join(&file.output),
                local_epochs: file.local_epochs,
                learning_rate: file.learning_rate,
                batch_size: file.batch_size,
                quorum: file.quorum,
                deadline: file.round_deadline_secs.map(Duration::from_secs),
                start_grace: Duration::from_secs(file.round_start_grace_secs),
                retries: file.round_retries,
                strategy: file.strategy,
                proximal_mu: file.proximal_mu,
                norm_bound,
                seed: file.seed,
                evaluation: crate::round::EvaluationSettings {
                    bins: file.evaluation_bins,
                    every: file.evaluate_every,
                    adapt_batch_norm: file.adapt_batch_norm,
                },
                fold,
                dp,
                batch_norm_local: file.fedbn,
                secure_threshold,
            },
            listen: file.listen,
            tcp_listen,
            tls: ServerTlsFiles::in_pki(&base.join(&file.pki)),
            enrolment: Enrolment {
                run_id: file.run_id,
                rounds: file.rounds,
                centers,
                settings_hash,
                require_dp: file.privacy.require_dp,
            },
            hello_timeout: Duration::from_secs(file.hello_timeout_secs),
            connection_budget: file.connection_budget_bytes,
            handshakes,
            metrics_listen: file.metrics_listen,
        })
    }

    /// The round settings for a run of `model`; a strategy that does not fit the model is an error naming it.
    pub fn round_settings(&self, model: ModelKind) -> Result<RoundSettings, ConfigError> {
        let r = &self.run;
        let strategy = match (r.strategy, model) {
            (None, ModelKind::Clinical) | (Some(StrategyName::Newton), ModelKind::Clinical) => {
                Strategy::Newton
            }
            (None, _) | (Some(StrategyName::Fedavg), _) => Strategy::FedAvg,
            (Some(StrategyName::Fedprox), _) => Strategy::FedProx {
                mu: r.proximal_mu.unwrap_or(0.0),
            },
            (Some(StrategyName::Landmarks), _) => Strategy::Landmarks,
            (Some(StrategyName::Newton), other) => {
                return Err(ConfigError::Invalid {
                    path: self.path.clone(),
                    message: format!(
                    "strategy = \"newton\" fits the clinical model; the initial model is {other:?}"
                ),
                })
            }
        };
        if model == ModelKind::Clinical && strategy != Strategy::Newton {
            return Err(ConfigError::Invalid {
                path: self.path.clone(),
                message: format!(
                    "strategy = \"{}\": the clinical model is fitted by strategy = \"newton\"",
                    strategy.name()
                ),
            });
        }
        let training = self
            .enrolment
            .centers
            .values()
            .filter(|r| **r == Role::Train)
            .count();
        Ok(RoundSettings {
            model,
            rounds: self.enrolment.rounds,
            local_epochs: r.local_epochs,
            learning_rate: r.learning_rate,
            batch_size: r.batch_size,
            quorum: r.quorum.unwrap_or(training),
            deadline: r.deadline.unwrap_or_else(|| default_deadline(model)),
            start_grace: r.start_grace,
            retries: r.retries,
            strategy,
            norm_bound: r.norm_bound,
            seed: r.seed,
            fold: r.fold,
            evaluation: r.evaluation,
            batch_norm_local: r.batch_norm_local,
            secure_threshold: r.secure_threshold,
            dp: match r.dp {
                None => None,
                Some(plan) => Some(match plan.noise {
                    DpNoise::Multiplier(noise_multiplier) => DpSettings {
                        noise_multiplier,
                        clip: plan.clip,
                        newton_clip: plan.newton_clip,
                        sample_rate: plan.sample_rate,
                    },
                    DpNoise::Budget { epsilon, delta } => DpSettings::calibrated(
                        epsilon,
                        delta,
                        plan.clip,
                        plan.newton_clip,
                        plan.sample_rate,
                        strategy,
                        self.enrolment.rounds,
                        r.local_epochs,
                        r.evaluation,
                    )
                    .map_err(|message| ConfigError::Invalid {
                        path: self.path.clone(),
                        message,
                    })?,
                }),
            },
        })
    }

    /// The settings that decide a run's result, by name, for the store to tell a resumed run from another one.
    /// Where to listen, time limits and retries may change between restarts; these may not.
    pub fn fingerprint(
        &self,
        settings: &RoundSettings,
        initial_model_sha256: &str,
    ) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            f.insert(k.to_string(), v);
        };
        put("run_id", self.enrolment.run_id.clone());
        for (center, role) in &self.enrolment.centers {
            put(&format!("center.{center}"), role.name().into());
        }
        put(
            "settings_hash",
            self.enrolment
                .settings_hash
                .map_or("any".into(), |h| fedslm_protocol::hex::to_hex(&h)),
        );
        put("model", settings.model.name().into());
        put("initial_model_sha256", initial_model_sha256.into());
        put("rounds", settings.rounds.to_string());
        put("local_epochs", settings.local_epochs.to_string());
        put("learning_rate", settings.learning_rate.to_string());
        put("batch_size", settings.batch_size.to_string());
        put("quorum", settings.quorum.to_string());
        put(
            "strategy",
            match settings.strategy {
                Strategy::FedProx { mu } => format!("fedprox (mu {mu})"),
                other => other.name().into(),
            },
        );
        put("norm_bound", settings.norm_bound.to_string());
        put("seed", settings.seed.to_string());
        put("evaluation_bins", settings.evaluation.bins.to_string());
        put("evaluate_every", settings.evaluation.every.to_string());
        if settings.evaluation.adapt_batch_norm {
            put("adapt_batch_norm", "true".into());
        }
        if settings.batch_norm_local {
            put("fedbn", "true".into());
        }
        if let Some(t) = settings.secure_threshold {
            put("secure_aggregation", format!("threshold {t}"));
        }
        if let Some(dp) = settings.dp {
            put(
                "dp",
                format!(
                    "noise {} clip {} newton_clip {} sample_rate {}",
                    dp.noise_multiplier, dp.clip, dp.newton_clip, dp.sample_rate
                ),
            );
        }
        if let Some(fold) = settings.fold {
            put(
                "fold",
                format!("{} of {} (seed {})", fold.index, fold.count, fold.seed),
            );
        }
        f
    }

    /// The configuration file this came from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The run's differential privacy from `[privacy]`, or why it cannot be used.
fn dp_plan(p: &PrivacyToml) -> Result<Option<DpPlan>, String> {
    let noise = match (p.noise_multiplier, p.epsilon) {
        (Some(_), Some(_)) => return Err(
            "privacy.noise_multiplier and privacy.epsilon: set one (the noise, or the budget to \
                 calibrate it to)"
                .into(),
        ),
        (Some(sigma), None) => DpNoise::Multiplier(sigma),
        (None, Some(epsilon)) => DpNoise::Budget {
            epsilon,
            delta: p.delta.unwrap_or(1e-5),
        },
        (None, None) => {
            if p.require_dp {
                return Err(
                    "privacy.require_dp = true needs privacy.epsilon (the run's budget) or \
                            privacy.noise_multiplier"
                        .into(),
                );
            }
            if p.clip.is_some()
                || p.newton_clip.is_some()
                || p.sample_rate.is_some()
                || p.delta.is_some()
            {
                return Err(
                    "privacy.clip, newton_clip, sample_rate and delta need privacy.epsilon or \
                     privacy.noise_multiplier"
                        .into(),
                );
            }
            return Ok(None);
        }
    };
    let plan = DpPlan {
        noise,
        clip: p.clip.unwrap_or(DpSettings::DEFAULT_CLIP),
        newton_clip: p.newton_clip.unwrap_or(DpSettings::DEFAULT_NEWTON_CLIP),
        sample_rate: p.sample_rate.unwrap_or(DpSettings::DEFAULT_SAMPLE_RATE),
    };
    let mut positive = vec![("clip", plan.clip), ("newton_clip", plan.newton_clip)];
    match plan.noise {
        DpNoise::Multiplier(sigma) => positive.push(("noise_multiplier", sigma)),
        DpNoise::Budget { epsilon, delta } => {
            positive.push(("epsilon", epsilon));
            if !(delta > 0.0 && delta < 1.0) {
                return Err(format!("privacy.delta = {delta}: must be in (0, 1)"));
            }
        }
    }
    for (key, v) in positive {
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("privacy.{key} = {v}: must be a positive number"));
        }
    }
    if !(plan.sample_rate >= fedslm_protocol::MIN_SAMPLE_RATE && plan.sample_rate <= 1.0) {
        return Err(format!(
            "privacy.sample_rate = {}: must be in [{:e}, 1]",
            plan.sample_rate,
            fedslm_protocol::MIN_SAMPLE_RATE
        ));
    }
    if let DpNoise::Multiplier(sigma) = plan.noise {
        if sigma > fedslm_protocol::MAX_NOISE {
            return Err(format!(
                "privacy.noise_multiplier = {sigma}: at most {:e}",
                fedslm_protocol::MAX_NOISE
            ));
        }
    }
    Ok(Some(plan))
}

/// Secure aggregation's threshold, where server.toml turns it on: every sum needs three or more centres (with
/// two, each learns the other's answer by subtracting its own from the total), so there must be at least three
/// training centres and never exactly two validating ones; the threshold must be more than half the training
/// centres (the consistency check's premise) and no more than the quorum.
fn secure_threshold(
    file: &ServerToml,
    training: usize,
    validating: usize,
) -> Result<Option<usize>, String> {
    if !file.secure_aggregation {
        return match file.secure_threshold {
            Some(_) => Err("secure_threshold is set but secure_aggregation is not".into()),
            None => Ok(None),
        };
    }
    let min = fedslm_protocol::secure::MIN_PARTICIPANTS;
    if training < min {
        return Err(format!(
            "secure_aggregation needs at least {min} training centres, this run has {training}: with two, \
             each would learn the other's update by subtracting its own from the sum"
        ));
    }
    if validating == 2 {
        return Err(
            "secure_aggregation with two validating centres: each would learn the other's evaluation by \
             subtracting its own from the sum; enrol one, or three or more"
                .into(),
        );
    }
    let t = file.secure_threshold.unwrap_or(training / 2 + 1);
    if t <= training / 2 || t > training {
        return Err(format!(
            "secure_threshold = {t}: more than half of the {training} training centres, and at most all"
        ));
    }
    if let Some(q) = file.quorum {
        if q < t {
            return Err(format!(
                "quorum = {q} is below secure_threshold = {t}: a round of {q} centres could not be unmasked"
            ));
        }
    }
    Ok(Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        listen = "127.0.0.1:7878"
        pki = "pki"
        run_id = "slm-2026"
        [[center]]
        id = "center-a"
        role = "train"
        [[center]]
        id = "external"
        role = "validate"
    "#;

    fn parse(text: &str) -> Result<ServerConfig, String> {
        ServerConfig::parse(text, Path::new("/etc/fedslm/server.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_private_run_is_given_its_noise_or_calibrated_to_its_budget() {
        let e = parse(&format!("{GOOD}\n[privacy]\nrequire_dp = true\n")).unwrap_err();
        assert!(e.contains("privacy.epsilon"), "{e}");
        let e = parse(&format!(
            "{GOOD}\n[privacy]\nepsilon = 8.0\nnoise_multiplier = 1.0\n"
        ))
        .unwrap_err();
        assert!(e.contains("set one"), "{e}");
        let e = parse(&format!("{GOOD}\n[privacy]\nclip = 2.0\n")).unwrap_err();
        assert!(e.contains("need privacy.epsilon"), "{e}");
        let given = parse(&format!("{GOOD}\n[privacy]\nnoise_multiplier = 1.3\n")).unwrap();
        let dp = given.round_settings(ModelKind::Mri).unwrap().dp.unwrap();
        assert_eq!(
            (dp.noise_multiplier, dp.clip, dp.sample_rate),
            (1.3, 1.0, 0.25)
        );
        // Calibrated: a centre answering every fit and the evaluation of the run spends just under 8.
        let config = parse(&format!(
            "rounds = 4\nlocal_epochs = 2\n{GOOD}\n[privacy]\nepsilon = 8.0\n"
        ))
        .unwrap();
        for model in [ModelKind::Mri, ModelKind::Clinical] {
            let settings = config.round_settings(model).unwrap();
            let dp = settings.dp.unwrap();
            let spent = crate::privacy::epsilon(&dp, &settings, 4, 1);
            assert!(spent <= 8.0 && spent > 7.95, "{model:?}: {spent}");
            // One fit more is over the budget.
            assert!(crate::privacy::epsilon(&dp, &settings, 5, 1) > 8.0);
        }
    }

    #[test]
    fn a_configuration_written_as_values_reads_back_the_same() {
        let mut t = ServerToml::new(
            "127.0.0.1:7878".parse().unwrap(),
            PathBuf::from("/srv/a \"quoted\" pki"),
            "run \\ 1".into(),
        );
        t.rounds = 7;
        t.cv_fold = Some(1);
        t.cv_folds = Some(3);
        t.center = vec![
            CenterEntry {
                id: "center-a".into(),
                role: "train".into(),
            },
            CenterEntry {
                id: "external".into(),
                role: "validate".into(),
            },
        ];
        let path = Path::new("/etc/fedslm/server.toml");
        let direct = ServerConfig::from_toml(t.clone(), path).unwrap();
        let read = ServerConfig::parse(&t.to_toml(), path).unwrap();
        assert_eq!(read.run, direct.run);
        assert_eq!(read.enrolment, direct.enrolment);
        assert_eq!(read.tls.ca, PathBuf::from("/srv/a \"quoted\" pki/ca.pem"));
    }

    #[test]
    fn a_minimal_file_gets_defaults_and_paths_relative_to_it() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tls.ca, Path::new("/etc/fedslm/pki/ca.pem"));
        assert_eq!(c.enrolment.rounds, 20);
        assert_eq!(c.enrolment.centers.len(), 2);
        assert_eq!(c.hello_timeout, Duration::from_secs(10));
        assert_eq!(c.run.initial_model, None);
        assert_eq!(c.run.output, Path::new("/etc/fedslm/run"));
        let s = c.round_settings(ModelKind::Mri).unwrap();
        assert_eq!(
            (s.quorum, s.local_epochs, s.batch_size, s.retries),
            (1, 1, 16, 2)
        );
        assert_eq!(s.strategy, Strategy::FedAvg);
        // Safe defaults: a deadline of minutes that fits the model, and a norm bound on.
        assert_eq!(s.deadline, Duration::from_secs(15 * 60));
        assert_eq!(s.norm_bound, NormBound::Relative(3.0));
        let clinical = c.round_settings(ModelKind::Clinical).unwrap();
        assert_eq!(clinical.strategy, Strategy::Newton);
        assert_eq!(clinical.deadline, Duration::from_secs(2 * 60));
    }

    #[test]
    fn round_keys_are_read_and_strategies_must_fit_the_model() {
        let c = parse(&format!(
            "initial_model = \"init.safetensors\"\nstrategy = \"fedprox\"\nproximal_mu = 0.05\n\
             quorum = 1\nround_deadline_secs = 90\nnorm_bound = 3.5\nseed = 9\nlocal_epochs = 2\n{GOOD}"
        ))
        .unwrap();
        assert_eq!(
            c.run.initial_model.as_deref(),
            Some(Path::new("/etc/fedslm/init.safetensors"))
        );
        let s = c.round_settings(ModelKind::Combined).unwrap();
        assert_eq!(s.strategy, Strategy::FedProx { mu: 0.05 });
        assert_eq!((s.quorum, s.seed, s.local_epochs), (1, 9, 2));
        assert_eq!(s.norm_bound, NormBound::Absolute(3.5));
        let relative = parse(&format!("relative_norm_bound = 0.5\n{GOOD}")).unwrap();
        assert_eq!(
            relative.round_settings(ModelKind::Mri).unwrap().norm_bound,
            NormBound::Relative(0.5)
        );
        assert_eq!(s.deadline, Duration::from_secs(90));
        let e = c
            .round_settings(ModelKind::Clinical)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("strategy = \"fedprox\"") && e.contains("newton"),
            "{e}"
        );
        let n = parse(&format!("strategy = \"newton\"\n{GOOD}")).unwrap();
        let e = n.round_settings(ModelKind::Mri).unwrap_err().to_string();
        assert!(e.contains("Mri"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse(&GOOD.replace("\"validate\"", "\"observe\"")).unwrap_err();
        assert!(e.contains("server.toml") && e.contains("observe"), "{e}");
        let e = parse(&GOOD.replace("\"external\"", "\"External\"")).unwrap_err();
        assert!(e.contains("\"External\" contains 'E'"), "{e}");
        let e = parse(&GOOD.replace("\"external\"", "\"center-a\"")).unwrap_err();
        assert!(e.contains("centre center-a is enrolled twice"), "{e}");
        let e = parse(&GOOD.replace("run_id", "runid")).unwrap_err();
        assert!(e.contains("runid"), "{e}");
        let e = parse(&format!("settings_hash = \"abc\"\n{GOOD}")).unwrap_err();
        assert!(e.contains("not 64 hexadecimal digits"), "{e}");
        for (line, needle) in [
            ("learning_rate = -1.0", "learning_rate = -1"),
            ("batch_size = 1", "batch_size = 1"),
            ("quorum = 5", "quorum = 5"),
            ("quorum = 0", "quorum = 0"),
            ("strategy = \"fedprox\"", "needs proximal_mu"),
            ("proximal_mu = 0.1", "for strategy = \"fedprox\" only"),
            ("strategy = \"fedsgd\"", "fedsgd"),
            ("norm_bound = 0.0", "norm_bound"),
            ("relative_norm_bound = -1.0", "relative_norm_bound"),
            (
                "norm_bound = 1.0\nrelative_norm_bound = 1.0",
                "set one of them",
            ),
            ("round_deadline_secs = 0", "round_deadline_secs"),
            ("local_epoch = 2", "local_epoch"),
            ("rounds = 0", "rounds"),
            ("cv_fold = 5\ncv_folds = 5", "cv_fold = 5, cv_folds = 5"),
            ("cv_fold = 1", "go together"),
            ("evaluation_bins = 100000000", "evaluation_bins"),
        ] {
            let e = parse(&format!("{line}\n{GOOD}")).unwrap_err();
            assert!(
                e.contains(needle) && e.contains("server.toml"),
                "{line}: {e}"
            );
        }
        let e = parse(
            r#"listen = "127.0.0.1:1"
            pki = "p"
            run_id = "r""#,
        )
        .unwrap_err();
        assert!(e.contains("no centre is enrolled"), "{e}");
    }

    #[test]
    fn tcp_listens_beside_quic_unless_turned_off() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tcp_listen, Some(c.listen));
        let off = parse(&format!("tcp_listen = \"off\"\n{GOOD}")).unwrap();
        assert_eq!(off.tcp_listen, None);
        let other = parse(&format!("tcp_listen = \"0.0.0.0:443\"\n{GOOD}")).unwrap();
        assert_eq!(other.tcp_listen, Some("0.0.0.0:443".parse().unwrap()));
        let e = parse(&format!("tcp_listen = \"443\"\n{GOOD}")).unwrap_err();
        assert!(e.contains("tcp_listen \"443\""), "{e}");
    }

    /// `GOOD` with `train` more training centres, `validate` more validating ones and `extra` keys.
    fn federation(train: usize, validate: usize, extra: &str) -> String {
        let mut text =
            format!("listen = \"127.0.0.1:7878\"\npki = \"pki\"\nrun_id = \"r\"\n{extra}\n");
        for i in 0..train {
            text.push_str(&format!("[[center]]\nid = \"t{i}\"\nrole = \"train\"\n"));
        }
        for i in 0..validate {
            text.push_str(&format!("[[center]]\nid = \"v{i}\"\nrole = \"validate\"\n"));
        }
        text
    }

    #[test]
    fn secure_aggregation_is_refused_at_start_where_a_sum_could_have_two_centres_or_a_minority_threshold(
    ) {
        let on = "secure_aggregation = true";
        let err = parse(&federation(2, 1, on)).unwrap_err();
        assert!(
            err.contains("at least 3 training centres, this run has 2"),
            "{err}"
        );
        assert!(err.contains("subtracting its own"), "{err}");
        let err = parse(&federation(3, 2, on)).unwrap_err();
        assert!(err.contains("two validating centres"), "{err}");
        let err = parse(&federation(4, 1, &format!("{on}\nsecure_threshold = 2"))).unwrap_err();
        assert!(
            err.contains("more than half of the 4 training centres"),
            "{err}"
        );
        let err = parse(&federation(
            4,
            1,
            &format!("{on}\nsecure_threshold = 4\nquorum = 3"),
        ))
        .unwrap_err();
        assert!(err.contains("below secure_threshold"), "{err}");
        let err = parse(&federation(4, 1, "secure_threshold = 3")).unwrap_err();
        assert!(err.contains("secure_aggregation is not"), "{err}");
        // The fewest more than half, by default; the setting in the round settings and the fingerprint.
        let c = parse(&federation(4, 1, on)).unwrap();
        let settings = c.round_settings(ModelKind::Mri).unwrap();
        assert_eq!(settings.secure_threshold, Some(3));
        assert_eq!(
            c.fingerprint(&settings, "x")["secure_aggregation"],
            "threshold 3"
        );
        assert!(parse(&federation(3, 1, on)).is_ok());
        assert!(parse(&federation(3, 3, on)).is_ok());
    }
}
