//! The site's disclosure policy, the `[privacy]` table of client.toml: which kinds of task the site answers,
//! the most histogram bins it releases, the fewest patients an evaluation may describe per class and an
//! update may be computed from, and whether every release must be differentially private within a budget
//! (ε per run and over the site's lifetime, at one δ). The node checks every task against it and refuses,
//! with the rule named, what would release more; the server records the refusal and goes on. Pure: no IO
//! (the spending is the node's ledger's).

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

/// A kind of task, as the policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Local training: an updated model.
    Fit,
    /// The clinical model's Newton statistics (gradient, Hessian, log-likelihood).
    Newton,
    /// Score histograms of an evaluation.
    Evaluate,
    /// Placement sums of a paired comparison.
    Placement,
    /// The mean intensity landmarks of the site's images (intensity standardisation's shared scale).
    Landmarks,
}

impl TaskKind {
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Fit,
        TaskKind::Newton,
        TaskKind::Evaluate,
        TaskKind::Placement,
        TaskKind::Landmarks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Fit => "fit",
            TaskKind::Newton => "newton",
            TaskKind::Evaluate => "evaluate",
            TaskKind::Placement => "placement",
            TaskKind::Landmarks => "landmarks",
        }
    }
}

/// The `[privacy]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    accept: Option<Vec<TaskKind>>,
    max_bins: Option<u32>,
    min_per_class: Option<u64>,
    min_examples: Option<u64>,
    #[serde(default)]
    require_dp: bool,
    epsilon: Option<f64>,
    delta: Option<f64>,
    lifetime_epsilon: Option<f64>,
    #[serde(default)]
    require_secure_aggregation: bool,
    release_own_auc: Option<bool>,
    /// Where the node records what it spent (read by the configuration, not part of the policy).
    pub(crate) ledger: Option<std::path::PathBuf>,
}

/// The δ of a site's (ε, δ) budget where client.toml names none.
pub const DEFAULT_DELTA: f64 = 1e-5;

/// What a site that requires differential privacy lets each run, and all runs together, spend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// ε of one run (`privacy.epsilon`).
    pub epsilon: f64,
    /// ε of every run this site has answered, together (`privacy.lifetime_epsilon`); `None`: no such bound.
    pub lifetime_epsilon: Option<f64>,
    /// The δ of both (`privacy.delta`).
    pub delta: f64,
}

/// What the site lets out.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The kinds of task the site answers (default: all).
    pub accept: BTreeSet<TaskKind>,
    /// The most bins of an evaluation's histograms (default: any the protocol allows).
    pub max_bins: Option<u32>,
    /// The fewest patients of each class an evaluation or placement sums may describe (default: 1).
    pub min_per_class: Option<u64>,
    /// The fewest patients an update or Newton statistics may be computed from (default: 1).
    pub min_examples: Option<u64>,
    /// Every release differentially private, within this budget (`privacy.require_dp`); `None`: releases in
    /// the clear are answered (and DP ones, where a task asks, are still recorded in the ledger).
    pub dp_budget: Option<Budget>,
    /// Answer only tasks whose answer goes into a secure sum (`privacy.require_secure_aggregation`): the
    /// server then learns only totals of three or more centres, never this site's own.
    pub require_secure_aggregation: bool,
    /// Under secure aggregation, release the site's own AUC of an evaluation beside its masked histograms
    /// (`privacy.release_own_auc`, default true): the one per-centre figure the server is then told.
    pub release_own_auc: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            accept: TaskKind::ALL.into_iter().collect(),
            max_bins: None,
            min_per_class: None,
            min_examples: None,
            dp_budget: None,
            require_secure_aggregation: false,
            release_own_auc: true,
        }
    }
}

impl TryFrom<PolicyFile> for Policy {
    type Error = String;

