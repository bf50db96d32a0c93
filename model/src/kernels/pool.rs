//! 2-D max pooling with a square window as wide as its stride (no padding), forward and backward. candle's own
//! backward rebuilds the routing from an upsampled copy, an equality mask and an average pool, seven passes over
//! the stem's activation (the largest in ResNet-18); this one routes each output's gradient to its window's
//! first maximum (PyTorch's choice on ties) in one pass.

use super::{per_plane, values, with_values};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

const NAME: &str = "fedslm-max-pool2d";

/// `x [n, c, h, w]` max-pooled over `size x size` windows of stride `size`; trailing rows and columns that do
/// not fill a window are dropped, as candle and PyTorch do.
pub fn max_pool2d(x: &Tensor, size: usize) -> Result<Tensor> {
    if size == 0 {
        candle_core::bail!("{NAME}: window 0");
    }
    let (_, _, h, w) = x.dims4()?;
    if h < size || w < size {
        candle_core::bail!("{NAME}: window {size} larger than the input {h}x{w}");
    }
    x.apply_op1(MaxPool { size })
}

struct MaxPool {
    size: usize,
}

impl MaxPool {
    /// (planes, h, w, ho, wo) of an `[n, c, h, w]` input.
    fn geometry(&self, dims: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
        let &[n, c, h, w] = dims else {
            candle_core::bail!("{NAME}: input of shape {dims:?}, expected 4 dimensions")
        };
        Ok((n * c, h, w, h / self.size, w / self.size))
    }

    /// The index in its plane of the first maximum of output `(oy, ox)`'s window.
    fn arg_max(&self, plane: &[f32], w: usize, oy: usize, ox: usize) -> usize {
        let s = self.size;
        let mut best = oy * s * w + ox * s;
        for ky in 0..s {
            for kx in 0..s {
                let i = (oy * s + ky) * w + ox * s + kx;
                // NaN propagates, as in PyTorch.
                if plane[i] > plane[best] || plane[i].is_nan() && !plane[best].is_nan() {
                    best = i;
                }
            }
        }
        best
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (planes, h, w, ho, wo) = self.geometry(layout.dims())?;
        let x = values(storage, layout, NAME)?;
        let mut out = vec![0f32; planes * ho * wo];
        per_plane(&mut out, ho * wo, |p, o| {
            let plane = &x[p * h * w..][..h * w];
            for oy in 0..ho {
                for ox in 0..wo {
                    o[oy * wo + ox] = plane[self.arg_max(plane, w, oy, ox)];
                }
            }
        });
        let d = layout.dims();
        Ok((CpuStorage::F32(out), Shape::from((d[0], d[1], ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (planes, h, w, ho, wo) = self.geometry(x.dims())?;
        let dx = with_values(x, NAME, |xv| {
            with_values(grad, NAME, |gv| {
                let mut dx = vec![0f32; planes * h * w];
                per_plane(&mut dx, h * w, |p, d| {
                    let plane = &xv[p * h * w..][..h * w];
                    let g = &gv[p * ho * wo..][..ho * wo];
                    for oy in 0..ho {
                        for ox in 0..wo {
                            d[self.arg_max(plane, w, oy, ox)] += g[oy * wo + ox];
                        }
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.dims(), x.device())?))
    }
}
