//! Batch normalisation over (batch, height, width) per channel, with the ReLU that follows it in the network
//! optionally fused in: one pass for the statistics and one for the output; backward in two passes.
//!
//! Training mode normalises by the batch's own statistics (biased variance, as PyTorch) and hands them to the
//! caller for the running averages; evaluation mode by given running statistics.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{tensor_values, values, with_values};

const NAME: &str = "fedslm-batch-norm";

/// A batch's per-channel mean and biased variance.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

/// `relu?(gamma (x - mean) / sqrt(var + eps) + beta)` with the batch's statistics, which are returned too.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let cell = Arc::new(Mutex::new(None));
    let y = x.apply_op3(
        gamma,
        beta,
        BatchNorm {
            eps,
            relu,
            stats: Stats::Batch(cell.clone()),
        },
    )?;
    let stats = cell
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned statistics")))?
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
    relu: bool,
) -> Result<Tensor> {
    let stats = BatchStats {
        mean: tensor_values(mean, NAME)?,
        var: tensor_values(var, NAME)?,
    };
    x.apply_op3(
        gamma,
        beta,
        BatchNorm {
            eps,
            relu,
            stats: Stats::Running(stats),
        },
    )
}

enum Stats {
    /// Computed in the forward pass, kept for the backward.
    Batch(Arc<Mutex<Option<BatchStats>>>),
    Running(BatchStats),
}

struct BatchNorm {
    eps: f64,
    relu: bool,
    stats: Stats,
}

/// (batch, channels, pixels per channel) of an `[n, c, h, w]` tensor.
fn geometry(dims: &[usize], gamma: usize, beta: usize) -> Result<(usize, usize, usize)> {
    let &[n, c, h, w] = dims else {
        candle_core::bail!("{NAME}: input of shape {dims:?}, expected 4 dimensions")
    };
    if gamma != c || beta != c {
        candle_core::bail!("{NAME}: {c} channels but {gamma} weights and {beta} biases");
    }
    Ok((n, c, h * w))
}

/// Per-channel mean and biased variance, in f64 sums, over the planes `x[n, c, :]`.
fn batch_stats(x: &[f32], n: usize, c: usize, hw: usize) -> BatchStats {
    let per_channel: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
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
        })
        .collect();
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
        let (n, c, hw) = geometry(l1.dims(), l2.shape().elem_count(), l3.shape().elem_count())?;
        let x = values(s1, l1, NAME)?;
        let gamma = values(s2, l2, NAME)?;
        let beta = values(s3, l3, NAME)?;
        let computed;
        let stats = match &self.stats {
            Stats::Batch(cell) => {
                computed = batch_stats(&x, n, c, hw);
                *cell.lock().map_err(|_| {
                    candle_core::Error::Msg(format!("{NAME}: poisoned statistics"))
                })? = Some(computed.clone());
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
        let mut out = vec![0f32; n * c * hw];
        let relu = self.relu;
        out.par_chunks_mut(hw.max(1))
            .zip(x.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(plane, (o, xs))| {
                let (a, b) = (scale[plane % c], shift[plane % c]);
                if relu {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = (v * a + b).max(0.0);
                    }
                } else {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = v * a + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, hw) = geometry(x.dims(), gamma.elem_count(), gamma.elem_count())?;
        let stats = match &self.stats {
            Stats::Batch(cell) => cell
                .lock()
                .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned statistics")))?
                .clone()
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("{NAME}: backward before forward"))
                })?,
            Stats::Running(s) => s.clone(),
        };
        let inv = inverse_std(&stats.var, self.eps);
        let gamma_v = tensor_values(gamma, NAME)?;
        let relu = self.relu;
        let (dx, dgamma, dbeta) = with_values(x, NAME, |xv| {
            with_values(grad, NAME, |gv| {
                with_values(res, NAME, |rv| {
                    // Through the ReLU: the gradient passes where the output is positive.
                    let g_at = |i: usize| if relu && rv[i] <= 0.0 { 0.0 } else { gv[i] };
                    // Per channel: sum of g and of g * xhat.
                    let sums: Vec<(f64, f64)> = (0..c)
                        .into_par_iter()
                        .map(|ch| {
                            let (mut sg, mut sgx) = (0f64, 0f64);
                            let (mean, inv) = (stats.mean[ch], inv[ch]);
                            for i in 0..n {
                                let base = (i * c + ch) * hw;
                                for (j, &x) in (base..).zip(&xv[base..base + hw]) {
                                    let g = f64::from(g_at(j));
                                    sg += g;
                                    sgx += g * f64::from((x - mean) * inv);
                                }
                            }
                            (sg, sgx)
                        })
                        .collect();
                    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
                    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
                    let batch = matches!(self.stats, Stats::Batch(_));
                    let m = (n * hw) as f32;
                    let mut dx = vec![0f32; n * c * hw];
                    dx.par_chunks_mut(hw.max(1))
                        .enumerate()
                        .for_each(|(plane, d)| {
                            let ch = plane % c;
                            let k = gamma_v[ch] * inv[ch];
                            let base = plane * hw;
                            if batch {
                                // d x = gamma inv / m (m g - sum g - xhat sum g xhat)
                                let (mg, mgx) = (dbeta[ch] / m, dgamma[ch] / m);
                                for (j, d) in d.iter_mut().enumerate() {
                                    let xhat = (xv[base + j] - stats.mean[ch]) * inv[ch];
                                    *d = k * (g_at(base + j) - mg - xhat * mgx);
                                }
                            } else {
                                for (j, d) in d.iter_mut().enumerate() {
                                    *d = k * g_at(base + j);
                                }
                            }
                        });
                    Ok((dx, dgamma, dbeta))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dgamma, gamma.dims(), dev)?),
            Some(Tensor::from_vec(dbeta, gamma.dims(), dev)?),
        ))
    }
}
