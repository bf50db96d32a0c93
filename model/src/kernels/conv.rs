//! 2-D convolution (no bias, no dilation, one group) by im2col and GEMM, forward and both backward passes.
//!
//! Per sample, the input is unfolded into columns `[cin * kh * kw, ho * wo]` and multiplied by the weight
//! `[cout, cin * kh * kw]`; a 1x1 convolution of stride 1 without padding multiplies the input itself. The
//! weight gradient sums `grad_out · columnsᵀ` over the batch, the input gradient folds `weightᵀ · grad_out` back
//! (col2im). Columns are rebuilt in the backward pass instead of kept from the forward: memory stays at one
//! buffer per thread.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{chunks, threads, values, with_values};

const NAME: &str = "fedslm-conv2d";

/// `x [n, cin, h, w]` convolved with `weight [cout, cin, kh, kw]`, zero padding `padding` on every side.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if stride == 0 {
        candle_core::bail!("{NAME}: stride 0");
    }
    Geometry::new(x.dims(), weight.dims(), stride, padding)?;
    x.apply_op2(weight, Conv2d { stride, padding })
}

struct Conv2d {
    stride: usize,
    padding: usize,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], weight: &[usize], stride: usize, pad: usize) -> Result<Geometry> {
        let (&[n, cin, h, w], &[cout, wcin, kh, kw]) = (x, weight) else {
            candle_core::bail!(
                "{NAME}: input {x:?} and weight {weight:?} must both have 4 dimensions"
            )
        };
        if wcin != cin || kh == 0 || kw == 0 {
            candle_core::bail!("{NAME}: weight {weight:?} does not fit input {x:?}");
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "{NAME}: kernel {kh}x{kw} larger than the padded input {h}x{w} (+{pad})"
            );
        }
        Ok(Geometry {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (w + 2 * pad - kw) / stride + 1,
        })
    }

    /// Rows of the column matrix.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output pixels per channel.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    fn input_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn output_len(&self) -> usize {
        self.cout * self.p()
    }

    /// The input itself is the column matrix.
    fn direct(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Calls `f(row of the column matrix, channel, ky, kx)` for every kernel tap, in row order.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut row = 0;
        for ci in 0..self.cin {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    f(row, ci, ky, kx);
                    row += 1;
                }
            }
        }
    }

    /// Unfolds one sample `[cin, h, w]` into `col [k, p]`.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (p, wo, s, pad) = (self.p(), self.wo, self.stride, self.pad);
        self.for_each_tap(|row, ci, ky, kx| {
            let plane = &x[ci * self.h * self.w..][..self.h * self.w];
            let dst = &mut col[row * p..][..p];
            let (oy_lo, oy_hi) = valid(ky, pad, s, self.h, self.ho);
            let (lo, hi) = valid(kx, pad, s, self.w, wo);
            dst[..oy_lo * wo].fill(0.0);
            dst[oy_hi * wo..].fill(0.0);
            for oy in oy_lo..oy_hi {
                let out = &mut dst[oy * wo..][..wo];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                if lo == hi {
                    continue;
                }
                let first = (oy * s + ky - pad) * self.w + lo * s + kx - pad;
                let src = &plane[first..first + (hi - lo - 1) * s + 1];
                if s == 1 {
                    out[lo..hi].copy_from_slice(src);
                } else {
                    for (j, o) in out[lo..hi].iter_mut().enumerate() {
                        *o = src[j * s];
                    }
                }
            }
        });
    }

    /// Folds `col [k, p]` back onto one sample's input gradient `[cin, h, w]`, adding.
    fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        let (p, wo, s, pad) = (self.p(), self.wo, self.stride, self.pad);
        self.for_each_tap(|row, ci, ky, kx| {
            let plane = &mut dx[ci * self.h * self.w..][..self.h * self.w];
            let src_rows = &col[row * p..][..p];
            let (oy_lo, oy_hi) = valid(ky, pad, s, self.h, self.ho);
            let (lo, hi) = valid(kx, pad, s, self.w, wo);
            if lo == hi {
                return;
            }
            for oy in oy_lo..oy_hi {
                let src = &src_rows[oy * wo + lo..oy * wo + hi];
                let first = (oy * s + ky - pad) * self.w + lo * s + kx - pad;
                let dst = &mut plane[first..first + (hi - lo - 1) * s + 1];
                if s == 1 {
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d += *v;
                    }
                } else {
                    for (j, v) in src.iter().enumerate() {
                        dst[j * s] += *v;
                    }
                }
            }
        });
    }
}

