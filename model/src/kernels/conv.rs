//! 2-D convolution (no bias, no dilation, one group), forward and both backward passes, as direct
//! convolutions: no unfolded (im2col) matrix is ever built.
//!
//! Each sample is copied once into zero-padded phase planes (`planes`), where every kernel tap is one offset,
//! and every pass is a GEMM computed tile by tile by one register-blocked micro-kernel (`tile`: AVX-512, AVX2
//! or portable code), in BLIS's loop order (`tiles`):
//!
//! - forward: output channels as the tiles' rows, the shifted planes themselves as their columns; where the
//!   planes' padding columns would add more than a fifth of work (small planes), output positions as rows
//!   and output channels as columns instead (`forward_by_position`);
//! - input gradient: the same, phase plane by phase plane, on the zero-padded output gradient with the
//!   transposed weight (`input_gradient`, `input_gradient_by_position`);
//! - weight gradient: `(cin, tap)` as rows and output channels as columns, summed over the image's own
//!   output positions and the samples (`weight_gradient`).
//!
//! Every output's sum runs in one order, with fused multiply-adds, whatever the instruction set: the three
//! give the same bits. Memory: a padded copy of a few samples' input and output per thread.

mod planes;
mod tile;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use self::planes::Planes;
pub use self::tile::Isa;
use self::tile::{Cols, Gathered, Packed, Rows, Shifted, Strided, MAX_MR};
use super::{chunks, parallel, threads, values, with_values};

const NAME: &str = "fedslm-conv2d";

/// `x [n, cin, h, w]` convolved with `weight [cout, cin, kh, kw]`, zero padding `padding` on every side.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_on(Isa::best(), x, weight, stride, padding)
}

/// The same on a given instruction set (one of `Isa::available()`), forward and backward: the tests run each.
pub fn conv2d_on(
    isa: Isa,
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if stride == 0 {
        candle_core::bail!("{NAME}: stride 0");
    }
    if !isa.runs() {
        candle_core::bail!("{NAME}: this CPU does not run {isa:?}");
    }
    Geometry::new(x.dims(), weight.dims(), stride, padding)?;
    x.apply_op2(
        weight,
        Conv2d {
            stride,
            padding,
            isa,
        },
    )
}

struct Conv2d {
    stride: usize,
    padding: usize,
    isa: Isa,
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
        if cin == 0 || cout == 0 {
            candle_core::bail!("{NAME}: input {x:?} and weight {weight:?} need channels");
        }
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

    /// Terms of each output's sum: input channels times kernel taps.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    fn input_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn output_len(&self) -> usize {
        self.cout * self.ho * self.wo
    }

    /// Height and width of the phase planes: with stride `s`, input pixel `(y, x)` lies in phase
    /// `(y % s, x % s)` at `(y / s, x / s)`.
    fn phase_dims(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }
}

/// Steps of a sum taken per pass over the tiles: one tile's left-hand block (`mr x KC`, 16 KiB with AVX-512)
/// stays in L1 while the columns go by. Measured on ResNet-18's layers against 128, 256 and 1024
/// (BENCHMARKS.md): 512 was as fast as the best of them on every layer.
const KC: usize = 512;

/// Tiles per block of rows: their left-hand blocks stay in L2 while every column goes by.
const MC: usize = 64;

/// Floats of a weight gradient (1 MiB) above which the threads split its tiles rather than its samples.
const SPLIT_GRADIENT: usize = 1 << 18;

/// Samples the forward pass and the input gradient take together: at most this many output positions. Small
/// planes (ResNet-18's last stage: 7 x 7) then give their tiles many columns per block of the weight.
const GROUP_POSITIONS: usize = 2048;

/// The row length of a matrix whose rows a tile reads one after the other: one cache line more than its
/// `cols`, so that rows of a power-of-two length (512 channels: 2 KiB) do not all fall into the same few
/// sets of the L1 cache.
fn row_stride(cols: usize) -> usize {
    cols + 16
}

