//! Initial global models (`fedslm model init`): the file a federation starts from, so that the server itself
//! never needs candle.

use std::path::Path;

use fedslm_model::{clinical, save, ModelCard, ModelKind, Network};
use serde_json::json;

use crate::{Context, NetSpec, StudyError};

/// Writes a fresh `model` to `out` (a combined network's head started at the `clinical` model file's
/// coefficients, if given); returns what it is.
pub fn initial_model(
    model: ModelKind,
    seed: u64,
    net: &NetSpec,
    clinical: Option<&Path>,
    out: &Path,
) -> Result<String, StudyError> {
    let (coding, preprocess) = net.settings()?;
    let mut training = json!({
        "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
        "mode": "init",
        "seed": seed,
    });
    if clinical.is_some() && model != ModelKind::Combined {
        return Err(StudyError::Refused(format!(
            "--clinical starts the combined network's head; it does not apply to the {model} model"
        )));
    }
    if !model.is_network() {
        let p = clinical::names().len();
        let card = ModelCard {
            training,
            ..ModelCard::new("clinical", coding, preprocess)
        };
        save(
            out,
            &clinical::to_weights(&vec![0.0; p], &vec![0.0; p * p])?,
            &card,
        )?;
        return Ok("clinical model".into());
    }
    let config = net.config(model, &preprocess)?;
    let network = Network::new(model, config, seed)?;
    // The clinical inputs are 0/1 indicators and stay unstandardised in federation (no centre's data is seen
    // before the first round); centralised, standardising them changed the AUC by < 0.01.
    if let Some(path) = clinical {
        let what = || format!("clinical model {}", path.display());
        let (weights, card) = fedslm_model::load(path).context(what)?;
        if card.model != ModelKind::Clinical.name() {
            return Err(StudyError::Refused(format!(
                "{}: a {} model, not a clinical one",
                path.display(),
                card.model
            )));
        }
        if card.coding != coding {
            return Err(StudyError::Refused(format!(
                "{}: fitted with another clinical coding ({:?}) than this network's ({:?})",
                path.display(),
                card.coding,
                coding
            )));
        }
        let beta = clinical::coefficients(&weights).context(what)?;
        network.start_head_from_clinical(&beta).context(what)?;
        training["head_from_clinical"] = json!({
            "file": path.display().to_string(),
            "coefficients": beta,
        });
    }
    let card = ModelCard {
        training,
        ..network.card(coding, preprocess)
    };
    save(out, &network.to_weights()?, &card)?;
    Ok(network.describe())
}
