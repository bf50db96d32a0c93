//! Batch normalisation over (batch, height, width) per channel, with what follows it in a residual block
//! optionally fused in (the shortcut's addition, the ReLU): one pass for the statistics and one for the
//! output; backward in two passes. Every op candle's autograd records costs a zeroed gradient buffer and an
//! addition over the activation in the backward pass (its ReLU five more passes), so fewer, fused nodes are
//! most of what batch norm gains here.
//!
//! Training mode normalises by the batch's own statistics (biased variance, as PyTorch) and hands them to the
//! caller for the running averages; evaluation mode by given running statistics.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{new_per_plane, parallel, tensor_values, values, with_values};

const NAME: &str = "fedslm-batch-norm";

/// A batch's per-channel mean and biased variance.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

/// What follows the normalisation: `relu?(bn(x) + residual?)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Then<'a> {
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

impl Then<'static> {
    /// A ReLU and nothing added.
    pub const RELU: Then<'static> = Then {
        residual: None,
        relu: true,
    };
}

/// `gamma (x - mean) / sqrt(var + eps) + beta` with the batch's statistics, which are returned too, then
/// `then`.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    then: Then,
) -> Result<(Tensor, BatchStats)> {
    let cell = Arc::new(Mutex::new(None));
    let y = apply(x, gamma, beta, then, eps, Stats::Batch(cell.clone()))?;
    let stats = lock(&cell)?
        .clone()
        .ok_or_else(|| candle_core::Error::Msg(format!("{NAME}: no statistics computed")))?;
    Ok((y, stats))
}

/// The same with fixed (running) statistics.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    then: Then,
) -> Result<Tensor> {
    let stats = BatchStats {
        mean: tensor_values(mean, NAME)?,
        var: tensor_values(var, NAME)?,
    };
    apply(x, gamma, beta, then, eps, Stats::Running(stats))
}

fn apply(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    then: Then,
    eps: f64,
    stats: Stats,
) -> Result<Tensor> {
    let op = BatchNorm {
        eps,
        relu: then.relu,
        residual: then.residual.is_some(),
        stats,
    };
    match then.residual {
        // Three operands at most: the weight and bias travel as one [2c] tensor.
        Some(r) => x.apply_op3(r, &Tensor::cat(&[gamma, beta], 0)?, op),
        None => x.apply_op3(gamma, beta, op),
    }
}

fn lock(cell: &Mutex<Option<BatchStats>>) -> Result<std::sync::MutexGuard<'_, Option<BatchStats>>> {
    cell.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned statistics")))
}

enum Stats {
    /// Computed in the forward pass, kept for the backward.
    Batch(Arc<Mutex<Option<BatchStats>>>),
    Running(BatchStats),
}

/// Operands `(x, gamma, beta)`, or `(x, residual, [gamma; beta])` with `residual`.
struct BatchNorm {
    eps: f64,
    relu: bool,
    residual: bool,
    stats: Stats,
}

/// (batch, channels, pixels per channel) of an `[n, c, h, w]` tensor with `params` weights and biases.
fn geometry(dims: &[usize], params: usize) -> Result<(usize, usize, usize)> {
    let &[n, c, h, w] = dims else {
        candle_core::bail!("{NAME}: input of shape {dims:?}, expected 4 dimensions")
    };
    if params != c {
        candle_core::bail!("{NAME}: {c} channels but {params} weights and biases");
    }
    Ok((n, c, h * w))
}

/// Per-channel mean and biased variance, in f64 sums, over the planes `x[n, c, :]`.
fn batch_stats(x: &[f32], n: usize, c: usize, hw: usize) -> BatchStats {
    let channel = |ch: usize| {
        let planes = || (0..n).map(move |i| &x[(i * c + ch) * hw..][..hw]);
        let count = (n * hw) as f64;
        let mean = planes()
            .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>())
            .sum::<f64>()
            / count;
        let var = planes()
            .map(|p| {
                p.iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / count;
        (mean as f32, var as f32)
    };
    let per_channel: Vec<(f32, f32)> = if parallel(x.len()) {
        (0..c).into_par_iter().map(channel).collect()
    } else {
        (0..c).map(channel).collect()
    };
    BatchStats {
        mean: per_channel.iter().map(|s| s.0).collect(),
        var: per_channel.iter().map(|s| s.1).collect(),
    }
}

fn inverse_std(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (f64::from(v) + eps).sqrt()) as f32)
        .collect()
}

