//! `status.json` and `fedslm server status`: where a run stands, derived from the store after each commit.

use serde::{Deserialize, Serialize};

use super::{now_ms, RunMeta, StoredContribution, StoredRound};
use crate::audit::Head;

/// `status.json` and `fedslm server status --json`: where the run stands, read by people and tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run_id: String,
    pub state: String,
    pub reason: Option<String>,
    pub software: String,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub resumes: u32,
    pub rounds_planned: u32,
    pub rounds_committed: u32,
    pub centers: Vec<CenterStatus>,
    pub last_round: Option<LastRound>,
    pub final_checkpoint: Option<String>,
    pub audit: AuditStatus,
    /// The server process that wrote `status.json` (absent when read from the store directly).
    #[serde(default)]
    pub server_pid: Option<u32>,
}

/// One enrolled centre in [`RunStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CenterStatus {
    pub center: String,
    pub role: String,
    pub rounds_contributed: usize,
    pub last_round: Option<u32>,
    pub last_examples: Option<u64>,
    pub last_train_loss: Option<f64>,
    /// The transport of its last admission (`quic` or `tcp`), from the audit log.
    #[serde(default)]
    pub transport: Option<String>,
}

/// The last committed round in [`RunStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRound {
    pub round: u32,
    pub checkpoint: String,
    /// The example-weighted training loss; absent where no centre contributed.
    pub train_loss: Option<f64>,
    pub examples: u64,
    pub centers: usize,
    pub silent: Vec<String>,
    pub refused: usize,
    pub seconds: f64,
    pub log_likelihood: Option<f64>,
}

/// The audit log's length and head in [`RunStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    pub entries: u64,
    pub head: String,
}

/// `joins`: each centre's last admission.
pub(super) fn run_status(
    meta: &RunMeta,
    rounds: &[StoredRound],
    head: Head,
    joins: &std::collections::BTreeMap<String, super::LastJoin>,
) -> RunStatus {
    let mut centers = Vec::new();
    for (key, role) in &meta.fingerprint {
        let Some(center) = key.strip_prefix("center.") else {
            continue;
        };
        let mine: Vec<(u32, &StoredContribution)> = rounds
            .iter()
            .flat_map(|r| {
                r.contributions
                    .iter()
                    .filter(|c| c.center == center)
                    .map(move |c| (r.round, c))
            })
            .collect();
        let last = mine.last();
        centers.push(CenterStatus {
            center: center.to_string(),
            role: role.clone(),
            rounds_contributed: mine.len(),
            last_round: last.map(|(r, _)| *r),
            last_examples: last.map(|(_, c)| c.examples),
            last_train_loss: last.map(|(_, c)| c.train_loss),
            transport: joins.get(center).map(|j| j.transport.clone()),
        });
    }
    let last = rounds.last();
    RunStatus {
        run_id: meta.run_id.clone(),
        state: meta.state.name().to_string(),
        reason: meta.reason.clone(),
        software: meta.software.clone(),
        started_unix_ms: meta.started_unix_ms,
        updated_unix_ms: now_ms(),
        resumes: meta.resumes,
        rounds_planned: meta.rounds_planned,
        rounds_committed: last.map_or(0, |r| r.round),
        centers,
        last_round: last.map(|r| LastRound {
            round: r.round,
            checkpoint: r.checkpoint.clone(),
            train_loss: Some(r.train_loss()).filter(|l| l.is_finite()),
            examples: r.examples(),
            centers: r.contributions.len(),
            silent: r.silent.clone(),
            refused: r.refused.len(),
            seconds: r.seconds,
            log_likelihood: r.log_likelihood,
        }),
        final_checkpoint: meta.final_checkpoint.clone(),
        audit: AuditStatus {
            entries: head.entries,
            head: head.hex(),
        },
        server_pid: None,
    }
}