    /// The policy, or why its keys do not make one.
    fn try_from(f: PolicyFile) -> Result<Policy, String> {
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(format!("privacy.{key} = {v}: must be a positive number"))
            }
        };
        let dp_budget = match (f.require_dp, f.epsilon) {
            (true, Some(epsilon)) => {
                let delta = f.delta.unwrap_or(DEFAULT_DELTA);
                if !(delta > 0.0 && delta < 1.0) {
                    return Err(format!("privacy.delta = {delta}: must be in (0, 1)"));
                }
                if f.ledger.is_none() {
                    return Err("privacy.require_dp needs privacy.ledger: the file where the node records \
                                what it spends, so that a restart does not forget it"
                        .into());
                }
                let epsilon = positive("epsilon", epsilon)?;
                let lifetime_epsilon = f
                    .lifetime_epsilon
                    .map(|e| positive("lifetime_epsilon", e))
                    .transpose()?;
                if lifetime_epsilon.is_some_and(|l| l < epsilon) {
                    return Err(
                        "privacy.lifetime_epsilon is below privacy.epsilon: no run could finish".into(),
                    );
                }
                Some(Budget {
                    epsilon,
                    lifetime_epsilon,
                    delta,
                })
            }
            (true, None) => {
                return Err(
                    "privacy.require_dp needs privacy.epsilon, the budget of one run (e.g. 8)".into(),
                )
            }
            (false, _) if f.epsilon.is_some() || f.lifetime_epsilon.is_some() || f.delta.is_some() => {
                return Err(
                    "privacy.epsilon, lifetime_epsilon and delta are the budget of privacy.require_dp = true"
                        .into(),
                )
            }
            (false, _) => None,
        };
        Ok(Policy {
            accept: f.accept.map_or_else(
                || TaskKind::ALL.into_iter().collect(),
                |a| a.into_iter().collect(),
            ),
            max_bins: f.max_bins,
            min_per_class: f.min_per_class,
            min_examples: f.min_examples,
            dp_budget,
            require_secure_aggregation: f.require_secure_aggregation,
            release_own_auc: f.release_own_auc.unwrap_or(true),
        })
    }
}

/// A task the policy does not let the site answer, with the rule (client.toml's key) that says so.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("this site's policy does not answer {} tasks (privacy.accept)", .0.name())]
    NotAccepted(TaskKind),
    #[error(
        "this site's policy answers only into a secure sum (privacy.require_secure_aggregation); the server \
         asked for an answer in the clear"
    )]
    NeedsSecureAggregation,
    #[error("the task asks for {asked} histogram bins; this site's policy releases at most {max} (privacy.max_bins)")]
    TooManyBins { asked: u32, max: u32 },
    #[error(
        "the answer would describe {positives} patients with SLM and {negatives} without; this site's policy \
         needs at least {min} of each (privacy.min_per_class)"
    )]
    TooFewPerClass {
        positives: u64,
        negatives: u64,
        min: u64,
    },
    #[error(
        "the answer would be computed from {examples} patients; this site's policy needs at least {min} \
         (privacy.min_examples)"
    )]
    TooFewExamples { examples: u64, min: u64 },
    #[error(
        "the {} task asks for a release without differential privacy; this site's policy requires it \
         (privacy.require_dp)", .0.name()
    )]
    NeedsDp(TaskKind),
    #[error(
        "the release would bring this site's ε to {would:.4} (δ = {delta:e}), over its budget of {budget} \
         ({key}); spent so far: {spent:.4}"
    )]
    OverBudget {
        key: &'static str,
        spent: f64,
        would: f64,
        budget: f64,
        delta: f64,
    },
}

impl Policy {
    /// Whether the site answers tasks of `kind`.
    pub fn accepts(&self, kind: TaskKind) -> Result<(), PolicyRefusal> {
        if self.accept.contains(&kind) {
            Ok(())
        } else {
            Err(PolicyRefusal::NotAccepted(kind))
        }
    }

    /// Whether an evaluation of `bins` bins may be answered.
    pub fn bins(&self, bins: u32) -> Result<(), PolicyRefusal> {
        match self.max_bins {
            Some(max) if bins > max => Err(PolicyRefusal::TooManyBins { asked: bins, max }),
            _ => Ok(()),
        }
    }

