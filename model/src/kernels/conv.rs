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

    /// Height and width of the phase planes: with stride `s`, input pixel `(y, x)` lies in phase
    /// `(y % s, x % s)` at `(y / s, x / s)`. Every kernel tap then reads one phase plane at one offset, so that
    /// unfolding is a block copy instead of a strided gather.
    fn phase_dims(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }

    fn phases_len(&self) -> usize {
        let (ph, pw) = self.phase_dims();
        self.cin * self.stride * self.stride * ph * pw
    }

    /// Splits one sample `[cin, h, w]` into its phase planes `[cin, s, s, ph, pw]` (zero beyond the image).
    fn split_phases(&self, x: &[f32], phases: &mut [f32]) {
        let s = self.stride;
        let (ph, pw) = self.phase_dims();
        if self.h % s != 0 || self.w % s != 0 {
            phases.fill(0.0);
        }
        for ci in 0..self.cin {
            let plane = &x[ci * self.h * self.w..][..self.h * self.w];
            for (y, row) in plane.chunks_exact(self.w).enumerate() {
                let base = (ci * s + y % s) * s * ph * pw + (y / s) * pw;
                if s == 2 {
                    // The common case, in a form the compiler turns into shuffles.
                    let (even, rest) = phases[base..].split_at_mut(ph * pw);
                    let odd = &mut rest[..pw];
                    for ((e, o), pair) in
                        even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2))
                    {
                        *e = pair[0];
                        *o = pair[1];
                    }
                    if self.w % 2 == 1 {
                        even[pw - 1] = row[self.w - 1];
                    }
                    continue;
                }
                for px in 0..s.min(self.w) {
                    let at = base + px * ph * pw;
                    for (d, v) in phases[at..at + pw]
                        .iter_mut()
                        .zip(row[px..].iter().step_by(s))
                    {
                        *d = *v;
                    }
                }
            }
        }
    }

    /// Adds phase planes `[cin, s, s, ph, pw]` back onto one sample's `[cin, h, w]`.
    fn merge_phases(&self, phases: &[f32], dx: &mut [f32]) {
        let s = self.stride;
        let (ph, pw) = self.phase_dims();
        for ci in 0..self.cin {
            let plane = &mut dx[ci * self.h * self.w..][..self.h * self.w];
            for (y, row) in plane.chunks_exact_mut(self.w).enumerate() {
                for px in 0..s.min(self.w) {
                    let base = ((ci * s + y % s) * s + px) * ph * pw + (y / s) * pw;
                    for (d, v) in row[px..]
                        .iter_mut()
                        .step_by(s)
                        .zip(&phases[base..base + pw])
                    {
                        *d += *v;
                    }
                }
            }
        }
    }

    /// Every kernel tap in column-matrix row order: its row, the phase plane it reads (index into
    /// `[cin, s, s]`), and the output rows `[oy_lo, oy_hi)` and columns `[lo, hi)` inside the image with the
    /// offset `(dy, dx)` of output `(oy, ox)` in that plane: `(oy + dy, ox + dx)`.
    fn for_each_tap(&self, mut f: impl FnMut(Tap)) {
        let s = self.stride as isize;
        let (ph, pw) = self.phase_dims();
        let axis = |k: usize, extent: usize, out: usize| {
            let t = k as isize - self.pad as isize;
            let (q, phase) = (t.div_euclid(s), t.rem_euclid(s) as usize);
            let lo = (-q).max(0) as usize;
            let hi = (extent as isize - q).clamp(0, out as isize) as usize;
            (phase, q, lo.min(hi), hi)
        };
        let mut row = 0;
        for ci in 0..self.cin {
            for ky in 0..self.kh {
                let (py, dy, oy_lo, oy_hi) = axis(ky, ph, self.ho);
                for kx in 0..self.kw {
                    let (px, dx, lo, hi) = axis(kx, pw, self.wo);
                    f(Tap {
                        row,
                        plane: (ci * self.stride + py) * self.stride + px,
                        dy,
                        dx,
                        oy: (oy_lo, oy_hi),
                        ox: (lo, hi),
                    });
                    row += 1;
                }
            }
        }
    }

    /// Unfolds one sample into `col [k, p]`, from its phase planes (the sample itself with stride 1).
    fn im2col(&self, phases: &[f32], col: &mut [f32]) {
        let (p, wo) = (self.p(), self.wo);
        let (ph, pw) = self.phase_dims();
        self.for_each_tap(|t| {
            let plane = &phases[t.plane * ph * pw..][..ph * pw];
            let dst = &mut col[t.row * p..][..p];
            let ((oy_lo, oy_hi), (lo, hi)) = (t.oy, t.ox);
            if oy_lo == oy_hi || lo == hi {
                dst.fill(0.0);
                return;
            }
            let from = |oy: usize, ox: usize| {
                ((oy as isize + t.dy) * pw as isize + ox as isize + t.dx) as usize
            };
            let (start, end) = (oy_lo * wo + lo, (oy_hi - 1) * wo + hi);
            dst[..start].fill(0.0);
            dst[end..].fill(0.0);
            if wo == pw {
                // Output rows as wide as the plane's: one copy, row breaks included; the columns that fall
                // into the padding (holding the neighbouring row's pixels) are zeroed after.
                let f = from(oy_lo, lo);
                dst[start..end].copy_from_slice(&plane[f..f + (end - start)]);
                zero_outside(dst, wo, t.oy, t.ox);
            } else {
                zero_outside(dst, wo, t.oy, t.ox);
                for oy in oy_lo..oy_hi {
                    let f = from(oy, lo);
                    dst[oy * wo + lo..oy * wo + hi].copy_from_slice(&plane[f..f + (hi - lo)]);
                }
            }
        });
    }

    /// Folds `col [k, p]` onto one sample's phase planes (the sample's gradient itself with stride 1),
    /// adding. `col` is scratch: its padding columns are zeroed.
    fn col2im(&self, col: &mut [f32], phases: &mut [f32]) {
        let (p, wo) = (self.p(), self.wo);
        let (ph, pw) = self.phase_dims();
        self.for_each_tap(|t| {
            let plane = &mut phases[t.plane * ph * pw..][..ph * pw];
            let src = &mut col[t.row * p..][..p];
            let ((oy_lo, oy_hi), (lo, hi)) = (t.oy, t.ox);
            if oy_lo == oy_hi || lo == hi {
                return;
            }
            let from = |oy: usize, ox: usize| {
                ((oy as isize + t.dy) * pw as isize + ox as isize + t.dx) as usize
            };
            if wo == pw {
                // The padding's gradients must not land on the neighbouring row's pixels: zero them first.
                zero_outside(src, wo, t.oy, t.ox);
                let (start, end) = (oy_lo * wo + lo, (oy_hi - 1) * wo + hi);
                let f = from(oy_lo, lo);
                for (d, v) in plane[f..f + (end - start)].iter_mut().zip(&src[start..end]) {
                    *d += *v;
                }
            } else {
                for oy in oy_lo..oy_hi {
                    let f = from(oy, lo);
                    for (d, v) in plane[f..f + (hi - lo)]
                        .iter_mut()
                        .zip(&src[oy * wo + lo..oy * wo + hi])
                    {
                        *d += *v;
                    }
                }
            }
        });
    }
}

