//! The study's image networks in candle: a ResNet of BasicBlocks over the crop's channels (sequences x slices),
//! global average pooling, and one logit; `combined` concatenates the standardised clinical vector to the pooled
//! features before the head.
//!
//! Tensor names follow torchvision (`conv1`, `bn1`, `layer2.0.downsample.1.running_var`, `fc.weight`), so a
//! model file loads into a PyTorch ResNet as it is.

use candle_core::{Module, Result, Tensor, Var, D};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::{self, Kernels, Then};
use serde::{Deserialize, Serialize};

/// The first layers, before the residual stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// One 3x3 convolution of stride 2: small crops (64 px) keep their detail.
    Compact,
    /// torchvision's 7x7 convolution of stride 2, then a 2x2 max-pool of stride 2 (torchvision pools 3x3 with
    /// padding 1; the output size is the same for even inputs).
    Standard,
}

/// Architecture of an image network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// 10, 18 or 34: BasicBlocks per stage [1,1,1,1], [2,2,2,2] or [3,4,6,3].
    pub depth: usize,
    /// Channels of the first stage, doubled at each of the next three.
    pub width: usize,
    /// Sequences x slices of the crop.
    pub in_channels: usize,
    /// Height and width of the crop.
    pub input_size: usize,
    /// Coded clinical factors concatenated before the head; 0 for the MRI-only network.
    pub clinical_features: usize,
    pub stem: Stem,
}

/// Why a network's architecture cannot be built, or cannot be read from a model's tensors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArchitectureError(pub String);

impl NetConfig {
    /// The default for a 2-core CPU: ResNet-10 of width 8 with the compact stem (77 k parameters).
    pub fn compact(in_channels: usize, input_size: usize, clinical_features: usize) -> NetConfig {
        NetConfig {
            depth: 10,
            width: 8,
            in_channels,
            input_size,
            clinical_features,
            stem: Stem::Compact,
        }
    }

    /// The study's scale: ResNet-18 of width 64 with torchvision's stem.
    pub fn resnet18(in_channels: usize, input_size: usize, clinical_features: usize) -> NetConfig {
        NetConfig {
            depth: 18,
            width: 64,
            in_channels,
            input_size,
            clinical_features,
            stem: Stem::Standard,
        }
    }

    pub fn blocks(&self) -> Option<[usize; 4]> {
        match self.depth {
            10 => Some([1, 1, 1, 1]),
            18 => Some([2, 2, 2, 2]),
            34 => Some([3, 4, 6, 3]),
            _ => None,
        }
    }

    /// Why this configuration cannot be built, if it cannot.
    pub fn check(&self) -> std::result::Result<(), ArchitectureError> {
        self.check_text().map_err(ArchitectureError)
    }

    fn check_text(&self) -> std::result::Result<(), String> {
        if self.blocks().is_none() {
            return Err(format!("depth {} (use 10, 18 or 34)", self.depth));
        }
        if self.width == 0 || self.width > 512 {
            return Err(format!("width {} (use 1 to 512)", self.width));
        }
        if self.in_channels == 0 {
            return Err("no input channels".into());
        }
        // The stem and three stride-2 stages must leave at least one pixel.
        let reduction = match self.stem {
            Stem::Compact => 16,
            Stem::Standard => 32,
        };
        if self.input_size < reduction {
            return Err(format!(
                "input size {} is below the network's reduction of {reduction}",
                self.input_size
            ));
        }
        Ok(())
    }

    /// Width of the pooled features.
    pub fn features(&self) -> usize {
        8 * self.width
    }

    /// The architecture whose tensors `weights` holds (a federated client learns it from its first task),
    /// for crops of `input_size`.
    pub fn from_weights(
        weights: &fedslm_protocol::Weights,
        input_size: usize,
    ) -> std::result::Result<NetConfig, ArchitectureError> {
        NetConfig::from_weights_text(weights, input_size).map_err(ArchitectureError)
    }