    /// Whether an answer describing `positives` and `negatives` patients may leave.
    pub fn classes(&self, positives: u64, negatives: u64) -> Result<(), PolicyRefusal> {
        match self.min_per_class {
            Some(min) if positives < min || negatives < min => Err(PolicyRefusal::TooFewPerClass {
                positives,
                negatives,
                min,
            }),
            _ => Ok(()),
        }
    }

    /// Whether a task of `kind` may be answered as it asks: with differential privacy (`dp`) or without.
    pub fn privacy(&self, kind: TaskKind, dp: bool) -> Result<(), PolicyRefusal> {
        if self.dp_budget.is_some() && !dp {
            return Err(PolicyRefusal::NeedsDp(kind));
        }
        Ok(())
    }

    /// Whether an answer computed from `examples` patients may leave.
    pub fn examples(&self, examples: u64) -> Result<(), PolicyRefusal> {
        match self.min_examples {
            Some(min) if examples < min => Err(PolicyRefusal::TooFewExamples { examples, min }),
            _ => Ok(()),
        }
    }
}

impl Policy {
    /// SHA-256 of the policy's canonical text (every rule, defaults written out, in a fixed order): equal
    /// policies, equal hashes, whatever the order or spelling of client.toml. It travels in the Hello, and
    /// the server records it in the audit log and the model card.
    pub fn hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let kinds: Vec<&str> = self.accept.iter().map(|k| k.name()).collect();
        let dp = match &self.dp_budget {
            None => "require_dp false\n".to_string(),
            Some(b) => format!(
                "require_dp true\nepsilon {:?}\nlifetime_epsilon {}\ndelta {:?}\n",
                b.epsilon,
                b.lifetime_epsilon
                    .map_or("none".to_string(), |e| format!("{e:?}")),
                b.delta
            ),
        };
        let mut text = format!(
            "fedslm-policy/2\naccept {}\nmax_bins {}\nmin_per_class {}\nmin_examples {}\n{dp}",
            kinds.join(","),
            self.max_bins.map_or("any".to_string(), |b| b.to_string()),
            self.min_per_class.unwrap_or(1),
            self.min_examples.unwrap_or(1)
        );
        // Written only when set, so that every earlier policy keeps its hash.
        if self.require_secure_aggregation {
            text.push_str("require_secure_aggregation true\n");
        }
        if !self.release_own_auc {
            text.push_str("release_own_auc false\n");
        }
        Sha256::digest(text.as_bytes()).into()
    }
}

