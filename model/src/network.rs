//! An image network with its state: the candle variables, the clinical standardisation that travels with it,
//! seeded initialisation, and the bridge to and from `protocol::Weights`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use fedslm_cohort::{Rng, Sample};
use fedslm_protocol::{ModelKind, TensorRole, Weights};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::net::{NetConfig, ResNet};

/// Mean and scale of each coded clinical factor over the training data (DESIGN.md §5: never the validation
/// folds or the external centre). The combined network sees `(x - mean) / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardisation {
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
}

impl Standardisation {
    pub fn identity(features: usize) -> Standardisation {
        Standardisation {
            mean: vec![0.0; features],
            scale: vec![1.0; features],
        }
    }

    /// From per-feature sums over patients: `n`, sum of x, sum of x² (so that centres can add theirs up).
    pub fn from_sums(n: f64, sum: &[f64], sum_sq: &[f64]) -> Standardisation {
        let mean: Vec<f64> = sum.iter().map(|s| s / n.max(1.0)).collect();
        let scale = sum_sq
            .iter()
            .zip(&mean)
            .map(|(s2, m)| {
                let var = (s2 / n.max(1.0) - m * m).max(0.0);
                // A factor constant in the training data carries nothing; do not blow it up.
                if var > 1e-12 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        Standardisation { mean, scale }
    }

    /// Per-feature count, sums and sums of squares of `samples`' clinical vectors.
    pub fn sums(samples: &[&Sample], features: usize) -> (f64, Vec<f64>, Vec<f64>) {
        let mut sum = vec![0.0; features];
        let mut sum_sq = vec![0.0; features];
        for s in samples {
            for (j, &x) in s.clinical.iter().enumerate().take(features) {
                sum[j] += f64::from(x);
                sum_sq[j] += f64::from(x) * f64::from(x);
            }
        }
        (samples.len() as f64, sum, sum_sq)
    }

    pub fn fit(samples: &[&Sample], features: usize) -> Standardisation {
        let (n, sum, sum_sq) = Standardisation::sums(samples, features);
        Standardisation::from_sums(n, &sum, &sum_sq)
    }

    pub fn apply(&self, x: &[f32], out: &mut Vec<f32>) {
        out.extend(
            x.iter()
                .zip(self.mean.iter().zip(&self.scale))
                .map(|(&v, (m, s))| ((f64::from(v) - m) / s) as f32),
        );
    }
}

/// An image network and its variables.
pub struct Network {
    pub kind: ModelKind,
    pub config: NetConfig,
    pub standardisation: Standardisation,
    varmap: VarMap,
    pub(crate) net: ResNet,
}

/// The largest chunk of images AdaBN passes through the network at once.
pub const ADAPT_BATCH: usize = 64;

/// The federation role of a variable, from its torchvision-style name.
pub fn role_of(name: &str) -> TensorRole {
    let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    if leaf == "running_mean" || leaf == "running_var" || leaf == "num_batches_tracked" {
        TensorRole::BatchNormStatistic
    } else if module.ends_with("bn1") || module.ends_with("bn2") || module.ends_with("downsample.1")
    {
        TensorRole::BatchNormParameter
    } else {
        TensorRole::Parameter
    }
}

impl Network {
    /// A fresh network with weights drawn from `seed` (candle's own CPU generator cannot be seeded):
    /// convolutions He-normal, the head uniform in ±1/sqrt(fan-in) as PyTorch's, batch norm at identity.
    pub fn new(kind: ModelKind, config: NetConfig, seed: u64) -> Result<Network, ModelError> {
        config.check().map_err(|e| ModelError::Architecture(e.0))?;
        if !kind.is_network() {
            return Err(ModelError::Architecture(
                "the clinical model is not an image network".into(),
            ));
        }
        if (kind == ModelKind::Mri) != (config.clinical_features == 0) {
            return Err(ModelError::Architecture(format!(
                "a {} network with {} clinical features",
                kind.name(),
                config.clinical_features
            )));
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ResNet::new(&config, vb)?;
        let network = Network {
            kind,
            config,
            standardisation: Standardisation::identity(config.clinical_features),
            varmap,
            net,
        };
        let mut rng = Rng::new(seed);
        for (name, var) in network.sorted_vars() {
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let leaf = name.rsplit('.').next().unwrap_or("");
            let values: Vec<f32> = match (role_of(&name), leaf, dims.len()) {
                (TensorRole::BatchNormStatistic, "running_var", _)
                | (TensorRole::BatchNormParameter, "weight", _) => vec![1.0; n],
                (TensorRole::BatchNormStatistic, _, _) | (_, "bias", _) => vec![0.0; n],
                (_, _, 4) => {
                    let fan_in = (dims[1] * dims[2] * dims[3]) as f64;
                    let sd = (2.0 / fan_in).sqrt();
                    (0..n).map(|_| (rng.normal() * sd) as f32).collect()
                }
                _ => {
                    let fan_in = *dims.last().unwrap_or(&1) as f64;
                    let bound = 1.0 / fan_in.sqrt();
                    (0..n)
                        .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                        .collect()
                }
            };
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
        }
        Ok(network)
    }

    /// Starts the combined network's head where a fitted clinical logistic model is: with `coefficients`
    /// (intercept, then one per coded factor, as [`crate::clinical::names`]) the logit is the clinical model's
    /// at any image whose pooled features the head's image columns map to zero, so that training adds what
    /// the MRI tells beyond the clinical factors instead of learning those again from a few hundred patients.
    /// The image columns keep their initialisation (zeros there would stop every gradient into the backbone).
    pub fn start_head_from_clinical(&self, coefficients: &[f64]) -> Result<(), ModelError> {
        let f = self.config.clinical_features;
        if self.kind != ModelKind::Combined || coefficients.len() != f + 1 {
            return Err(ModelError::Architecture(format!(
                "a clinical model of {} coefficients cannot start the head of a {} network with {f} \
                 clinical features",
                coefficients.len(),
                self.kind.name()
            )));
        }
        if coefficients.iter().any(|b| !b.is_finite()) {
            return Err(ModelError::Architecture(
                "the clinical model has a non-finite coefficient".into(),
            ));
        }
        let vars = self.sorted_vars();
        let var = |name: &str| {
            vars.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| ModelError::WeightsMismatch(format!("tensor {name} is missing")))
        };
        let (weight, bias) = (var("fc.weight")?, var("fc.bias")?);
        let mut w: Vec<f32> = weight.as_tensor().flatten_all()?.to_vec1()?;
        let image = w.len() - f;
        // The network sees (x - mean) / scale: beta x = beta scale z + beta mean.
        let st = &self.standardisation;
        let mut intercept = coefficients[0];
        for (j, b) in coefficients[1..].iter().enumerate() {
            w[image + j] = (b * st.scale[j]) as f32;
            intercept += b * st.mean[j];
        }
        weight.set(&Tensor::from_vec(w, weight.dims(), &Device::Cpu)?)?;
        bias.set(&Tensor::from_vec(
            vec![intercept as f32],
            bias.dims(),
            &Device::Cpu,
        )?)?;
        Ok(())
    }

    /// The variables by name, sorted (VarMap keeps a HashMap).
    pub(crate) fn sorted_vars(&self) -> Vec<(String, candle_core::Var)> {
        let data = self
            .varmap
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut vars: Vec<(String, candle_core::Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Variables the optimiser moves: all but the batch-norm running statistics.
    pub(crate) fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.sorted_vars()
            .into_iter()
            .filter(|(n, _)| role_of(n) != TensorRole::BatchNormStatistic)
            .collect()
    }

    /// One line for people: kind, architecture, size and input.
    pub fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "{} network (ResNet-{}, width {}, {} parameters, input {} x {} x {})",
            self.kind.name(),
            c.depth,
            c.width,
            self.parameter_count(),
            c.in_channels,
            c.input_size,
            c.input_size
        )
    }

    pub fn parameter_count(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Every variable, names sorted, batch-norm statistics included, each with its role; f32 as trained.
    pub fn to_weights(&self) -> Result<Weights, ModelError> {
        let mut tensors = Vec::new();
        for (name, var) in self.sorted_vars() {
            let values: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            tensors.push(fedslm_protocol::Tensor::from_f32(
                name.as_str(),
                var.dims().to_vec(),
                role_of(&name),
                &values,
            )?);
        }
        Ok(Weights::from_tensors(tensors)?)
    }

    /// Sets every variable from `weights`, which must hold exactly this network's names and shapes.
    pub fn load_weights(&self, weights: &Weights) -> Result<(), ModelError> {
        let vars = self.sorted_vars();
        let mismatch = |what: String| ModelError::WeightsMismatch(what);
        for t in weights.tensors() {
            if !vars.iter().any(|(n, _)| n == t.name()) {
                return Err(mismatch(format!(
                    "tensor {} is not part of a {} network of depth {} and width {}",
                    t.name(),
                    self.kind.name(),
                    self.config.depth,
                    self.config.width
                )));
            }
        }
        // Everything is checked before anything is set: a refused load leaves the network as it was.
        let mut values = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let t = weights
                .get(name)
                .ok_or_else(|| mismatch(format!("tensor {name} is missing")))?;
            if t.shape() != var.dims() {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?} where the network has {:?}",
                    t.shape(),
                    var.dims()
                )));
            }
            let v = t.to_f32_vec();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(mismatch(format!("tensor {name} holds a non-finite value")));
            }
            values.push(Tensor::from_vec(v, var.dims(), &Device::Cpu)?);
        }
        for ((_, var), value) in vars.iter().zip(values) {
            var.set(&value)?;
        }
        Ok(())
    }

    /// A model card for this network: kind, architecture, standardisation, and the settings it expects.
    pub fn card(
        &self,
        coding: fedslm_cohort::ClinicalCoding,
        preprocess: fedslm_cohort::PreprocessSettings,
    ) -> crate::ModelCard {
        crate::ModelCard {
            network: Some(self.config),
            standardisation: (self.kind == ModelKind::Combined)
                .then(|| self.standardisation.clone()),
            ..crate::ModelCard::new(self.kind.name(), coding, preprocess)
        }
    }

    /// The network a model file holds, with its card.
    pub fn load(path: &std::path::Path) -> Result<(Network, crate::ModelCard), ModelError> {
        let (weights, card) = crate::load(path)?;
        let bad = |reason: String| ModelError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let kind = match card.model.parse::<ModelKind>() {
            Ok(kind) if kind.is_network() => kind,
            _ => {
                return Err(bad(format!(
                    "a {} model is not an image network",
                    card.model
                )))
            }
        };
        let config = card
            .network
            .ok_or_else(|| bad("its card has no network architecture".into()))?;
        let mut network = Network::new(kind, config, 0)?;
        if kind == ModelKind::Combined {
            let st = card
                .standardisation
                .clone()
                .ok_or_else(|| bad("its card has no clinical standardisation".into()))?;
            if st.mean.len() != config.clinical_features
                || st.scale.len() != config.clinical_features
                || st.scale.iter().any(|s| !(s.is_finite() && *s > 0.0))
                || st.mean.iter().any(|m| !m.is_finite())
            {
                return Err(bad(format!(
                    "its standardisation does not fit {} clinical features",
                    config.clinical_features
                )));
            }
            network.standardisation = st;
        }
        network
            .load_weights(&weights)
            .map_err(|e| bad(e.to_string()))?;
        Ok((network, card))
    }

    /// Checks that a sample fits the network, naming the patient where it does not.
    pub(crate) fn check_sample(&self, s: &Sample) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::Input {
            patient: s.patient_id.clone(),
            center: s.center.clone(),
            reason,
        };
        if s.channels != self.config.in_channels || s.size != self.config.input_size {
            return Err(bad(format!(
                "its crop is {} channels of {}x{} px, the network takes {} channels of {}x{} px",
                s.channels,
                s.size,
                s.size,
                self.config.in_channels,
                self.config.input_size,
                self.config.input_size
            )));
        }
        if s.image.len() != s.channels * s.size * s.size {
            return Err(bad(format!(
                "its crop holds {} values where {} were expected",
                s.image.len(),
                s.channels * s.size * s.size
            )));
        }
        if s.clinical.len() < self.config.clinical_features {
            return Err(bad(format!(
                "{} clinical factors where the network takes {}",
                s.clinical.len(),
                self.config.clinical_features
            )));
        }
        Ok(())
    }

    /// The input tensors of a batch: crops (as given, or through `transform`) and standardised clinical vectors.
    pub(crate) fn batch(
        &self,
        samples: &[&Sample],
        mut transform: impl FnMut(&Sample, &mut Vec<f32>),
    ) -> Result<(Tensor, Option<Tensor>), ModelError> {
        let c = &self.config;
        let mut images = Vec::with_capacity(samples.len() * c.in_channels * c.input_size.pow(2));
        let mut clinical = Vec::with_capacity(samples.len() * c.clinical_features);
        for s in samples {
            self.check_sample(s)?;
            transform(s, &mut images);
            self.standardisation
                .apply(&s.clinical[..c.clinical_features], &mut clinical);
        }
        let images = Tensor::from_vec(
            images,
            (samples.len(), c.in_channels, c.input_size, c.input_size),
            &Device::Cpu,
        )?;
        let clinical = if c.clinical_features > 0 {
            Some(Tensor::from_vec(
                clinical,
                (samples.len(), c.clinical_features),
                &Device::Cpu,
            )?)
        } else {
            None
        };
        Ok((images, clinical))
    }

    /// Chooses our kernels (the default) or candle's own ops, the reference they are tested against.
    pub fn set_kernels(&mut self, kernels: crate::kernels::Kernels) {
        self.net.kernels = kernels;
    }

    /// AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016): every
    /// batch-norm layer's running statistics recomputed from `samples` (a centre's own images; their labels
    /// are not read), so that a validating centre normalises with its scanner's statistics. The samples pass
    /// through the network in training mode in at most [`ADAPT_BATCH`]-sized, near-equal chunks, each chunk's
    /// statistics weighted by its share of the patients seen (a cumulative average). The learnt weights are
    /// untouched. Returns the patients used.
    pub fn adapt_batch_norm(&self, samples: &[&Sample]) -> Result<usize, ModelError> {
        if samples.len() < 2 {
            return Err(ModelError::Training(format!(
                "batch-norm statistics need at least 2 images; there are {}",
                samples.len()
            )));
        }
        let chunks = samples.len().div_ceil(ADAPT_BATCH);
        let size = samples.len().div_ceil(chunks);
        let mut seen = 0usize;
        let result = samples.chunks(size).try_for_each(|chunk| {
            seen += chunk.len();
            self.net
                .set_batch_norm_momentum(Some(chunk.len() as f64 / seen as f64));
            let (images, clinical) = self.batch(chunk, |s, buf| buf.extend_from_slice(&s.image))?;
            self.net.forward_t(&images, clinical.as_ref(), true)?;
            Ok::<(), ModelError>(())
        });
        self.net.set_batch_norm_momentum(None);
        result.map(|()| samples.len())
    }

    /// Per-patient probabilities, batch-norm statistics frozen.
    pub fn predict(&self, samples: &[&Sample]) -> Result<Vec<f64>, ModelError> {
        let mut out = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(64) {
            let (images, clinical) = self.batch(chunk, |s, buf| buf.extend_from_slice(&s.image))?;
            let logits: Vec<f32> = self
                .net
                .forward_t(&images, clinical.as_ref(), false)?
                .to_vec1()?;
            out.extend(
                logits
                    .into_iter()
                    .map(|l| 1.0 / (1.0 + (-f64::from(l)).exp())),
            );
        }
        Ok(out)
    }
}