/// Samples one pass over the tiles takes together: as many as `budget` output positions hold (at least one),
/// at most one thread's share of the batch.
fn samples_per_pass(budget: usize, positions: usize, n: usize) -> usize {
    (budget / positions.max(1)).clamp(1, chunks(n).first().map_or(1, |c| c.1))
}

/// Samples `first..first + samples` of `x`, each split into its phase planes, side by side in `input`
/// `input_len` apart: a forward pass's input for one pass over the tiles.
fn split_samples(
    g: &Geometry,
    planes: &Planes,
    x: &[f32],
    first: usize,
    samples: usize,
    input: &mut [f32],
    input_len: usize,
) {
    for s in 0..samples {
        let sample = &x[(first + s) * g.input_len()..][..g.input_len()];
        planes.split(g.cin, g.h, g.w, sample, &mut input[s * input_len..]);
    }
}

/// Where each of tile `t`'s rows starts, `start(row)` for rows below `rows`; rows past the last repeat it
/// (their sums are dropped).
fn row_starts(t: usize, mr: usize, rows: usize, start: impl Fn(usize) -> usize) -> [usize; MAX_MR] {
    let mut base = [0usize; MAX_MR];
    for (b, q) in base.iter_mut().zip(t * mr..(t + 1) * mr) {
        *b = start(q.min(rows - 1));
    }
    base
}

/// Whether a pass is better done with positions as the tiles' rows (`*_by_position`, for enough channels to
/// fill a tile's columns): where the flattened planes' junk columns and the rounding to whole tiles would add
/// more than a fifth to the `valid` positions (ResNet-18's 7 x 7 planes: 64 for 49). Elsewhere channels as
/// rows measured as fast or faster (BENCHMARKS.md).
fn by_position(computed: usize, valid: usize) -> bool {
    computed * 5 > valid * 6
}

/// A float, or room for one not yet written.
trait Float {
    fn new(v: f32) -> Self;
}

impl Float for f32 {
    fn new(v: f32) -> f32 {
        v
    }
}

impl Float for std::mem::MaybeUninit<f32> {
    fn new(v: f32) -> Self {
        std::mem::MaybeUninit::new(v)
    }
}

/// `dst[c * dst_cs + r * dst_rs] = src[r * src_rs + c]` for `r < rows`, `c < cols`, in 16 x 16 blocks so
/// that both sides stay in cache; `dst` holds floats, or not yet initialised ones (`MaybeUninit<f32>`).
fn transpose<T: Float>(
    src: &[f32],
    (src_rs, rows, cols): (usize, usize, usize),
    dst: &mut [T],
    (dst_cs, dst_rs): (usize, usize),
) {
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..cols).step_by(16) {
            for r in r0..rows.min(r0 + 16) {
                for c in c0..cols.min(c0 + 16) {
                    dst[c * dst_cs + r * dst_rs] = T::new(src[r * src_rs + c]);
                }
            }
        }
    }
}

