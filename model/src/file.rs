//! Model files: safetensors with the tensors by name, and in the safetensors metadata a JSON model card under
//! `model_card` and each tensor's federation role under `tensor_roles`, so that one file carries all of it and
//! Python's `safetensors` reads it as any other.

use std::collections::HashMap;
use std::path::Path;

use fedslm_protocol::{DType, Tensor, TensorRole, Weights};
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The metadata key of the card.
pub const CARD_KEY: &str = "model_card";
/// The metadata key of the roles: a JSON object from tensor name to `parameter`, `batch_norm_parameter` or
/// `batch_norm_statistic`.
pub const ROLES_KEY: &str = "tensor_roles";
pub const FORMAT: &str = "fedslm-model/1";

/// What a model is and how it was made, for people and for the checks that stop a model from being applied to
/// data coded differently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub format: String,
    /// `clinical`, `mri` or `combined`.
    pub model: String,
    /// The clinical coding and preprocessing the model expects.
    pub coding: fedslm_cohort::ClinicalCoding,
    pub preprocess: fedslm_cohort::PreprocessSettings,
    /// Hex SHA-256 of `coding` and `preprocess` ([`fedslm_cohort::settings_hash`]).
    pub settings_hash: String,
    /// For the image networks: the architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetConfig>,
    /// For the combined network: the clinical vector's standardisation, from the training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardisation: Option<crate::Standardisation>,
    /// For the clinical model: the table a clinical paper gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clinical: Option<ClinicalTable>,
    /// Where the model came from: data, software, settings.
    #[serde(default)]
    pub training: serde_json::Value,
    /// Performance estimates (cross-validation, validation).
    #[serde(default)]
    pub metrics: serde_json::Value,
}