impl fmt::Display for Policy {
    /// One line: what the site answers and within which limits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<&str> = self.accept.iter().map(|k| k.name()).collect();
        write!(
            f,
            "answers {}; at most {} histogram bins; at least {} patients per class in an evaluation; at least \
             {} patients behind an update",
            if kinds.is_empty() {
                "no task".to_string()
            } else {
                kinds.join(", ")
            },
            self.max_bins.map_or("any number of".to_string(), |b| b.to_string()),
            self.min_per_class.unwrap_or(1),
            self.min_examples.unwrap_or(1)
        )?;
        match &self.dp_budget {
            None => write!(f, "; differential privacy not required"),
            Some(b) => write!(
                f,
                "; every release differentially private, at most ε = {} per run{} (δ = {:e})",
                b.epsilon,
                b.lifetime_epsilon
                    .map_or(String::new(), |l| format!(" and ε = {l} over all runs")),
                b.delta
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_names_the_rules_not_their_spelling() {
        let default = Policy::default().hash();
        assert_eq!(policy("").hash(), default);
        assert_eq!(
            policy("min_per_class = 1\nmin_examples = 1").hash(),
            default,
            "defaults written out"
        );
        let a = policy("accept = [\"fit\", \"evaluate\"]\nmax_bins = 100").hash();
        let b = policy("max_bins = 100\naccept = [\"evaluate\", \"fit\"]").hash();
        assert_eq!(a, b);
        assert_ne!(a, default);
        assert_ne!(
            policy("max_bins = 101").hash(),
            policy("max_bins = 100").hash()
        );
        assert_ne!(policy("min_examples = 20").hash(), default);
        // Secure aggregation's keys: their defaults keep every earlier policy's hash; set, they change it.
        assert_eq!(
            policy("require_secure_aggregation = false\nrelease_own_auc = true").hash(),
            default
        );
        let secure = policy("require_secure_aggregation = true");
        assert!(secure.require_secure_aggregation && secure.release_own_auc);
        assert_ne!(secure.hash(), default);
        assert_ne!(policy("release_own_auc = false").hash(), default);
    }

    fn policy(toml_text: &str) -> Policy {
        toml::from_str::<PolicyFile>(toml_text)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn refused(toml_text: &str) -> String {
        Policy::try_from(toml::from_str::<PolicyFile>(toml_text).unwrap()).unwrap_err()
    }

    #[test]
    fn a_dp_policy_needs_its_budget_and_its_ledger() {
        assert!(refused("require_dp = true\nledger = \"l\"").contains("privacy.epsilon"));
        assert!(refused("require_dp = true\nepsilon = 8.0").contains("privacy.ledger"));
        assert!(refused("epsilon = 8.0").contains("require_dp"));
        assert!(
            refused("require_dp = true\nepsilon = -1.0\nledger = \"l\"").contains("epsilon = -1")
        );
        assert!(refused(
            "require_dp = true\nepsilon = 8.0\nlifetime_epsilon = 4.0\nledger = \"l\""
        )
        .contains("below"));
        let p = policy("require_dp = true\nepsilon = 8.0\nledger = \"l\"");
        assert_eq!(
            p.dp_budget,
            Some(Budget {
                epsilon: 8.0,
                lifetime_epsilon: None,
                delta: DEFAULT_DELTA
            })
        );
        let e = p.privacy(TaskKind::Fit, false).unwrap_err();
        assert!(e.to_string().contains("privacy.require_dp"), "{e}");
        assert!(p.privacy(TaskKind::Fit, true).is_ok());
        assert!(Policy::default().privacy(TaskKind::Fit, false).is_ok());
        // The budget is part of the policy's identity; the ledger's place is not.
        assert_ne!(p.hash(), Policy::default().hash());
        assert_eq!(
            p.hash(),
            policy("require_dp = true\nepsilon = 8.0\nledger = \"elsewhere\"").hash()
        );
        assert_ne!(
            p.hash(),
            policy("require_dp = true\nepsilon = 3.0\nledger = \"l\"").hash()
        );
    }

    #[test]
    fn the_default_answers_everything() {
        let p = policy("");
        for k in TaskKind::ALL {
            assert!(p.accepts(k).is_ok());
        }
        assert!(p.bins(1_000_000).is_ok() && p.classes(1, 1).is_ok() && p.examples(1).is_ok());
    }

    #[test]
    fn each_rule_refuses_by_its_key() {
        let p = policy(
            "accept = [\"fit\", \"evaluate\"]\nmax_bins = 20\nmin_per_class = 5\nmin_examples = 30",
        );
        let e = p.accepts(TaskKind::Placement).unwrap_err();
        assert!(e.to_string().contains("privacy.accept"), "{e}");
        assert!(p.accepts(TaskKind::Fit).is_ok());
        let e = p.bins(1000).unwrap_err();
        assert_eq!(
            e,
            PolicyRefusal::TooManyBins {
                asked: 1000,
                max: 20
            }
        );
        assert!(e.to_string().contains("privacy.max_bins"));
        assert!(p.bins(20).is_ok());
        assert!(p
            .classes(5, 4)
            .unwrap_err()
            .to_string()
            .contains("privacy.min_per_class"));
        assert!(p.classes(5, 5).is_ok());
        assert!(p
            .examples(29)
            .unwrap_err()
            .to_string()
            .contains("privacy.min_examples"));
    }

    #[test]
    fn an_unknown_kind_or_key_is_an_error() {
        assert!(toml::from_str::<PolicyFile>("accept = [\"everything\"]").is_err());
        assert!(toml::from_str::<PolicyFile>("max_bin = 3").is_err());
        assert!(toml::from_str::<PolicyFile>("epsilon = \"eight\"").is_err());
    }
}