/// A GEMM tile by tile: `c`'s rows are `mr()`-row tiles `first_tile..`, tile `t`'s row `i` at
/// `(t - first_tile) * mr + i` times `ldc`, its columns from `base` on, `cols` of them (a multiple of `nr()`).
/// Each tile sums `depth` steps in each of `segments` (samples whose sums add up): `rows(t, segment, k0)` and
/// `cols_at(j, segment, k0)` give the operands of tile `t` and of the columns from `j`, from step `k0` on.
/// With `parallel`, the tiles are split over the threads.
#[allow(clippy::too_many_arguments)]
fn tiles<A: Rows, B: Cols>(
    isa: Isa,
    c: &mut [f32],
    (ldc, base, cols): (usize, usize, usize),
    first_tile: usize,
    (depth, segments): (usize, usize),
    rows: &(impl Fn(usize, usize, usize) -> A + Sync),
    cols_at: &(impl Fn(usize, usize, usize) -> B + Sync),
    accumulate: bool,
    parallel: bool,
) {
    let (mr, nr) = (isa.mr(), isa.nr());
    let per_tile = mr * ldc;
    let count = c.len() / per_tile;
    assert!(c.len() == count * per_tile && base + cols <= ldc && cols % nr == 0 && depth > 0);
    if parallel && count > 1 {
        let per = count.div_ceil(threads());
        c.par_chunks_mut(per * per_tile)
            .enumerate()
            .for_each(|(p, part)| {
                let first = first_tile + p * per;
                let shape = (ldc, base, cols);
                let sum = (depth, segments);
                tiles(
                    isa, part, shape, first, sum, rows, cols_at, accumulate, false,
                )
            });
        return;
    }
    // BLIS's loops: blocks of the sum, then blocks of `MC` tiles, then columns, then the block's tiles. A
    // column's right-hand block (`KC x nr`) stays in L1 over a block's tiles, the tiles' left-hand blocks
    // in L2 over the columns.
    for k0 in (0..depth).step_by(KC) {
        let kc = KC.min(depth - k0);
        for block in (0..count).step_by(MC) {
            for j in (0..cols).step_by(nr) {
                for t in block..count.min(block + MC) {
                    for segment in 0..segments {
                        let a = rows(first_tile + t, segment, k0);
                        let b = cols_at(j, segment, k0);
                        let add = accumulate || k0 > 0 || segment > 0;
                        // SAFETY: the tile writes rows `t * mr..(t + 1) * mr` of `c` (inside: `c` holds
                        // `count` tiles) at columns `base + j..base + j + nr` (inside `ldc`, asserted); the
                        // callers size the operands for every tile, column and step they ask for.
                        unsafe {
                            let at = c.as_mut_ptr().add(t * per_tile + base + j);
                            isa.tile(kc, &a, &b, at, ldc, add)
                        }
                    }
                }
            }
        }
    }
}

/// Runs `f(first sample, its outputs, parallel inside)` on one chunk of samples per thread; `out` holds
/// `per_sample` values per sample. A batch smaller than the thread count runs in one chunk, split over the
/// threads inside instead.
fn per_chunk<T: Send>(
    out: &mut [T],
    n: usize,
    per_sample: usize,
    f: impl Fn(usize, &mut [T], bool) + Sync,
) {
    let plan = chunks(n);
    if plan.len() <= 1 {
        return f(0, out, threads() > 1);
    }
    let per = plan[0].1;
    out.par_chunks_mut(per * per_sample)
        .enumerate()
        .for_each(|(c, part)| f(c * per, part, false))
}

/// A new output of `n` samples of `per_sample` values made as `per_chunk` makes it, without zeroing it first
/// (as `kernels::new_per_plane`).
///
/// # Safety
/// `f(first, part, parallel)` must write every value of the `part` it is given.
unsafe fn new_per_chunk(
    n: usize,
    per_sample: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>], bool) + Sync,
) -> Vec<f32> {
    let len = n * per_sample;
    let mut out = Vec::with_capacity(len);
    per_chunk(&mut out.spare_capacity_mut()[..len], n, per_sample, f);
    // SAFETY: the parts cover `len` values, and the caller's `f` wrote each.
    unsafe { out.set_len(len) };
    out
}

/// `f` on `len` floats of the calling thread's scratch space, kept from one call to the next, not zeroed:
/// for the tiles' products, which the tiles overwrite whole (zeroing a fresh one per call was, with the
/// output's, most of a convolution's time outside its tiles in the default network's inference).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Taken out while in use: a nested call on this thread (a stolen job) gets a buffer of its own.
    let mut buf = SCRATCH.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        if s.borrow().len() < buf.len() {
            s.replace(buf);
        }
    });
    r
}