    fn from_weights_text(
        weights: &fedslm_protocol::Weights,
        input_size: usize,
    ) -> std::result::Result<NetConfig, String> {
        let conv1 = weights
            .get("conv1.weight")
            .ok_or("no conv1.weight: not a ResNet")?;
        let [width, in_channels, k, _] = conv1.shape() else {
            return Err(format!("conv1.weight has shape {:?}", conv1.shape()));
        };
        let stem = match k {
            3 => Stem::Compact,
            7 => Stem::Standard,
            other => return Err(format!("a {other}x{other} stem")),
        };
        let mut blocks = [0usize; 4];
        for (stage, count) in blocks.iter_mut().enumerate() {
            while weights
                .get(&format!("layer{}.{}.conv1.weight", stage + 1, *count))
                .is_some()
            {
                *count += 1;
            }
        }
        let depth = match blocks {
            [1, 1, 1, 1] => 10,
            [2, 2, 2, 2] => 18,
            [3, 4, 6, 3] => 34,
            other => return Err(format!("residual blocks {other:?} per stage")),
        };
        let fc = weights.get("fc.weight").ok_or("no fc.weight")?;
        let fc_in = fc.shape().get(1).copied().unwrap_or(0);
        let clinical_features = fc_in
            .checked_sub(8 * width)
            .ok_or_else(|| format!("fc.weight has shape {:?}", fc.shape()))?;
        let cfg = NetConfig {
            depth,
            width: *width,
            in_channels: *in_channels,
            input_size,
            clinical_features,
            stem,
        };
        cfg.check_text()?;
        Ok(cfg)
    }
}

/// Batch normalisation over (batch, height, width) per channel. candle-nn's own keeps the running statistics'
/// update in the autograd graph; here they are updated from detached values.
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    /// The share of a training batch's statistics in the running ones (the bits of an f64): `BN_MOMENTUM`,
    /// but for AdaBN's passes ([`ResNet::set_batch_norm_momentum`]).
    momentum: std::sync::atomic::AtomicU64,
}

const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

impl BatchNorm2d {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
        use candle_nn::Init;
        Ok(BatchNorm2d {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: Var::from_tensor(&vb.get_with_hints(
                channels,
                "running_mean",
                Init::Const(0.0),
            )?)?,
            running_var: Var::from_tensor(&vb.get_with_hints(
                channels,
                "running_var",
                Init::Const(1.0),
            )?)?,
            momentum: std::sync::atomic::AtomicU64::new(BN_MOMENTUM.to_bits()),
        })
    }

    fn momentum(&self) -> f64 {
        f64::from_bits(self.momentum.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The normalised `x`, then `then` (the shortcut added, a ReLU); in training, the batch's statistics also
    /// move the running ones.
    pub fn forward_t(
        &self,
        x: &Tensor,
        train: bool,
        then: Then,
        kernels: Kernels,
    ) -> Result<Tensor> {
        if kernels == Kernels::Candle {
            let mut y = self.forward_candle(x, train)?;
            if let Some(r) = then.residual {
                y = (y + r)?;
            }
            return if then.relu { y.relu() } else { Ok(y) };
        }
        if !train {
            return kernels::batch_norm_eval(
                x,
                &self.weight,
                &self.bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                BN_EPS,
                then,
            );
        }
        let (y, stats) = kernels::batch_norm_train(x, &self.weight, &self.bias, BN_EPS, then)?;
        let (n, _, h, w) = x.dims4()?;
        let unbiased = unbiased_factor(n * h * w);
        let var: Vec<f32> = stats.var.iter().map(|v| v * unbiased as f32).collect();
        let dev = x.device();
        let c = stats.mean.len();
        self.update_running(
            &Tensor::from_vec(stats.mean, c, dev)?,
            &Tensor::from_vec(var, c, dev)?,
        )?;
        Ok(y)
    }

    fn update_running(&self, mean: &Tensor, unbiased_var: &Tensor) -> Result<()> {
        let m = self.momentum();
        self.running_mean
            .set(&((self.running_mean.as_tensor().detach() * (1.0 - m))? + (mean * m)?)?)?;
        self.running_var
            .set(&((self.running_var.as_tensor().detach() * (1.0 - m))? + (unbiased_var * m)?)?)
    }

    /// The same from candle's own tensor ops (the reference the kernel is tested against).
    fn forward_candle(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let shape = (1, c, 1, 1);
        let (mean, var) = if train {
            // Reductions over the last, contiguous dimension first: candle reduces strided dimensions slowly.
            let (n, _, h, w) = x.dims4()?;
            let per_channel = |t: &Tensor| -> Result<Tensor> {
                t.reshape((n, c, h * w))?
                    .mean(2)?
                    .mean_keepdim(0)?
                    .reshape(shape)
            };
            let mean = per_channel(x)?;
            let var = per_channel(&x.broadcast_sub(&mean)?.sqr()?)?;
            let m = mean.detach().flatten_all()?;
            let v = (var.detach().flatten_all()? * unbiased_factor(n * h * w))?;
            self.update_running(&m, &v)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().detach().reshape(shape)?,
                self.running_var.as_tensor().detach().reshape(shape)?,
            )
        };
        let scale = (var + BN_EPS)?
            .sqrt()?
            .recip()?
            .broadcast_mul(&self.weight.reshape(shape)?)?;
        x.broadcast_sub(&mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape(shape)?)
    }
}