/// One kernel tap's place in the unfolding (see `Geometry::for_each_tap`).
struct Tap {
    row: usize,
    plane: usize,
    dy: isize,
    dx: isize,
    oy: (usize, usize),
    ox: (usize, usize),
}

/// Zeroes columns `[0, lo)` and `[hi, wo)` of output rows `[oy_lo, oy_hi)` in one column-matrix row.
fn zero_outside(
    row: &mut [f32],
    wo: usize,
    (oy_lo, oy_hi): (usize, usize),
    (lo, hi): (usize, usize),
) {
    if lo == 0 && hi == wo {
        return;
    }
    for oy in oy_lo..oy_hi {
        row[oy * wo..oy * wo + lo].fill(0.0);
        row[oy * wo + hi..(oy + 1) * wo].fill(0.0);
    }
}

/// One thread's buffers: the column matrix and, with a stride, the sample's phase planes.
struct Scratch {
    col: Vec<f32>,
    phases: Vec<f32>,
}

impl Scratch {
    fn new(g: &Geometry) -> Scratch {
        if g.direct() {
            return Scratch {
                col: Vec::new(),
                phases: Vec::new(),
            };
        }
        Scratch {
            col: vec![0f32; g.k() * g.p()],
            phases: if g.stride > 1 {
                vec![0f32; g.phases_len()]
            } else {
                Vec::new()
            },
        }
    }

    /// The column matrix of one sample (the sample itself for a 1x1 convolution of stride 1).
    fn unfold<'a>(&'a mut self, g: &Geometry, sample: &'a [f32]) -> &'a [f32] {
        if g.direct() {
            return sample;
        }
        if g.stride > 1 {
            g.split_phases(sample, &mut self.phases);
            g.im2col(&self.phases, &mut self.col);
        } else {
            g.im2col(sample, &mut self.col);
        }
        &self.col
    }

    /// Adds the column matrix in `self.col` onto one sample's input gradient.
    fn fold(&mut self, g: &Geometry, dx: &mut [f32]) {
        if g.stride > 1 {
            self.phases.fill(0.0);
            g.col2im(&mut self.col, &mut self.phases);
            g.merge_phases(&self.phases, dx);
        } else {
            g.col2im(&mut self.col, dx);
        }
    }
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
            let mut scratch = Scratch::new(&g);
            for (i, dst) in part.chunks_mut(g.output_len()).enumerate() {
                let sample = &x[(first + i) * g.input_len()..][..g.input_len()];
                let col = scratch.unfold(&g, sample);
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
        let mut scratch = Scratch::new(g);
        for (i, dst) in part.chunks_mut(g.input_len()).enumerate() {
            let gout = &grad[(first + i) * g.output_len()..][..g.output_len()];
            // weightᵀ [k, cout] · grad_out [cout, p]
            let weight_t_times = |out: &mut [f32]| {
                matmul(
                    (k, p, g.cout),
                    out,
                    false,
                    weight,
                    (1, k),
                    gout,
                    (p, 1),
                    par,
                )
            };
            if g.direct() {
                weight_t_times(dst);
            } else {
                weight_t_times(&mut scratch.col);
                scratch.fold(g, dst);
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
            let mut scratch = Scratch::new(g);
            for i in first..first + count {
                let sample = &x[i * g.input_len()..][..g.input_len()];
                let gout = &grad[i * g.output_len()..][..g.output_len()];
                let col = scratch.unfold(g, sample);
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