/// `weight [rows, depth]` (row-major, or read through `at(row, k)`) in tiles of `mr` rows, each step's `mr`
/// values together: `Packed`'s order. Rows past `rows` are zero.
fn pack(rows: usize, depth: usize, mr: usize, at: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let tiles = rows.div_ceil(mr);
    let mut out = vec![0f32; tiles * depth * mr];
    for t in 0..tiles {
        let panel = &mut out[t * depth * mr..][..depth * mr];
        for i in 0..mr.min(rows - t * mr) {
            for k in 0..depth {
                panel[k * mr + i] = at(t * mr + i, k);
            }
        }
    }
    out
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
        let out = forward(&g, self.isa, &x, &weight);
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
            // The image batch at the bottom of the network needs no gradient.
            let dx = if x.track_op() {
                let dx = with_values(weight, NAME, |w| {
                    Ok(input_gradient(&g, self.isa, grad_values, w))
                })?;
                Some(Tensor::from_vec(dx, x.dims(), x.device())?)
            } else {
                None
            };
            let dw = with_values(x, NAME, |xv| {
                Ok(weight_gradient(&g, self.isa, xv, grad_values))
            })?;
            Ok((
                dx,
                Some(Tensor::from_vec(dw, weight.dims(), weight.device())?),
            ))
        })
    }
}

/// `out [cout, ho·wp] = weight [cout, k] · planes(tap)`, then the junk columns dropped.
fn forward(g: &Geometry, isa: Isa, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (mr, nr, k) = (isa.mr(), isa.nr(), g.k());
    let planes = Planes::new(g, nr);
    let offsets = planes.offsets(g.cin);
    let cols = (g.ho * planes.wp).next_multiple_of(nr);
    if g.cout >= nr && by_position(cols, g.ho * g.wo) {
        return forward_by_position(g, isa, &planes, &offsets, x, weight);
    }
    let packed = pack(g.cout, k, mr, |o, r| weight[o * k + r]);
    let m = g.cout.next_multiple_of(mr);
    // Tiles read `cols` positions past each step's start.
    let input_len = planes.sample_len(g.cin, cols);
    // Small planes: several samples side by side in one pass, so that the weight's blocks are read once for
    // all of them.
    let group = samples_per_pass(GROUP_POSITIONS, cols, g.n);
    // SAFETY: every sample's output channels, rows and columns are written at the end of its pass.
    unsafe {
        new_per_chunk(g.n, g.output_len(), |first, part, parallel| {
            let mut input = vec![0f32; group * input_len];
            with_scratch(m * group * cols, |c| {
                for (nth, dst) in part.chunks_mut(group * g.output_len()).enumerate() {
                    let samples = dst.len() / g.output_len();
                    split_samples(
                        g,
                        &planes,
                        x,
                        first + nth * group,
                        samples,
                        &mut input,
                        input_len,
                    );
                    let ldc = samples * cols;
                    tiles(
                        isa,
                        &mut c[..m * ldc],
                        (ldc, 0, ldc),
                        0,
                        (k, 1),
                        &|t, _, k0| Packed {
                            data: &packed[(t * k + k0) * mr..],
                            mr,
                        },
                        &|j, _, k0| Shifted {
                            data: &input,
                            base: (j / cols) * input_len + j % cols,
                            offsets: &offsets[k0..],
                        },
                        false,
                        parallel,
                    );
                    for (s, dst) in dst.chunks_exact_mut(g.output_len()).enumerate() {
                        for (o, image) in dst.chunks_exact_mut(g.ho * g.wo).enumerate() {
                            for (oy, row) in image.chunks_exact_mut(g.wo).enumerate() {
                                let from = &c[o * ldc + s * cols + oy * planes.wp..][..g.wo];
                                for (d, v) in row.iter_mut().zip(from) {
                                    d.write(*v);
                                }
                            }
                        }
                    }
                }
            });
        })
    }
}