/// Running variances are unbiased (PyTorch's convention), the batch's own normalisation biased.
fn unbiased_factor(count: usize) -> f64 {
    if count > 1 {
        count as f64 / (count as f64 - 1.0)
    } else {
        1.0
    }
}

/// Max pooling from candle's reshape and max reduction (the reference). candle's own `max_pool2d` scales each
/// gradient by the window's share of maxima (a quarter for a unique maximum in a 2x2 window) instead of routing
/// it whole.
fn max_pool_by_reduction(x: &Tensor, size: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / size, w / size);
    x.narrow(2, 0, ho * size)?
        .narrow(3, 0, wo * size)?
        .contiguous()?
        .reshape((n, c, ho, size, wo, size))?
        .max(5)?
        .max(3)
}

/// A convolution without bias, padding `kernel / 2`.
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        match kernels {
            Kernels::Fedslm => kernels::conv2d(x, &self.weight, self.stride, self.padding),
            Kernels::Candle => x.conv2d(&self.weight, self.padding, self.stride, 1, 1),
        }
    }
}

fn conv(
    vb: VarBuilder,
    name: &str,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
) -> Result<Conv> {
    // Network::new draws the weights from its own seeded generator; the hint only fills the variable.
    let weight = vb.pp(name).get_with_hints(
        (cout, cin, kernel, kernel),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Conv {
        weight,
        stride,
        padding: kernel / 2,
    })
}

struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm2d,
    conv2: Conv,
    bn2: BatchNorm2d,
    downsample: Option<(Conv, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, stride: usize) -> Result<BasicBlock> {
        let downsample = if stride != 1 || cin != cout {
            Some((
                conv(vb.pp("downsample"), "0", cin, cout, 1, stride)?,
                BatchNorm2d::new(cout, vb.pp("downsample").pp("1"))?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: conv(vb.clone(), "conv1", cin, cout, 3, stride)?,
            bn1: BatchNorm2d::new(cout, vb.pp("bn1"))?,
            conv2: conv(vb.clone(), "conv2", cout, cout, 3, 1)?,
            bn2: BatchNorm2d::new(cout, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool, k: Kernels) -> Result<Tensor> {
        let y = self
            .bn1
            .forward_t(&self.conv1.forward(x, k)?, train, Then::RELU, k)?;
        let shortcut = match &self.downsample {
            Some((c, bn)) => bn.forward_t(&c.forward(x, k)?, train, Then::default(), k)?,
            None => x.clone(),
        };
        let then = Then {
            residual: Some(&shortcut),
            relu: true,
        };
        self.bn2
            .forward_t(&self.conv2.forward(&y, k)?, train, then, k)
    }
}

/// The ResNet: stem, four stages, global average pooling, optional clinical concatenation, one logit.
pub struct ResNet {
    cfg: NetConfig,
    conv1: Conv,
    bn1: BatchNorm2d,
    blocks: Vec<BasicBlock>,
    fc: Linear,
    pub kernels: Kernels,
}

impl ResNet {
    pub fn new(cfg: &NetConfig, vb: VarBuilder) -> Result<ResNet> {
        let blocks_per_stage = cfg
            .blocks()
            .ok_or_else(|| candle_core::Error::Msg(format!("unsupported depth {}", cfg.depth)))?;
        let kernel = match cfg.stem {
            Stem::Compact => 3,
            Stem::Standard => 7,
        };
        let conv1 = conv(vb.clone(), "conv1", cfg.in_channels, cfg.width, kernel, 2)?;
        let bn1 = BatchNorm2d::new(cfg.width, vb.pp("bn1"))?;
        let mut blocks = Vec::new();
        let mut cin = cfg.width;
        for (stage, &count) in blocks_per_stage.iter().enumerate() {
            let cout = cfg.width << stage;
            for b in 0..count {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    vb.pp(format!("layer{}", stage + 1)).pp(b.to_string()),
                    cin,
                    cout,
                    stride,
                )?);
                cin = cout;
            }
        }
        let fc = candle_nn::linear(cfg.features() + cfg.clinical_features, 1, vb.pp("fc"))?;
        Ok(ResNet {
            cfg: *cfg,
            conv1,
            bn1,
            blocks,
            fc,
            kernels: Kernels::default(),
        })
    }

    /// Every batch-norm layer, in order.
    fn batch_norms(&self) -> impl Iterator<Item = &BatchNorm2d> {
        std::iter::once(&self.bn1).chain(self.blocks.iter().flat_map(|b| {
            [&b.bn1, &b.bn2]
                .into_iter()
                .chain(b.downsample.as_ref().map(|(_, bn)| bn))
        }))
    }

    /// The share of each training batch's statistics in every layer's running ones: `None` restores the
    /// training momentum (0.1, PyTorch's).
    pub fn set_batch_norm_momentum(&self, momentum: Option<f64>) {
        let bits = momentum.unwrap_or(BN_MOMENTUM).to_bits();
        for bn in self.batch_norms() {
            bn.momentum
                .store(bits, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Logits, shape `[batch]`, of crops `[batch, channels, size, size]` and, for the combined network,
    /// standardised clinical vectors `[batch, features]`.
    pub fn forward_t(
        &self,
        image: &Tensor,
        clinical: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let k = self.kernels;
        let mut x = self
            .bn1
            .forward_t(&self.conv1.forward(image, k)?, train, Then::RELU, k)?;
        if self.cfg.stem == Stem::Standard {
            x = match k {
                Kernels::Fedslm => kernels::max_pool2d(&x, 2)?,
                Kernels::Candle => max_pool_by_reduction(&x, 2)?,
            };
        }
        for b in &self.blocks {
            x = b.forward_t(&x, train, k)?;
        }
        let pooled = x.mean(D::Minus1)?.mean(D::Minus1)?;
        let features = match (self.cfg.clinical_features, clinical) {
            (0, _) => pooled,
            (_, Some(c)) => Tensor::cat(&[&pooled, c], 1)?,
            (n, None) => {
                return Err(candle_core::Error::Msg(format!(
                    "the combined network needs the {n} clinical features"
                )))
            }
        };
        self.fc.forward(&features)?.squeeze(1)
    }
}
