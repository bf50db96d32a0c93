//! The intensity scale of a deployment (Nyúl-Udupa standardisation, `strategy = "landmarks"`): the initial
//! model a landmarks run starts from, and the scale read back from its final model, as client.toml takes it.

use std::path::{Path, PathBuf};

use fedslm_cohort::IntensityScale;
use fedslm_model::{save, ModelCard};
use fedslm_protocol::landmarks::{landmark_weights, landmarks_of};
use fedslm_protocol::Weights;
use serde_json::json;

use crate::{Context, NetSpec, StudyError};

/// Writes the initial model of a landmarks run to `out`: the 3 x 11 `intensity.landmarks` tensor of zeros,
/// its card naming the crops `net` makes (an MRI network's, whose images the landmarks are of).
pub fn initial_landmarks(net: &NetSpec, out: &Path) -> Result<(), StudyError> {
    let (coding, preprocess) = net.settings()?;
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
    save(out, &zeros, &card).context(|| out.display().to_string())
}

/// The scale a landmarks run agreed: its final model's tensor, refused by name unless each sequence runs
/// from 0 to 1, strictly increasing.
pub fn agreed_scale(weights: &Weights) -> Result<IntensityScale, StudyError> {
    let [t2w, dwi, adc] = landmarks_of(weights)
        .map_err(|e| StudyError::Refused(format!("not a landmarks run's model: {e}")))?;
    let scale = IntensityScale { t2w, dwi, adc };
    scale
        .check()
        .map_err(|e| StudyError::Refused(format!("the agreed scale: {e}")))?;
    Ok(scale)
}

/// The scale as client.toml's `[preprocess.intensity_scale]` table, every number exact.
pub fn client_toml(scale: &IntensityScale) -> String {
    let mut toml = String::from("[preprocess.intensity_scale]\n");
    for (name, l) in IntensityScale::SEQUENCES.iter().zip(scale.sequences()) {
        let values: Vec<String> = l.iter().map(|v| format!("{v:?}")).collect();
        toml.push_str(&format!("{name} = [{}]\n", values.join(", ")));
    }
    toml
}

/// The file a landmarks run's output folder gets beside its final model: the agreed scale as client.toml
/// takes it.
pub const CLIENT_TOML: &str = "intensity_scale.toml";

/// Writes the scale a landmarks run agreed (its final `weights`) into `out`/[`CLIENT_TOML`]; returns the
/// file and its text.
pub fn write_agreed_scale(out: &Path, weights: &Weights) -> Result<(PathBuf, String), StudyError> {
    let toml = client_toml(&agreed_scale(weights)?);
    let file = out.join(CLIENT_TOML);
    crate::error::write_file(&file, toml.as_bytes())?;
    Ok((file, toml))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agreed_scale_reads_back_exactly_as_client_toml_and_a_falling_one_is_refused() {
        let mut l = [[0.0; 11]; 3];
        for (s, row) in l.iter_mut().enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = (i as f64 / 10.0).powf(0.7 + 0.3 * s as f64);
            }
        }
        let scale = agreed_scale(&landmark_weights(&l).unwrap()).unwrap();
        assert_eq!(scale.sequences(), [&l[0], &l[1], &l[2]]);
        #[derive(serde::Deserialize)]
        struct Client {
            preprocess: Preprocess,
        }
        #[derive(serde::Deserialize)]
        struct Preprocess {
            intensity_scale: IntensityScale,
        }
        let read: Client = toml::from_str(&client_toml(&scale)).unwrap();
        assert_eq!(read.preprocess.intensity_scale, scale, "to the bit");
        l[2][4] = 0.9;
        let e = agreed_scale(&landmark_weights(&l).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("intensity_scale.adc"), "{e}");
        let zeros = agreed_scale(&landmark_weights(&[[0.0; 11]; 3]).unwrap()).unwrap_err();
        assert!(zeros.to_string().contains("t2w"), "{zeros}");
    }
}