/// The GEMM of the passes with positions as the tiles' rows: `c [row, col] = Σ_k data[at(row) + offsets[k]] ·
/// weight[k * ldw + col]` for `row < rows` and `col < cols` (`c`'s first `rows` rounded up to whole tiles,
/// `cols` long each, are written).
fn by_position_gemm(
    isa: Isa,
    c: &mut [f32],
    (rows, cols): (usize, usize),
    (data, at, offsets): (&[f32], &(impl Fn(usize) -> usize + Sync), &[usize]),
    (weight, ldw): (&[f32], usize),
    parallel: bool,
) {
    let mr = isa.mr();
    tiles(
        isa,
        &mut c[..rows.next_multiple_of(mr) * cols],
        (cols, 0, cols),
        0,
        (offsets.len(), 1),
        &|t, _, k0| Gathered {
            data,
            base: row_starts(t, mr, rows, at),
            offsets: &offsets[k0..],
        },
        &|j, _, k0| Strided {
            data: weight,
            base: k0 * ldw + j,
            stride: ldw,
        },
        false,
        parallel,
    );
}

/// The forward pass with output positions as the tiles' rows and output channels as their columns (for
/// `cout >= nr`): `out [position, cout] = Σ_(cin, tap) planes(tap)[position] · weight`, only the image's own
/// positions computed (no junk columns, no rounding of small planes), the output transposed at the end.
fn forward_by_position(
    g: &Geometry,
    isa: Isa,
    planes: &Planes,
    offsets: &[usize],
    x: &[f32],
    weight: &[f32],
) -> Vec<f32> {
    let (mr, nr, k) = (isa.mr(), isa.nr(), g.k());
    let cols = g.cout.next_multiple_of(nr);
    let ldw = row_stride(cols);
    let mut packed = vec![0f32; k * ldw];
    for (o, w) in weight.chunks_exact(k).enumerate() {
        for (r, v) in w.iter().enumerate() {
            packed[r * ldw + o] = *v;
        }
    }
    let positions = g.ho * g.wo;
    let input_len = planes.sample_len(g.cin, g.ho * planes.wp);
    let group = samples_per_pass(GROUP_POSITIONS, positions, g.n);
    // SAFETY: every sample's `cout x positions` outputs are written by its transpose at the end of its pass.
    unsafe {
        new_per_chunk(g.n, g.output_len(), |first, part, parallel| {
            let mut input = vec![0f32; group * input_len];
            with_scratch((group * positions).next_multiple_of(mr) * cols, |c| {
                for (nth, dst) in part.chunks_mut(group * g.output_len()).enumerate() {
                    let samples = dst.len() / g.output_len();
                    split_samples(
                        g,
                        planes,
                        x,
                        first + nth * group,
                        samples,
                        &mut input,
                        input_len,
                    );
                    let rows = samples * positions;
                    let at = |q: usize| {
                        let (s, p) = (q / positions, q % positions);
                        s * input_len + (p / g.wo) * planes.wp + p % g.wo
                    };
                    by_position_gemm(
                        isa,
                        c,
                        (rows, cols),
                        (&input, &at, offsets),
                        (&packed, ldw),
                        parallel,
                    );
                    for (s, dst) in dst.chunks_exact_mut(g.output_len()).enumerate() {
                        let rows = &c[s * positions * cols..];
                        transpose(rows, (cols, positions, g.cout), dst, (positions, 1));
                    }
                }
            });
        })
    }
}

