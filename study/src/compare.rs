//! A paired DeLong test of two models in a real deployment (`fedslm server compare`): their runs' stored
//! evaluations pooled per model, then the second pass to the centres that evaluated both, each placing the
//! scores it kept on its own disk.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedslm_metrics::{Comparison, ScoreHistograms};
use fedslm_protocol::{CenterId, ModelKind, PlacementTask, Role};
use fedslm_server::evaluation::paired_comparison;
use fedslm_server::{Server, ServerConfig, Store};
use serde::Serialize;

use crate::{Context, StudyError};

/// One model's side of a comparison, from its runs' stores.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSide {
    pub runs: Vec<String>,
    pub pooled: ScoreHistograms,
    pub centers: BTreeSet<CenterId>,
}

/// The stored evaluations of the runs in `dirs` by the centres with `role`, pooled; `model` names the side in
/// errors.
pub fn stored_side(dirs: &[PathBuf], role: Role, model: &str) -> Result<StoredSide, StudyError> {
    let mut runs = Vec::new();
    let mut pooled: Option<ScoreHistograms> = None;
    let mut centers = BTreeSet::new();
    for dir in dirs {
        let at = || format!("model {model}: {}", dir.display());
        let store = Store::open_existing(dir).context(at)?;
        let meta = store
            .meta()
            .context(at)?
            .ok_or_else(|| StudyError::Refused(format!("{}: no run recorded", at())))?;
        let record = store
            .rounds()
            .context(at)?
            .into_iter()
            .rev()
            .find_map(|r| r.evaluation)
            .ok_or_else(|| {
                StudyError::Refused(format!(
                    "{}: run {} has no stored evaluation",
                    at(),
                    meta.run_id
                ))
            })?;
        let mut hs: Vec<(Vec<CenterId>, ScoreHistograms)> = record
            .histograms(role)
            .map_err(|e| StudyError::Refused(format!("{}: {e}", at())))?
            .into_iter()
            .map(|(c, h)| (vec![c], h))
            .collect();
        // Under secure aggregation: the side's sum, and the centres in it.
        hs.extend(
            record
                .secure_sums(role)
                .map_err(|e| StudyError::Refused(format!("{}: {e}", at())))?,
        );
        if hs.is_empty() {
            return Err(StudyError::Refused(format!(
                "{}: no {role} centre evaluated run {}",
                at(),
                meta.run_id
            )));
        }
        for (cs, h) in hs {
            centers.extend(cs);
            match &mut pooled {
                Some(p) => p.merge(&h).context(at)?,
                None => pooled = Some(h),
            }
        }
        runs.push(meta.run_id);
    }
    let pooled =
        pooled.ok_or_else(|| StudyError::Refused(format!("model {model}: no run named")))?;
    Ok(StoredSide {
        runs,
        pooled,
        centers,
    })
}

/// What `server compare --json` writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonRecord {
    pub side: String,
    pub a_runs: Vec<String>,
    pub b_runs: Vec<String>,
    pub centers: Vec<String>,
    pub auc_a: f64,
    pub auc_b: f64,
    pub z: f64,
    pub p: f64,
}

/// Compares the runs in `a` with those in `b` on `role`'s side through the second pass, with the server of
/// `config` (read from `config_path`); `listening` is told where it listens and to whom it will send.
pub fn compare_stored(
    config: ServerConfig,
    config_path: &Path,
    a: &[PathBuf],
    b: &[PathBuf],
    role: Role,
    listening: impl FnOnce(SocketAddr, &StoredSide, &StoredSide),
) -> Result<(Comparison, ComparisonRecord), StudyError> {
    let sa = stored_side(a, role, "A")?;
    let sb = stored_side(b, role, "B")?;
    if sa.centers != sb.centers {
        return Err(StudyError::Refused(format!(
            "model A was evaluated at {:?} and model B at {:?}: a paired test needs the same patients",
            sa.centers, sb.centers
        )));
    }
    if sa.pooled.bins() != sb.pooled.bins() {
        return Err(StudyError::Refused(format!(
            "model A's histograms have {} bins, model B's {}",
            sa.pooled.bins(),
            sb.pooled.bins()
        )));
    }
    if let Some(c) = sa
        .centers
        .iter()
        .find(|c| !config.enrolment.centers.contains_key(*c))
    {
        return Err(StudyError::Refused(format!(
            "{c} evaluated the runs but is not enrolled in {}",
            config_path.display()
        )));
    }
    let centers: Vec<CenterId> = sa.centers.iter().cloned().collect();
    let tasks: Vec<(CenterId, PlacementTask)> = centers
        .iter()
        .map(|c| {
            let task = PlacementTask::new(sa.runs.clone(), sb.runs.clone(), &sa.pooled, &sb.pooled);
            (c.clone(), task)
        })
        .collect();
    // Placement sums from kept scores take a centre a moment, as federated Newton's statistics do.
    let deadline = config
        .run
        .deadline
        .unwrap_or_else(|| fedslm_server::config::default_deadline(ModelKind::Clinical));
    let runtime = crate::error::runtime()?;
    let answers = runtime.block_on(async {
        let server = Server::bind(config)?;
        listening(server.local_addr()?, &sa, &sb);
        Ok::<_, StudyError>(server.run_placements(tasks, deadline).await?)
    })?;
    let mut reports = Vec::new();
    for (c, answer) in centers.iter().zip(answers) {
        let r = answer.map_err(|e| StudyError::Failed(format!("no paired comparison: {e}")))?;
        // Under secure aggregation one centre's answer is the sum of all of theirs; the others' are `None`.
        if let Some(r) = r {
            reports.push((c.clone(), r));
        }
    }
    let c = paired_comparison(&sa.pooled, &sb.pooled, &reports)
        .map_err(|e| StudyError::Failed(format!("no paired comparison: {e}")))?;
    let record = ComparisonRecord {
        side: match role {
            Role::Train => "internal".into(),
            Role::Validate => "external".into(),
        },
        a_runs: sa.runs,
        b_runs: sb.runs,
        centers: centers.iter().map(|c| c.to_string()).collect(),
        auc_a: c.auc_a,
        auc_b: c.auc_b,
        z: c.z,
        p: c.p,
    };
    Ok((c, record))
}