/// What `fedslm client --status` gets ([`fedslm_protocol::StatusReport`]): the run's progress and `center`'s own
/// part in its latest rounds; of the last evaluation, a side's pooled AUC only where it pools two or more
/// centres or `center` alone, so that no other single centre's figure is told.
pub fn center_status(
    meta: Option<&RunMeta>,
    rounds: &[StoredRound],
    center: &str,
) -> fedslm_protocol::StatusReport {
    use fedslm_protocol::{RoundOutcome, RoundPart, StatusEvaluation, MAX_STATUS_ROUNDS};
    let latest = &rounds[rounds.len().saturating_sub(MAX_STATUS_ROUNDS)..];
    let parts = latest
        .iter()
        .map(|r| {
            let mut part = RoundPart {
                round: r.round,
                outcome: RoundOutcome::NotAsked,
                examples: 0,
                train_loss: 0.0,
                reason: String::new(),
            };
            if let Some(c) = r.contributions.iter().find(|c| c.center == center) {
                part.outcome = RoundOutcome::Contributed;
                part.examples = c.examples;
                part.train_loss = c.train_loss;
            } else if let Some(refusal) = r.refused.iter().find(|f| f.center == center) {
                part.outcome = RoundOutcome::Refused;
                part.reason = refusal.reason.clone();
            } else if r.silent.iter().any(|s| s == center) {
                part.outcome = RoundOutcome::Silent;
            }
            part
        })
        .collect();
    let evaluation = rounds.iter().rev().find_map(|r| {
        let e = r.evaluation.as_ref()?;
        // A side's pooled AUC, where it does not stand for one other centre alone.
        let side = |role: &str, auc: Option<f64>| {
            let on_side: Vec<&str> = e
                .centers
                .iter()
                .filter(|c| c.role == role)
                .map(|c| c.center.as_str())
                .collect();
            let told = on_side.len() >= 2 || on_side == [center];
            auc.filter(|_| told)
        };
        Some(StatusEvaluation {
            round: e.round,
            internal_auc: side("train", e.internal.as_ref().and_then(|a| a.auc)),
            external_auc: side("validate", e.external.as_ref().and_then(|a| a.auc)),
        })
    });
    fedslm_protocol::StatusReport {
        run_id: meta.map(|m| m.run_id.clone()).unwrap_or_default(),
        state: meta.map_or("waiting", |m| m.state.name()).to_string(),
        rounds_planned: meta.map_or(0, |m| m.rounds_planned),
        rounds_committed: rounds.last().map_or(0, |r| r.round),
        rounds: parts,
        evaluation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_protocol::RoundOutcome;
    use serde_json::json;

    /// A stored round with a, b training (a contributed, b refused), x silent, and an evaluation with the
    /// training centres and `validators` validating.
    fn round(n: u32, validators: &[&str]) -> StoredRound {
        let auc = |v: f64| json!({"auc": v, "ci95": [v - 0.1, v + 0.1], "n": {"positives": 3, "negatives": 5}});
        let center = |c: &str, role: &str| {
            json!({"center": c, "role": role, "examples": 8, "positives": 3, "loss": 0.5, "auc": auc(0.7),
                   "histogram": {"positive": [1], "negative": [1]}})
        };
        let mut centers = vec![center("a", "train"), center("b", "train")];
        centers.extend(validators.iter().map(|v| center(v, "validate")));
        serde_json::from_value(json!({
            "round": n, "checkpoint": "00", "retries": 0,
            "contributions": [{"center": "a", "examples": 8, "train_loss": 0.25}],
            "refused": [{"center": "b", "reason": "beyond the bound"}],
            "silent": ["x"], "seconds": 1.0, "log_likelihood": null, "committed_unix_ms": 0,
            "evaluation": {"round": n, "fold": null, "bins": 10, "internal": auc(0.8), "external": auc(0.6),
                           "centers": centers, "missing": []}
        }))
        .unwrap()
    }

    #[test]
    fn a_center_is_told_its_own_part_and_no_other_single_centres_figure() {
        let rounds = [round(1, &["v"]), round(2, &["v"])];
        let a = center_status(None, &rounds, "a");
        assert_eq!(a.rounds_committed, 2);
        assert_eq!(a.rounds[1].outcome, RoundOutcome::Contributed);
        assert_eq!((a.rounds[1].examples, a.rounds[1].train_loss), (8, 0.25));
        let b = center_status(None, &rounds, "b");
        assert_eq!(b.rounds[0].outcome, RoundOutcome::Refused);
        assert_eq!(b.rounds[0].reason, "beyond the bound");
        assert_eq!(
            center_status(None, &rounds, "x").rounds[0].outcome,
            RoundOutcome::Silent
        );
        // One validation centre: its AUC is its own; a training centre is told the pooled internal AUC of
        // the two training centres, not the validator's.
        let e = a.evaluation.unwrap();
        assert_eq!(
            (e.round, e.internal_auc, e.external_auc),
            (2, Some(0.8), None)
        );
        let v = center_status(None, &rounds, "v").evaluation.unwrap();
        assert_eq!((v.internal_auc, v.external_auc), (Some(0.8), Some(0.6)));
        // Two validation centres pool: told to everyone.
        let pooled = center_status(None, &[round(1, &["v", "w"])], "a")
            .evaluation
            .unwrap();
        assert_eq!(pooled.external_auc, Some(0.6));
    }
}