/// Phase plane by phase plane, `dplanes [cin, plane] = weightᵀ [cin, (cout, taps of the phase)] · shifted
/// grad_out`, over the plane's image rows only, then merged back into `[cin, h, w]`.
fn input_gradient(g: &Geometry, isa: Isa, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    let (mr, nr) = (isa.mr(), isa.nr());
    let planes = Planes::new(g, nr);
    let (wp, taps) = (planes.wp, planes.taps.len());
    let (first_row, rows) = planes.image_rows();
    let cols = rows.next_multiple_of(nr);
    // The output gradient flattened with row length `wp` (junk columns zero), `front` zeros before it so
    // that every tap's backward shift stays inside, and zeros after for the last tile's overrun.
    let front = planes.max_offset;
    let per_channel = front + (g.ho * wp).max(first_row + cols);
    let gout_len = g.cout * per_channel + front + cols + wp;
    let layout = GradientLayout {
        front,
        per_channel,
        gout_len,
    };
    let (ph, pw) = g.phase_dims();
    if g.cin >= nr && by_position(cols, ph * pw) {
        return input_gradient_by_position(g, isa, &planes, &layout, grad, weight);
    }
    let m = g.cin.next_multiple_of(mr);
    // Per phase, the taps that read it and the packed transposed weight over (cout, those taps).
    let phases: Vec<(Vec<usize>, Vec<f32>)> = (0..planes.phases())
        .map(|phase| {
            let (steps, offsets) = layout.steps(&planes, g.cout, phase);
            let packed = pack(g.cin, steps.len(), mr, |ci, r| {
                let (o, t) = steps[r];
                weight[(o * g.cin + ci) * taps + t]
            });
            (offsets, packed)
        })
        .collect();
    let mut dx = vec![0f32; g.n * g.input_len()];
    per_chunk(&mut dx, g.n, g.input_len(), |first, part, parallel| {
        let mut gout = vec![0f32; gout_len];
        let mut dplanes = vec![0f32; m * planes.phases() * planes.len];
        for (i, dst) in part.chunks_mut(g.input_len()).enumerate() {
            let sample = &grad[(first + i) * g.output_len()..][..g.output_len()];
            layout.fill(g, wp, sample, &mut gout);
            for (phase, (offsets, packed)) in phases.iter().enumerate() {
                let depth = offsets.len();
                if depth == 0 {
                    continue; // no tap reads this phase: its gradient stays zero
                }
                tiles(
                    isa,
                    &mut dplanes,
                    (
                        planes.phases() * planes.len,
                        phase * planes.len + first_row,
                        cols,
                    ),
                    0,
                    (depth, 1),
                    &|t, _, k0| Packed {
                        data: &packed[(t * depth + k0) * mr..],
                        mr,
                    },
                    &|j, _, k0| Shifted {
                        data: &gout,
                        base: first_row + j,
                        offsets: &offsets[k0..],
                    },
                    false,
                    parallel,
                );
            }
            planes.merge(g.cin, g.h, g.w, &dplanes, dst);
        }
    });
    dx
}

/// The output gradient as the input gradient reads it: each channel flattened with row length `wp` (junk
/// columns zero) after `front` zeros, so that every tap's backward shift stays inside, `per_channel` floats
/// apart, `gout_len` in all.
struct GradientLayout {
    front: usize,
    per_channel: usize,
    gout_len: usize,
}

impl GradientLayout {
    /// Copies one sample's `[cout, ho, wo]` in (the zeros around it are the buffer's since allocation).
    fn fill(&self, g: &Geometry, wp: usize, sample: &[f32], gout: &mut [f32]) {
        for (o, image) in sample.chunks_exact(g.ho * g.wo).enumerate() {
            for (oy, row) in image.chunks_exact(g.wo).enumerate() {
                gout[o * self.per_channel + self.front + oy * wp..][..g.wo].copy_from_slice(row);
            }
        }
    }

    /// The steps `(output channel, tap)` of phase plane `phase`'s sums, channel major, and where each reads,
    /// relative to the input position it serves.
    fn steps(
        &self,
        planes: &Planes,
        cout: usize,
        phase: usize,
    ) -> (Vec<(usize, usize)>, Vec<usize>) {
        let taps = planes.taps_of(phase);
        let steps: Vec<(usize, usize)> = (0..cout)
            .flat_map(|o| taps.iter().map(move |&t| (o, t)))
            .collect();
        let offsets = steps
            .iter()
            .map(|&(o, t)| o * self.per_channel + self.front - planes.taps[t].offset)
            .collect();
        (steps, offsets)
    }
}

