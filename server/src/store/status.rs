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

pub(super) fn run_status(meta: &RunMeta, rounds: &[StoredRound], head: Head) -> RunStatus {
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
            examples: r.contributions.iter().map(|c| c.examples).sum(),
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