impl ModelCard {
    /// A card for `model` expecting `coding` and `preprocess`, with their hash; no table, provenance or metrics.
    pub fn new(
        model: &str,
        coding: fedslm_cohort::ClinicalCoding,
        preprocess: fedslm_cohort::PreprocessSettings,
    ) -> ModelCard {
        ModelCard {
            format: FORMAT.into(),
            model: model.into(),
            coding,
            preprocess,
            settings_hash: fedslm_protocol::hex::to_hex(&fedslm_cohort::settings_hash(
                &coding,
                &preprocess,
            )),
            network: None,
            standardisation: None,
            clinical: None,
            training: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClinicalTable {
    /// By name: intercept, male, site_low, site_high, cea_high, ca199_high.
    pub coefficients: serde_json::Map<String, serde_json::Value>,
    pub log_likelihood: f64,
    pub n: u64,
}

impl ClinicalTable {
    pub fn from_fit(fit: &fedslm_metrics::LogisticFit) -> ClinicalTable {
        let mut coefficients = serde_json::Map::new();
        for (i, name) in fit.names.iter().enumerate() {
            let (lo, hi) = fit.odds_ratio_ci95(i);
            coefficients.insert(
                name.clone(),
                serde_json::json!({
                    "estimate": fit.coefficients[i],
                    "std_error": fit.std_errors[i],
                    "z": fit.z[i],
                    "p": fit.p[i],
                    "odds_ratio": fit.odds_ratio(i),
                    "or_ci95": [lo, hi],
                }),
            );
        }
        ClinicalTable {
            coefficients,
            log_likelihood: fit.log_likelihood,
            n: fit.n,
        }
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

/// Writes `weights` and `card` to `path`, atomically and durably (`fedslm_files`). The bytes depend on the
/// model and the card only: see [`write_model`].
pub fn save(path: &Path, weights: &Weights, card: &ModelCard) -> Result<(), ModelError> {
    fedslm_files::write_atomic_with(path, fedslm_files::Access::Shared, |w| {
        write_model(w, weights, card)
    })
    .map_err(|source| ModelError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Streams a model file's bytes into `w`, with no second copy of a model of tens of megabytes in memory. The
/// header is written here in a fixed order (the safetensors crate writes its metadata map in hash order), so
/// that equal models have equal files and equal content hashes, which the server's checkpoints are named by.
pub fn write_model(
    w: &mut dyn std::io::Write,
    weights: &Weights,
    card: &ModelCard,
) -> std::io::Result<()> {
    fn json<T: Serialize + ?Sized>(v: &T) -> std::io::Result<String> {
        serde_json::to_string(v).map_err(std::io::Error::other)
    }
    // Widest dtype first, then by name: each tensor stays aligned to its element size, as safetensors does it.
    let mut tensors: Vec<&Tensor> = weights.tensors().iter().collect();
    tensors.sort_by(|a, b| {
        b.dtype()
            .size()
            .cmp(&a.dtype().size())
            .then(a.name().cmp(b.name()))
    });
    let roles: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .map(|t| (t.name().to_string(), role_name(t.role()).into()))
        .collect();
    let metadata: std::collections::BTreeMap<&str, String> = [
        (CARD_KEY, json(card)?),
        (ROLES_KEY, serde_json::Value::Object(roles).to_string()),
    ]
    .into();
    let mut header = format!("{{\"__metadata__\":{}", json(&metadata)?);
    let mut offset = 0usize;
    for t in &tensors {
        let n = t.bytes().len();
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            json(t.name())?,
            dtype_name(t.dtype()),
            json(t.shape())?,
            offset + n
        ));
        offset += n;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for t in &tensors {
        w.write_all(t.bytes())?;
    }
    Ok(())
}

/// Reads a model file back: its tensors (each with the role its name implies) and its card.
pub fn load(path: &Path) -> Result<(Weights, ModelCard), ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| ModelError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let card_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CARD_KEY))
        .ok_or_else(|| bad(format!("no {CARD_KEY} in its metadata")))?;
    let card: ModelCard =
        serde_json::from_str(card_json).map_err(|e| bad(format!("model card: {e}")))?;
    let roles: HashMap<String, String> =
        match metadata.metadata().as_ref().and_then(|m| m.get(ROLES_KEY)) {
            Some(json) => {
                serde_json::from_str(json).map_err(|e| bad(format!("{ROLES_KEY}: {e}")))?
            }
            None => HashMap::new(),
        };
    if card.format != FORMAT {
        return Err(bad(format!(
            "format {:?}, this fedslm reads {FORMAT:?}",
            card.format
        )));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
        let d = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(bad(format!("tensor {name} has dtype {other:?}"))),
        };
        tensors.push(Tensor::from_raw(
            name.as_str(),
            view.shape().to_vec(),
            d,
            match roles.get(&name).map(String::as_str) {
                None | Some("parameter") => TensorRole::Parameter,
                Some("batch_norm_parameter") => TensorRole::BatchNormParameter,
                Some("batch_norm_statistic") => TensorRole::BatchNormStatistic,
                Some(other) => {
                    return Err(bad(format!("tensor {name} has an unknown role {other:?}")))
                }
            },
            view.data().to_vec().into(),
        )?);
    }
    Ok((Weights::from_tensors(tensors)?, card))
}

fn role_name(role: TensorRole) -> &'static str {
    match role {
        TensorRole::Parameter => "parameter",
        TensorRole::BatchNormParameter => "batch_norm_parameter",
        TensorRole::BatchNormStatistic => "batch_norm_statistic",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_file_round_trips_bit_exactly_with_roles_and_card() {
        let tmp = tempfile::tempdir().unwrap();
        let w = Weights::from_tensors(vec![
            Tensor::from_f32(
                "layer1.bn.running_var",
                vec![3],
                TensorRole::BatchNormStatistic,
                &[1.0, f32::MIN_POSITIVE, 3.5],
            )
            .unwrap(),
            Tensor::from_f32(
                "layer1.bn.weight",
                vec![3],
                TensorRole::BatchNormParameter,
                &[0.1, 0.2, 0.3],
            )
            .unwrap(),
            Tensor::from_f64(
                "clinical.coefficients",
                vec![2],
                TensorRole::Parameter,
                &[1.0 / 3.0, -2.0],
            )
            .unwrap(),
            Tensor::from_f32_as(
                "head.weight",
                vec![2, 2],
                TensorRole::Parameter,
                &[1.0, 2.0, 3.0, 4.0],
                DType::BF16,
            )
            .unwrap(),
        ])
        .unwrap();
        let card = ModelCard {
            format: FORMAT.into(),
            model: "clinical".into(),
            coding: Default::default(),
            preprocess: Default::default(),
            settings_hash: "ab".into(),
            network: None,
            standardisation: None,
            clinical: None,
            training: serde_json::json!({"patients": 3}),
            metrics: serde_json::Value::Null,
        };
        let path = tmp.path().join("m.safetensors");
        save(&path, &w, &card).unwrap();
        let (back, card_back) = load(&path).unwrap();
        assert_eq!(card_back, card);
        assert_eq!(back.len(), 4);
        for t in w.tensors() {
            let b = back.require(t.name()).unwrap();
            assert_eq!(
                (b.bytes(), b.shape(), b.dtype(), b.role()),
                (t.bytes(), t.shape(), t.dtype(), t.role()),
                "{}",
                t.name()
            );
        }
        let names: Vec<&str> = back.tensors().iter().map(|t| t.name()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        // Equal models, equal bytes (the server names checkpoints by their hash), whatever the tensors' order.
        let reversed = Weights::from_tensors(w.tensors().iter().rev().cloned().collect()).unwrap();
        let again = tmp.path().join("again.safetensors");
        save(&again, &reversed, &card).unwrap();
        assert_eq!(
            std::fs::read(&again).unwrap(),
            std::fs::read(&path).unwrap()
        );
        std::fs::write(&path, b"not a model").unwrap();
        assert!(load(&path)
            .unwrap_err()
            .to_string()
            .contains("is not a fedslm model file"));
    }
}