/// The input gradient with input positions as the tiles' rows and input channels as their columns (for
/// `cin >= nr`), phase by phase: `dx [position, cin] = Σ_(cout, taps of the phase) shifted grad_out ·
/// weight`, only the image's own positions computed, transposed into `[cin, h, w]` at the end.
fn input_gradient_by_position(
    g: &Geometry,
    isa: Isa,
    planes: &Planes,
    layout: &GradientLayout,
    grad: &[f32],
    weight: &[f32],
) -> Vec<f32> {
    let (mr, nr, s) = (isa.mr(), isa.nr(), g.stride);
    let (ph, pw) = g.phase_dims();
    let (first_row, _) = planes.image_rows();
    let taps = planes.taps.len();
    let cols = g.cin.next_multiple_of(nr);
    let ldw = row_stride(cols);
    // Per phase, the (cout, tap) steps that read it and the weight `[step, cin]`.
    let phases: Vec<(Vec<usize>, Vec<f32>)> = (0..planes.phases())
        .map(|phase| {
            let (steps, offsets) = layout.steps(planes, g.cout, phase);
            let mut packed = vec![0f32; steps.len() * ldw];
            for (r, &(o, t)) in steps.iter().enumerate() {
                for ci in 0..g.cin {
                    packed[r * ldw + ci] = weight[(o * g.cin + ci) * taps + t];
                }
            }
            (offsets, packed)
        })
        .collect();
    let positions = ph * pw;
    let group = samples_per_pass(GROUP_POSITIONS, positions, g.n);
    let mut dx = vec![0f32; g.n * g.input_len()];
    per_chunk(&mut dx, g.n, g.input_len(), |first, part, parallel| {
        let mut gout = vec![0f32; group * layout.gout_len];
        with_scratch((group * positions).next_multiple_of(mr) * cols, |c| {
            for (nth, dst) in part.chunks_mut(group * g.input_len()).enumerate() {
                let samples = dst.len() / g.input_len();
                for i in 0..samples {
                    let sample =
                        &grad[(first + nth * group + i) * g.output_len()..][..g.output_len()];
                    layout.fill(g, planes.wp, sample, &mut gout[i * layout.gout_len..]);
                }
                let rows = samples * positions;
                let at = |q: usize| {
                    let (i, p) = (q / positions, q % positions);
                    i * layout.gout_len + first_row + (p / pw) * planes.wp + planes.left() + p % pw
                };
                for (phase, (offsets, packed)) in phases.iter().enumerate() {
                    let depth = offsets.len();
                    if depth == 0 {
                        continue; // no tap reads this phase: its gradient stays zero
                    }
                    by_position_gemm(
                        isa,
                        c,
                        (rows, cols),
                        (&gout, &at, offsets),
                        (packed, ldw),
                        parallel,
                    );
                    // Phase `(py, px)` holds input pixels `(Y s + py, X s + px)`.
                    let (py, px) = (phase / s, phase % s);
                    for (i, dst) in dst.chunks_exact_mut(g.input_len()).enumerate() {
                        for y in (py..g.h).step_by(s) {
                            let from = &c[(i * positions + (y / s) * pw) * cols..];
                            let width = (g.w - px.min(g.w)).div_ceil(s);
                            let to = &mut dst[y * g.w + px..];
                            transpose(from, (cols, width, g.cin), to, (g.h * g.w, s));
                        }
                    }
                }
            }
        });
    });
    dx
}