impl BatchNorm {
    fn stats(&self) -> Result<BatchStats> {
        match &self.stats {
            Stats::Batch(cell) => lock(cell)?
                .clone()
                .ok_or_else(|| candle_core::Error::Msg(format!("{NAME}: backward before forward"))),
            Stats::Running(s) => Ok(s.clone()),
        }
    }
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = values(s1, l1, NAME)?;
        let (residual, gamma, beta) = if self.residual {
            if l2.dims() != l1.dims() {
                candle_core::bail!("{NAME}: residual {:?} for input {:?}", l2.dims(), l1.dims());
            }
            let gb = values(s3, l3, NAME)?;
            let c = gb.len() / 2;
            (
                Some(values(s2, l2, NAME)?),
                Cow::Owned(gb[..c].to_vec()),
                Cow::Owned(gb[c..].to_vec()),
            )
        } else {
            if l2.shape().elem_count() != l3.shape().elem_count() {
                candle_core::bail!("{NAME}: weights and biases differ in length");
            }
            (None, values(s2, l2, NAME)?, values(s3, l3, NAME)?)
        };
        let (n, c, hw) = geometry(l1.dims(), gamma.len())?;
        let computed;
        let stats = match &self.stats {
            Stats::Batch(cell) => {
                computed = batch_stats(&x, n, c, hw);
                *lock(cell)? = Some(computed.clone());
                &computed
            }
            Stats::Running(s) => s,
        };
        if stats.mean.len() != c || stats.var.len() != c {
            candle_core::bail!(
                "{NAME}: statistics for {} channels, input has {c}",
                stats.mean.len()
            );
        }
        let inv = inverse_std(&stats.var, self.eps);
        // y = x * scale + shift per channel.
        let scale: Vec<f32> = (0..c).map(|j| gamma[j] * inv[j]).collect();
        let shift: Vec<f32> = (0..c).map(|j| beta[j] - stats.mean[j] * scale[j]).collect();
        let relu = self.relu;
        let act = |v: f32| if relu { v.max(0.0) } else { v };
        let residual = residual.as_deref();
        // SAFETY: every plane's values are written: `o`, `xs` and the residual's plane are `hw` long.
        let out = unsafe {
            new_per_plane(n * c * hw, hw, |plane, o| {
                let (a, b) = (scale[plane % c], shift[plane % c]);
                let xs = &x[plane * hw..][..hw];
                match residual {
                    Some(r) => {
                        for ((o, &v), &r) in o.iter_mut().zip(xs).zip(&r[plane * hw..][..hw]) {
                            o.write(act(v * a + b + r));
                        }
                    }
                    None => {
                        for (o, &v) in o.iter_mut().zip(xs) {
                            o.write(act(v * a + b));
                        }
                    }
                }
            })
        };
        Ok((CpuStorage::F32(out), Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        arg2: &Tensor,
        arg3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gamma = if self.residual {
            let gb = tensor_values(arg3, NAME)?;
            gb[..gb.len() / 2].to_vec()
        } else {
            tensor_values(arg2, NAME)?
        };
        let (n, c, hw) = geometry(x.dims(), gamma.len())?;
        let stats = self.stats()?;
        let inv = inverse_std(&stats.var, self.eps);
        let batch = matches!(self.stats, Stats::Batch(_));
        let (dx, dgamma, dbeta, dresidual) = with_values(x, NAME, |xv| {
            with_values(grad, NAME, |gv| {
                // Through the ReLU: the gradient passes where the output is positive.
                let g: Cow<[f32]> = if self.relu {
                    with_values(res, NAME, |rv| {
                        // SAFETY: each plane's `hw` values are written (`gv` and `rv` have `hw` there).
                        let g = unsafe {
                            new_per_plane(gv.len(), hw, |plane, g| {
                                let at = plane * hw;
                                for ((g, &v), &r) in
                                    g.iter_mut().zip(&gv[at..][..hw]).zip(&rv[at..][..hw])
                                {
                                    g.write(if r > 0.0 { v } else { 0.0 });
                                }
                            })
                        };
                        Ok(Cow::Owned(g))
                    })?
                } else {
                    Cow::Borrowed(gv)
                };
                // Per channel: sum of g and of g * xhat.
                let channel = |ch: usize| {
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    let (mean, inv) = (stats.mean[ch], inv[ch]);
                    for i in 0..n {
                        let base = (i * c + ch) * hw;
                        for (&g, &x) in g[base..base + hw].iter().zip(&xv[base..base + hw]) {
                            sg += f64::from(g);
                            sgx += f64::from(g * ((x - mean) * inv));
                        }
                    }
                    (sg, sgx)
                };
                let sums: Vec<(f64, f64)> = if parallel(xv.len()) {
                    (0..c).into_par_iter().map(channel).collect()
                } else {
                    (0..c).map(channel).collect()
                };
                let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
                let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
                let m = (n * hw) as f32;
                // SAFETY: each plane's `hw` values are written (`g` and `xv` have `hw` there).
                let dx = unsafe {
                    new_per_plane(n * c * hw, hw, |plane, d| {
                        let ch = plane % c;
                        let k = gamma[ch] * inv[ch];
                        let (gs, xs) = (&g[plane * hw..][..hw], &xv[plane * hw..][..hw]);
                        if batch {
                            // d x = gamma inv (g - sum g / m - xhat sum (g xhat) / m)
                            let (mg, mgx) = (dbeta[ch] / m, dgamma[ch] / m);
                            for ((d, &g), &x) in d.iter_mut().zip(gs).zip(xs) {
                                let xhat = (x - stats.mean[ch]) * inv[ch];
                                d.write(k * (g - mg - xhat * mgx));
                            }
                        } else {
                            for (d, &g) in d.iter_mut().zip(gs) {
                                d.write(k * g);
                            }
                        }
                    })
                };
                let dresidual = self.residual.then(|| g.into_owned());
                Ok((dx, dgamma, dbeta, dresidual))
            })
        })?;
        let dev = x.device();
        let params = |v: Vec<f32>| Tensor::from_vec(v, c, dev);
        let dx = Some(Tensor::from_vec(dx, x.dims(), dev)?);
        match dresidual {
            Some(dr) => {
                let mut gb = dgamma;
                gb.extend(dbeta);
                Ok((
                    dx,
                    Some(Tensor::from_vec(dr, x.dims(), dev)?),
                    Some(Tensor::from_vec(gb, 2 * c, dev)?),
                ))
            }
            None => Ok((dx, Some(params(dgamma)?), Some(params(dbeta)?))),
        }
    }
}
