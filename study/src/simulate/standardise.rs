//! `--shift standardise`: the consortium's intensity scale agreed before any model is trained. One landmarks
//! round (server strategy `landmarks`): each training centre sends its images' mean Nyúl-Udupa landmarks
//! (3 x 11 numbers), the server averages them by images; no voxel and no label leaves a site.

use fedslm_cohort::IntensityScale;
use fedslm_model::{save, ModelCard};
use fedslm_protocol::landmarks::{landmark_weights, landmarks_of};
use fedslm_server::config::StrategyName;
use fedslm_server::Outcome;
use serde_json::json;

use super::federation::{drive, Driven};
use super::{configs, Simulation, StudyEvent};
use crate::{Context, StudyError};

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
    // The round starts from zeros of the landmarks' shape; the card's model says which crops they are of.
    let init = dir.join("init.safetensors");
    let (coding, preprocess) = ctx.net().settings()?;
    let card = ModelCard {
        training: json!({
            "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
            "mode": "init",
            "objective": "intensity landmarks",
        }),
        ..ModelCard::new("mri", coding, preprocess)
    };
    let zeros = landmark_weights(&[[0.0; 11]; 3])
        .map_err(|e| StudyError::Failed(format!("the landmarks' initial tensor: {e}")))?;
    save(&init, &zeros, &card).context(|| init.display().to_string())?;
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
    let [t2w, dwi, adc] = landmarks_of(&weights)
        .map_err(|e| StudyError::Failed(format!("{label}: the agreed landmarks: {e}")))?;
    let scale = IntensityScale { t2w, dwi, adc };
    scale
        .check()
        .map_err(|e| StudyError::Failed(format!("{label}: the agreed scale: {e}")))?;
    (ctx.observer)(StudyEvent::Milestone(format!(
        "{label}: the scale agreed (the median at {:.3} of the range in T2W, {:.3} in DWI, {:.3} in ADC)",
        scale.t2w[5], scale.dwi[5], scale.adc[5]
    )));
    Ok(scale)
}