/// The output positions `[lo, hi)` along one axis whose input position `o * stride + tap - pad` lies inside
/// `[0, size)`, of `out` output positions.
fn valid(tap: usize, pad: usize, stride: usize, size: usize, out: usize) -> (usize, usize) {
    let lo = if pad > tap {
        (pad - tap).div_ceil(stride)
    } else {
        0
    };
    let hi = if size + pad > tap {
        (size + pad - tap).div_ceil(stride).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` (or `dst +=` with `accumulate`), each operand given by its row and
/// column strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the slices cover every element the strides reach (asserted above in tests; every caller derives
    // the lengths from the same geometry), and `dst` does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Runs `f(first sample, its outputs, parallelism inside)` on one chunk of samples per thread; `out` holds
/// `per_sample` values per sample. A batch smaller than the thread count runs in one chunk with a parallel
/// GEMM instead.
fn per_chunk(
    out: &mut [f32],
    n: usize,
    per_sample: usize,
    f: impl Fn(usize, &mut [f32], Parallelism) -> Result<()> + Sync,
) -> Result<()> {
    let plan = chunks(n);
    if plan.len() <= 1 {
        let inner = match threads() {
            1 => Parallelism::None,
            t => Parallelism::Rayon(t),
        };
        return f(0, out, inner);
    }
    let per = plan[0].1;
    out.par_chunks_mut(per * per_sample)
        .enumerate()
        .try_for_each(|(c, part)| f(c * per, part, Parallelism::None))
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let x = values(s1, l1, NAME)?;
        let weight = values(s2, l2, NAME)?;
        let (k, p) = (g.k(), g.p());
        let mut out = vec![0f32; g.n * g.output_len()];
        per_chunk(&mut out, g.n, g.output_len(), |first, part, par| {
            let mut col = if g.direct() {
                Vec::new()
            } else {
                vec![0f32; k * p]
            };
            for (i, dst) in part.chunks_mut(g.output_len()).enumerate() {
                let sample = &x[(first + i) * g.input_len()..][..g.input_len()];
                let col: &[f32] = if g.direct() {
                    sample
                } else {
                    g.im2col(sample, &mut col);
                    &col
                };
                matmul(
                    (g.cout, p, k),
                    dst,
                    false,
                    &weight,
                    (k, 1),
                    col,
                    (p, 1),
                    par,
                );
            }
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(x.dims(), weight.dims(), self.stride, self.padding)?;
        with_values(grad, NAME, |grad_values| {
            // The image batch at the bottom of the network needs no gradient: skip its col2im.
            let dx = if x.track_op() {
                let dx = with_values(weight, NAME, |w| input_gradient(&g, grad_values, w))?;
                Some(Tensor::from_vec(dx, x.dims(), x.device())?)
            } else {
                None
            };
            let dw = with_values(x, NAME, |xv| weight_gradient(&g, xv, grad_values))?;
            Ok((
                dx,
                Some(Tensor::from_vec(dw, weight.dims(), weight.device())?),
            ))
        })
    }
}

fn input_gradient(g: &Geometry, grad: &[f32], weight: &[f32]) -> Result<Vec<f32>> {
    let (k, p) = (g.k(), g.p());
    let mut dx = vec![0f32; g.n * g.input_len()];
    per_chunk(&mut dx, g.n, g.input_len(), |first, part, par| {
        let mut col = if g.direct() {
            Vec::new()
        } else {
            vec![0f32; k * p]
        };
        for (i, dst) in part.chunks_mut(g.input_len()).enumerate() {
            let gout = &grad[(first + i) * g.output_len()..][..g.output_len()];
            // weightᵀ [k, cout] · grad_out [cout, p]
            if g.direct() {
                matmul(
                    (k, p, g.cout),
                    dst,
                    false,
                    weight,
                    (1, k),
                    gout,
                    (p, 1),
                    par,
                );
            } else {
                matmul(
                    (k, p, g.cout),
                    &mut col,
                    false,
                    weight,
                    (1, k),
                    gout,
                    (p, 1),
                    par,
                );
                g.col2im(&col, dst);
            }
        }
        Ok(())
    })?;
    Ok(dx)
}

fn weight_gradient(g: &Geometry, x: &[f32], grad: &[f32]) -> Result<Vec<f32>> {
    let (k, p) = (g.k(), g.p());
    let plan = chunks(g.n);
    let inner = match (plan.len(), threads()) {
        (1, t) if t > 1 => Parallelism::Rayon(t),
        _ => Parallelism::None,
    };
    let partials: Vec<Vec<f32>> = plan
        .par_iter()
        .map(|&(first, count)| {
            let mut dw = vec![0f32; g.cout * k];
            let mut col = if g.direct() {
                Vec::new()
            } else {
                vec![0f32; k * p]
            };
            for i in first..first + count {
                let sample = &x[i * g.input_len()..][..g.input_len()];
                let gout = &grad[i * g.output_len()..][..g.output_len()];
                let col: &[f32] = if g.direct() {
                    sample
                } else {
                    g.im2col(sample, &mut col);
                    &col
                };
                // grad_out [cout, p] · columnsᵀ [p, k]
                matmul(
                    (g.cout, k, p),
                    &mut dw,
                    i > first,
                    gout,
                    (p, 1),
                    col,
                    (1, p),
                    inner,
                );
            }
            dw
        })
        .collect();
    let mut total = partials.into_iter();
    let mut dw = total.next().unwrap_or_else(|| vec![0f32; g.cout * k]);
    for part in total {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    Ok(dw)
}
