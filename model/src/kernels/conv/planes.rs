//! The layout the convolution reads images in, so that every kernel tap is one offset.
//!
//! Each channel is split into its `s x s` phase planes (stride `s`: pixel `(y, x)` lies in phase
//! `(y % s, x % s)` at `(y / s, x / s)`), and each plane is zero-padded: `ty` rows above, `tx` columns to the
//! left, rows `wp` long, planes `len` floats apart. Output `(oy, ox)`, flattened with the same row length
//! as `j = oy * wp + ox`, then reads tap `t`'s plane at `j + offset(t)`: a convolution is a sum of shifted
//! planes, a GEMM whose right-hand rows are never copied out. Columns `wo..wp` of each flattened output row
//! are junk (they read across the padding) and are dropped; every valid output reads only its own padded
//! row, and everything outside the image reads zeros.

use super::Geometry;

/// One kernel tap: the phase plane it reads (`py * s + px`) and its offset in that plane.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tap {
    pub phase: usize,
    pub offset: usize,
}

#[derive(Debug, Clone)]
pub(super) struct Planes {
    s: usize,
    /// Rows and columns of a phase plane's image part.
    ph: usize,
    pw: usize,
    /// Zero rows above and columns to the left of it.
    ty: usize,
    tx: usize,
    /// Row length of a padded plane and of the flattened output.
    pub wp: usize,
    /// Floats from one plane to the next: the padded rows, `tx` zeros for the last row's reads past its
    /// end, and `slack` more, so that a tile running past a plane's last row stays inside it.
    pub len: usize,
    /// In `(ky, kx)` order, as the weight's last two axes.
    pub taps: Vec<Tap>,
    pub max_offset: usize,
}

