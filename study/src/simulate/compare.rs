//! Paired DeLong tests of each model against the combined network, internally (the folds' pooled
//! out-of-fold scores) and externally, through the second pass: one more server, to which every node
//! connects; each centre places its patients' two kept scores in the pooled histograms the server sends and
//! returns only sums.

use std::sync::Arc;
use std::time::Duration;

use fedslm_metrics::ScoreHistograms;
use fedslm_model::ModelKind;
use fedslm_protocol::{CenterId, PlacementTask, Role};
use fedslm_server::evaluation::paired_comparison;
use fedslm_server::Server;

use super::federation::{join_nodes, run_id, start_nodes};
use super::results::{ComparisonOutcome, ComparisonResult};
use super::{configs, ModelRun, Simulation, StudyEvent};
use crate::StudyError;

/// How long the second pass waits for every centre's answers.
const PLACEMENTS_DEADLINE: Duration = Duration::from_secs(600);

/// One test to make: model `a` against the combined network on one side.
struct Plan<'a> {
    a: ModelKind,
    side: &'static str,
    pooled_a: &'a ScoreHistograms,
    pooled_b: &'a ScoreHistograms,
    centers: Vec<CenterId>,
    a_runs: Vec<String>,
    b_runs: Vec<String>,
}

/// The tests to make: every model against combined, on each side both have histograms for.
fn plans<'a>(
    centers: &[(String, Role)],
    folds: u32,
    per_model: &'a [(ModelKind, ModelRun)],
) -> Result<Vec<Plan<'a>>, StudyError> {
    let b_model = ModelKind::Combined;
    let Some((_, b)) = per_model.iter().find(|(m, _)| *m == b_model) else {
        return Ok(Vec::new());
    };
    let fold_ids: Vec<Option<u32>> = (0..folds).map(Some).collect();
    let runs = |m: ModelKind, fs: &[Option<u32>]| -> Vec<String> {
        fs.iter().map(|f| run_id(m, *f)).collect()
    };
    let mut plans = Vec::new();
    for (a_model, a) in per_model.iter().filter(|(m, _)| *m != b_model) {
        let sides = [
            (
                "internal",
                &a.internal,
                &b.internal,
                Role::Train,
                fold_ids.clone(),
            ),
            (
                "external",
                &a.external,
                &b.external,
                Role::Validate,
                vec![None],
            ),
        ];
        for (side, ha, hb, role, fs) in sides {
            let (Some(pooled_a), Some(pooled_b)) = (ha, hb) else {
                continue;
            };
            let centers = centers
                .iter()
                .filter(|(_, r)| *r == role)
                .map(|(c, _)| {
                    CenterId::new(c.as_str())
                        .map_err(|e| StudyError::Refused(format!("centre {c:?}: {e}")))
                })
                .collect::<Result<_, _>>()?;
            plans.push(Plan {
                a: *a_model,
                side,
                pooled_a,
                pooled_b,
                centers,
                a_runs: runs(*a_model, &fs),
                b_runs: runs(b_model, &fs),
            });
        }
    }
    Ok(plans)
}

/// Every model compared with the combined network, where both were evaluated on the same side.
pub fn compare(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    per_model: &[(ModelKind, ModelRun)],
) -> Result<Vec<ComparisonResult>, StudyError> {
    let plans = plans(&ctx.centers, ctx.settings.folds, per_model)?;
    if plans.is_empty() {
        return Ok(Vec::new());
    }
    let mut tasks = Vec::new();
    for p in &plans {
        for c in &p.centers {
            tasks.push((
                c.clone(),
                PlacementTask::new(p.a_runs.clone(), p.b_runs.clone(), p.pooled_a, p.pooled_b),
            ));
        }
    }
    let dir = ctx.out.join("runs").join("comparisons");
    crate::error::create_dir(&dir)?;
    let config =
        configs::server_config(&ctx.pki, "simulate-comparisons", &dir, &ctx.centers, |t| {
            t.rounds = 1;
            t.secure_aggregation = ctx.settings.secure_aggregation;
        })?;
    let mut answers = runtime
        .block_on(async {
            let server = Arc::new(Server::bind(config)?);
            let clients = start_nodes(ctx, server.local_addr()?)?;
            let answers = server.run_placements(tasks, PLACEMENTS_DEADLINE).await?;
            join_nodes(clients).await;
            Ok::<_, StudyError>(answers)
        })?
        .into_iter();
    let mut out = Vec::new();
    for p in &plans {
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        for c in &p.centers {
            match answers.next() {
                // Under secure aggregation one centre's answer is the side's sum, the others' `None`.
                Some(Ok(Some(r))) => reports.push((c.clone(), r)),
                Some(Ok(None)) => {}
                Some(Err(e)) => failed.push(e.to_string()),
                None => failed.push(format!("{c}: no answer")),
            }
        }
        let result = if failed.is_empty() {
            paired_comparison(p.pooled_a, p.pooled_b, &reports).map_err(|e| e.to_string())
        } else {
            Err(failed.join("; "))
        };
        let what = format!("{} vs combined, {}", p.a, p.side);
        let outcome = match result {
            Ok(c) => {
                (ctx.observer)(StudyEvent::Milestone(format!(
                    "paired DeLong, {what}: AUC {:.3} vs {:.3}, z = {:.2}, p = {:.4}",
                    c.auc_a, c.auc_b, c.z, c.p
                )));
                ComparisonOutcome::Tested {
                    auc_a: c.auc_a,
                    auc_b: c.auc_b,
                    z: c.z,
                    p: c.p,
                }
            }
            Err(e) => {
                (ctx.observer)(StudyEvent::Milestone(format!(
                    "paired DeLong, {what}: not computed: {e}"
                )));
                ComparisonOutcome::NotComputed { error: e }
            }
        };
        out.push(ComparisonResult {
            a: p.a.name().into(),
            b: ModelKind::Combined.name().into(),
            side: p.side.into(),
            outcome,
        });
    }
    Ok(out)
}
