//! Scoring a site's patients with a model file, refused where the site's coding and preprocessing differ from
//! the model's.

use std::path::Path;

use fedslm_cohort::{load_center, settings_hash, ClinicalCoding, Manifest, PreprocessSettings};
use fedslm_model::{clinical, load, ModelKind, Network};
use fedslm_protocol::hex::to_hex;

use crate::{Context, StudyError};

/// Every patient of the manifest at `manifest_path` scored by the model file at `model`, in manifest order.
pub fn probabilities(
    model: &Path,
    manifest_path: &Path,
    coding: &ClinicalCoding,
    preprocess: &PreprocessSettings,
    cache: Option<&Path>,
) -> Result<(Manifest, Vec<f64>), StudyError> {
    let (weights, card) = load(model)?;
    let here = to_hex(&settings_hash(coding, preprocess));
    if here != card.settings_hash {
        return Err(StudyError::Refused(format!(
            "this site's settings hash {here} differs from the model's {}: the model was trained with coding {:?} \
             and preprocessing {:?}",
            card.settings_hash, card.coding, card.preprocess
        )));
    }
    let manifest = Manifest::read(manifest_path, coding)?;
    let kind = card.model.parse::<ModelKind>().map_err(|_| {
        StudyError::Refused(format!(
            "{}: a {} model is not one this fedslm knows",
            model.display(),
            card.model
        ))
    })?;
    let probabilities: Vec<f64> = if kind.is_network() {
        let (network, _) = Network::load(model)?;
        let site = manifest_path
            .parent()
            .and_then(|d| d.file_name())
            .map_or_else(|| "site".into(), |n| n.to_string_lossy().into_owned());
        let (samples, _) = load_center(&manifest, &site, coding, preprocess, cache)?;
        network.predict(&samples.iter().collect::<Vec<_>>())?
    } else {
        let coefficients =
            clinical::coefficients(&weights).context(|| format!("{}", model.display()))?;
        manifest
            .patients
            .iter()
            .map(|p| clinical::predict(coding, &coefficients, p))
            .collect()
    };
    Ok((manifest, probabilities))
}