/// `dweightᵀ [(cin, tap), cout] = Σ_samples Σ_positions planes(tap) · grad_outᵀ`, the sum over the output
/// positions flattened with row length `wp` (junk columns zero in `grad_outᵀ`).
fn weight_gradient(g: &Geometry, isa: Isa, x: &[f32], grad: &[f32]) -> Vec<f32> {
    // Output channels are the tiles' columns: a network of 8 or 16 channels (the default one) would fill
    // a quarter or half of an AVX-512 tile's 32; AVX2's 16 waste less, and give the same bits.
    let isa = match isa {
        Isa::Avx512 if g.cout <= 16 && Isa::Avx2.runs() => Isa::Avx2,
        isa => isa,
    };
    let (mr, nr, k) = (isa.mr(), isa.nr(), g.k());
    let planes = Planes::new(g, nr);
    let offsets = planes.offsets(g.cin);
    // The sum runs over the image's own output positions only, each at its place in the flattened planes.
    let positions = g.ho * g.wo;
    let at: Vec<usize> = (0..positions)
        .map(|p| (p / g.wo) * planes.wp + p % g.wo)
        .collect();
    let input_len = planes.sample_len(g.cin, g.ho * planes.wp);
    let cols = g.cout.next_multiple_of(nr);
    let ldg = row_stride(cols);
    let gout_len = positions * ldg;
    let m = k.next_multiple_of(mr);
    // Each thread sums its own samples into a weight gradient of its own, added up at the end; where that
    // gradient is large (beyond L2's size: ResNet-18's last stages, 2304 or 4608 x 512) and outweighs a
    // thread's share of the samples, the threads split the tiles instead and take every sample, so that no
    // copy of it is made, zeroed and added (the last stage's weight gradient: 28-34 -> 20-24 ms,
    // BENCHMARKS.md). The default network's gradients stay below the bound: its sums, and so its results,
    // are unchanged.
    let mut plan = chunks(g.n);
    let share = plan.first().map_or(0, |c| c.1) * (input_len + gout_len);
    if m * ldg > share.max(SPLIT_GRADIENT) {
        plan = vec![(0, g.n)];
    }
    let inner = plan.len() <= 1 && threads() > 1;
    // Samples summed per pass: about one block of the sum, so that small planes' tiles neither stop after a
    // few steps nor outgrow the cache.
    let group = samples_per_pass(KC, positions, g.n);
    let partials: Vec<Vec<f32>> = plan
        .par_iter()
        .map(|&(first, count)| {
            let mut input = vec![0f32; group * input_len];
            let mut gout_t = vec![0f32; group * gout_len];
            let mut dw_t = vec![0f32; m * ldg];
            for (nth, start) in (first..first + count).step_by(group).enumerate() {
                let samples = group.min(first + count - start);
                // One sample's planes and transposed output gradient.
                let prepare = |(s, (input, gout)): (usize, (&mut [f32], &mut [f32]))| {
                    let i = start + s;
                    let sample = &x[i * g.input_len()..][..g.input_len()];
                    planes.split(g.cin, g.h, g.w, sample, input);
                    let sample = &grad[i * g.output_len()..][..g.output_len()];
                    transpose(sample, (positions, g.cout, positions), gout, (ldg, 1));
                };
                let (inputs, gouts) = (
                    &mut input[..samples * input_len],
                    &mut gout_t[..samples * gout_len],
                );
                if inner {
                    let each = inputs
                        .par_chunks_mut(input_len)
                        .zip(gouts.par_chunks_mut(gout_len));
                    each.enumerate().for_each(prepare);
                } else {
                    let each = inputs.chunks_mut(input_len).zip(gouts.chunks_mut(gout_len));
                    each.enumerate().for_each(prepare);
                }
                tiles(
                    isa,
                    &mut dw_t,
                    (ldg, 0, cols),
                    0,
                    (positions, samples),
                    &|t, s, k0| Gathered {
                        data: &input,
                        base: row_starts(t, mr, k, |r| s * input_len + offsets[r]),
                        offsets: &at[k0..],
                    },
                    &|j, s, k0| Strided {
                        data: &gout_t,
                        base: s * gout_len + k0 * ldg + j,
                        stride: ldg,
                    },
                    nth > 0,
                    inner,
                );
            }
            dw_t
        })
        .collect();
    // The threads' sums added and transposed to `[cout, k]`, 16 output channels (one cache line of each
    // partial row) at a time.
    let mut total = vec![0f32; g.cout * k];
    let add = |(block, out): (usize, &mut [f32])| {
        let o0 = block * 16;
        for part in &partials {
            for r in 0..k {
                let row = &part[r * ldg + o0..][..out.len() / k];
                for (o, v) in row.iter().enumerate() {
                    out[o * k + r] += *v;
                }
            }
        }
    };
    if parallel(total.len()) {
        total.par_chunks_mut(16 * k).enumerate().for_each(add);
    } else {
        total.chunks_mut(16 * k).enumerate().for_each(add);
    }
    total
}
