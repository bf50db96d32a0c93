//! `--shift standardise`: the consortium's intensity scale agreed before any model is trained. One landmarks
//! round (server strategy `landmarks`): each training centre sends its images' mean Nyúl-Udupa landmarks
//! (3 x 11 numbers), the server averages them by images; no voxel and no label leaves a site.

use fedslm_cohort::IntensityScale;
use fedslm_server::config::StrategyName;
use fedslm_server::Outcome;

use super::federation::{drive, Driven};
use super::{configs, Simulation, StudyEvent};
use crate::StudyError;

/// The run id of the landmarks round (its audit log and store).
pub const RUN_ID: &str = "simulate-landmarks";

/// Runs the landmarks round among the simulation's centres (its nodes loaded without a scale) and returns
/// the scale it agreed, checked as client.toml checks one; the round's store and audit log stay in
/// `runs/landmarks`.
pub fn agree_scale(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
) -> Result<IntensityScale, StudyError> {
    let s = &ctx.settings;
    let dir = ctx.out.join("runs").join("landmarks");
    crate::error::create_dir(&dir)?;
    // The round starts from zeros of the landmarks' shape.
    let init = dir.join("init.safetensors");
    crate::scale::initial_landmarks(&ctx.net(), &init)?;
    let config = configs::server_config(&ctx.pki, RUN_ID, &dir, &ctx.centers, |t| {
        t.initial_model = Some(init.clone());
        t.strategy = Some(StrategyName::Landmarks);
        t.rounds = 1;
        t.round_start_grace_secs = 30;
        t.seed = s.training_seed();
        t.secure_aggregation = s.secure_aggregation;
    })?;
    let label = "intensity landmarks";
    let Driven { outcome, .. } = drive(ctx, runtime, config, &init, label, 1)?;
    let weights = match outcome {
        Some(Outcome::Completed { weights, .. }) => weights,
        Some(Outcome::Failed { rounds, reason }) => {
            return Err(StudyError::Failed(format!(
                "{label}: the round failed after {rounds} rounds: {reason}"
            )))
        }
        None => return Err(StudyError::Failed(format!("{label}: the round stopped"))),
    };
    let scale = crate::scale::agreed_scale(&weights)
        .map_err(|e| StudyError::Failed(format!("{label}: {e}")))?;
    (ctx.observer)(StudyEvent::Milestone(format!(
        "{label}: the scale agreed (the median at {:.3} of the range in T2W, {:.3} in DWI, {:.3} in ADC)",
        scale.t2w[5], scale.dwi[5], scale.adc[5]
    )));
    Ok(scale)
}