impl Planes {
    /// The layout for geometry `g`, with `slack` floats after every plane (a tile's width).
    pub fn new(g: &Geometry, slack: usize) -> Planes {
        let s = g.stride;
        let (ph, pw) = g.phase_dims();
        // Along one axis, kernel index k reads phase `(k - pad) mod s` at shift `(k - pad) div s`.
        let axis = |k: usize| {
            let t = k as isize - g.pad as isize;
            (t.rem_euclid(s as isize) as usize, t.div_euclid(s as isize))
        };
        let shifts = |n: usize| (0..n).map(|k| axis(k).1);
        let min_dy = shifts(g.kh).min().unwrap_or(0);
        let max_dy = shifts(g.kh).max().unwrap_or(0);
        let min_dx = shifts(g.kw).min().unwrap_or(0);
        let max_dx = shifts(g.kw).max().unwrap_or(0);
        let ty = (-min_dy).max(0) as usize;
        let tx = (-min_dx).max(0) as usize;
        // Valid outputs read columns up to `wo - 1 + max_dx + tx` and rows up to `ho - 1 + max_dy + ty`: a
        // read past a row's end lands in the next row's `tx` zero columns (or the plane's slack), so rows
        // need only `wo + max_dx` floats besides the image. The input gradient needs `wp - tx >= wo`, so that
        // a read left of a row lands on the row above's junk columns.
        let wp = (tx + pw)
            .max((g.wo as isize + max_dx).max(0) as usize)
            .max(g.wo + tx);
        let hp = ty + ph.max(g.ho + max_dy.max(0) as usize);
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            let (py, dy) = axis(ky);
            for kx in 0..g.kw {
                let (px, dx) = axis(kx);
                taps.push(Tap {
                    phase: py * s + px,
                    offset: (dy + ty as isize) as usize * wp + (dx + tx as isize) as usize,
                });
            }
        }
        let max_offset = taps.iter().map(|t| t.offset).max().unwrap_or(0);
        Planes {
            s,
            ph,
            pw,
            ty,
            tx,
            wp,
            len: hp * wp + tx + slack,
            taps,
            max_offset,
        }
    }

    /// Planes per channel.
    pub fn phases(&self) -> usize {
        self.s * self.s
    }

    /// Where plane `(channel, phase)`'s first float lies.
    pub fn plane(&self, channel: usize, phase: usize) -> usize {
        (channel * self.phases() + phase) * self.len
    }

    /// Where each step `(channel, tap)` of a sum over `channels` input channels starts reading, in the
    /// weight's order (channel major, then the taps in `(ky, kx)` order).
    pub fn offsets(&self, channels: usize) -> Vec<usize> {
        let taps = self.taps.len();
        (0..channels * taps)
            .map(|r| {
                let tap = self.taps[r % taps];
                self.plane(r / taps, tap.phase) + tap.offset
            })
            .collect()
    }

    /// Floats one sample of `channels` channels takes when tiles read `reach` flattened positions past each
    /// step's start: the planes, or further where the last plane's reads run past them.
    pub fn sample_len(&self, channels: usize, reach: usize) -> usize {
        let last = self.plane(channels - 1, self.phases() - 1);
        (channels * self.phases() * self.len).max(last + self.max_offset + reach)
    }

    /// The kernel taps that read phase plane `phase`.
    pub fn taps_of(&self, phase: usize) -> Vec<usize> {
        (0..self.taps.len())
            .filter(|&t| self.taps[t].phase == phase)
            .collect()
    }

    /// Where input pixel `(y, x)` of `channel` lies.
    fn at(&self, channel: usize, y: usize, x: usize) -> usize {
        let s = self.s;
        self.plane(channel, (y % s) * s + x % s) + (self.ty + y / s) * self.wp + self.tx + x / s
    }

    /// The first flattened position of an image row in a plane, and how many there are (whole rows): the
    /// range the input gradient is computed over.
    pub fn image_rows(&self) -> (usize, usize) {
        (self.ty * self.wp, self.ph * self.wp)
    }

    /// Zero columns left of each plane's image.
    pub fn left(&self) -> usize {
        self.tx
    }

    /// Writes one sample `[channels, h, w]` into `out` (zeroed by the caller once; the padding is never
    /// written).
    pub fn split(&self, channels: usize, h: usize, w: usize, x: &[f32], out: &mut [f32]) {
        let s = self.s;
        for c in 0..channels {
            let plane = &x[c * h * w..][..h * w];
            for (y, row) in plane.chunks_exact(w).enumerate() {
                if s == 1 {
                    let at = self.at(c, y, 0);
                    out[at..at + w].copy_from_slice(row);
                    continue;
                }
                if s == 2 && w >= 2 {
                    // Even and odd columns to their two planes in one pass over pairs (the general loop's
                    // strided reads cost a tenth of the default network's step).
                    let (even, odd) = (self.at(c, y, 0), self.at(c, y, 1));
                    let (head, tail) = out.split_at_mut(odd);
                    let pairs = row.chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        head[even + w / 2] = *last;
                    }
                    let both = head[even..even + w / 2].iter_mut().zip(&mut tail[..w / 2]);
                    for ((e, o), pair) in both.zip(pairs) {
                        *e = pair[0];
                        *o = pair[1];
                    }
                    continue;
                }
                for px in 0..s.min(w) {
                    let at = self.at(c, y, px);
                    for (d, v) in out[at..at + self.pw]
                        .iter_mut()
                        .zip(row[px..].iter().step_by(s))
                    {
                        *d = *v;
                    }
                }
            }
        }
    }

    /// Reads one sample's `[channels, h, w]` back out of planes laid out like `split`'s.
    pub fn merge(&self, channels: usize, h: usize, w: usize, planes: &[f32], out: &mut [f32]) {
        let s = self.s;
        for c in 0..channels {
            let image = &mut out[c * h * w..][..h * w];
            for (y, row) in image.chunks_exact_mut(w).enumerate() {
                if s == 1 {
                    let at = self.at(c, y, 0);
                    row.copy_from_slice(&planes[at..at + w]);
                    continue;
                }
                if s == 2 && w >= 2 {
                    // As `split`'s: pairs of columns from the two planes.
                    let (even, odd) = (self.at(c, y, 0), self.at(c, y, 1));
                    let mut pairs = row.chunks_exact_mut(2);
                    let both = planes[even..even + w / 2]
                        .iter()
                        .zip(&planes[odd..odd + w / 2]);
                    for (pair, (e, o)) in pairs.by_ref().zip(both) {
                        pair[0] = *e;
                        pair[1] = *o;
                    }
                    if let [last] = pairs.into_remainder() {
                        *last = planes[even + w / 2];
                    }
                    continue;
                }
                for px in 0..s.min(w) {
                    let at = self.at(c, y, px);
                    for (d, v) in row[px..]
                        .iter_mut()
                        .step_by(s)
                        .zip(&planes[at..at + self.pw])
                    {
                        *d = *v;
                    }
                }
            }
        }
    }
}
