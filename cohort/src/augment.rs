//! Training-side augmentation of a crop: flips, a small rotation and shift (one geometric transform for all
//! channels, so the sequences stay registered), intensity jitter per sequence, and optionally a scanner's look
//! ([`ScannerStyle`]: blur, bias field, contrast curve and noise drawn over wide ranges, so that a network cannot
//! read a scanner's noise or resolution as a property of the tumour). Draws come from the caller's seeded
//! generator.

use crate::preprocess::z_score;
use crate::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augmentation {
    /// Left-right and up-down flips, each with probability 1/2 (the tumour sits anywhere around the rectal wall).
    pub flips: bool,
    /// Rotation drawn uniformly in ± this many degrees.
    pub max_rotation_deg: f64,
    /// Shift drawn uniformly in ± this fraction of the crop, per axis.
    pub max_shift: f64,
    /// Per sequence: gain `exp(N(0, s))` and offset `N(0, s)` on the z-scored values.
    pub intensity: f64,
    /// A scanner's look drawn for each crop; `None`: the crop's own.
    pub scanner: Option<ScannerStyle>,
}

/// Scanner-style augmentation (in the spirit of the MRI-specific augmentations of Pérez-García et al.,
/// TorchIO, 2021, and of "style" randomisation for domain generalisation, Tobin et al. 2017): each crop is shown
/// as a scanner drawn at random would acquire it, in the order a scanner does (blur, bias field, contrast curve,
/// noise), each sequence then z-scored again as preprocessing does. The ranges are wider than the training
/// scanners' own differences, so that noise level, resolution and contrast stop being features.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScannerStyle {
    /// In-plane Gaussian blur (one for every sequence and slice): standard deviation drawn uniformly in
    /// [0, this] as a fraction of the crop's side.
    pub max_blur: f64,
    /// A multiplicative bias field per sequence, a linear ramp in a random direction across the crop, its
    /// peak-to-peak amplitude drawn uniformly in [0, this].
    pub max_bias: f64,
    /// A contrast curve per sequence, `I -> I^gamma` on the sequence scaled to [0, 1], with `ln gamma` drawn
    /// uniformly in `± ln(max_gamma)`.
    pub max_gamma: f64,
    /// Gaussian noise per sequence, its standard deviation drawn uniformly in [0, this] of the sequence's
    /// range in the crop.
    pub max_noise: f64,
    /// The noise's grain: a scanner's noise is independent per voxel, and a crop resampled from coarse voxels
    /// shows it as blobs a few pixels wide. Its correlation length (standard deviation of the smoothing, in
    /// fractions of the crop's side) is drawn uniformly in [0, this].
    pub max_noise_grain: f64,
}

impl ScannerStyle {
    /// The ranges chosen on development cohorts (BENCHMARKS.md, "Scanner shift"): of three sets tried, the one
    /// whose external AUC was best over the development runs. It costs internal AUC, so it is off unless a
    /// site or `--shift augment` turns it on.
    pub const CHOSEN: ScannerStyle = ScannerStyle {
        max_blur: 0.25,
        max_bias: 0.4,
        max_gamma: 1.8,
        max_noise: 0.6,
        max_noise_grain: 0.08,
    };
}

impl Default for ScannerStyle {
    fn default() -> ScannerStyle {
        ScannerStyle::CHOSEN
    }
}

impl ScannerStyle {
    /// Why these ranges cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        let ok = |v: f64, hi: f64| v.is_finite() && (0.0..=hi).contains(&v);
        if !ok(self.max_blur, 1.0) {
            return Err(format!("max_blur {}: 0 to 1 (of the crop)", self.max_blur));
        }
        if !ok(self.max_bias, 1.0) {
            return Err(format!("max_bias {}: 0 to 1", self.max_bias));
        }
        if !(self.max_gamma.is_finite() && (1.0..=10.0).contains(&self.max_gamma)) {
            return Err(format!("max_gamma {}: 1 to 10", self.max_gamma));
        }
        if !ok(self.max_noise, 2.0) {
            return Err(format!("max_noise {}: 0 to 2", self.max_noise));
        }
        if !ok(self.max_noise_grain, 1.0) {
            return Err(format!(
                "max_noise_grain {}: 0 to 1 (of the crop)",
                self.max_noise_grain
            ));
        }
        Ok(())
    }
}

/// One crop's drawn scanner: what [`ScannerStyle`] applies.
#[derive(Debug, Clone, PartialEq)]
pub struct DrawnScanner {
    /// Blur standard deviation in pixels.
    pub blur_px: f64,
    /// The noise's correlation length in pixels.
    pub grain_px: f64,
    /// Per sequence: bias amplitude, its direction (radians), gamma, noise standard deviation (of the range).
    pub sequences: Vec<(f64, f64, f64, f64)>,
}

impl ScannerStyle {
    /// Draws a scanner for a crop of `size` pixels and `groups` sequences.
    pub fn draw(&self, size: usize, groups: usize, rng: &mut Rng) -> DrawnScanner {
        let blur_px = rng.uniform() * self.max_blur * size as f64;
        let grain_px = rng.uniform() * self.max_noise_grain * size as f64;
        let sequences = (0..groups)
            .map(|_| {
                let bias = rng.uniform() * self.max_bias;
                let direction = rng.uniform() * std::f64::consts::TAU;
                let gamma = ((2.0 * rng.uniform() - 1.0) * self.max_gamma.ln()).exp();
                let noise = rng.uniform() * self.max_noise;
                (bias, direction, gamma, noise)
            })
            .collect();
        DrawnScanner {
            blur_px,
            grain_px,
            sequences,
        }
    }
}

impl DrawnScanner {
    /// Applies the scanner to `image` (`groups` sequences of equally many `size` x `size` planes) in place, noise
    /// from `rng`, then z-scores each sequence again.
    pub fn apply(&self, image: &mut [f32], size: usize, rng: &mut Rng) {
        let plane = size * size;
        let groups = self.sequences.len().max(1);
        let per_group = image.len() / plane / groups;
        let mut scratch = vec![0f32; plane];
        let mut grain = vec![0f32; plane];
        for (g, &(bias, direction, gamma, noise)) in self.sequences.iter().enumerate() {
            let seq = &mut image[g * per_group * plane..(g + 1) * per_group * plane];
            for p in seq.chunks_mut(plane) {
                gaussian_blur(p, size, self.blur_px, &mut scratch);
            }
            let (lo, hi) = seq
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let range = f64::from(hi - lo).max(1e-6);
            let c = (size as f64 - 1.0) / 2.0;
            // The ramp runs from -1/2 to 1/2 across the crop's diagonal extent.
            let scale = bias / (2.0 * c.max(1.0) * std::f64::consts::SQRT_2);
            let (dx, dy) = (
                (direction.cos() * scale) as f32,
                (direction.sin() * scale) as f32,
            );
            let (lo, inv_range) = (lo, (1.0 / range) as f32);
            let (gamma, noise, c) = (gamma as f32, noise as f32, c as f32);
            for p in seq.chunks_mut(plane) {
                grained_noise(&mut grain, size, self.grain_px, rng, &mut scratch);
                for (i, v) in p.iter_mut().enumerate() {
                    let (x, y) = ((i % size) as f32 - c, (i / size) as f32 - c);
                    let unit = ((*v - lo) * inv_range).clamp(0.0, 1.0);
                    let biased = (unit * (1.0 + x * dx + y * dy)).max(0.0);
                    *v = biased.powf(gamma) + noise * grain[i];
                }
            }
            z_score(seq);
        }
    }
}

/// Standard normal noise over a plane, smoothed to a correlation length of `grain` pixels and brought back to
/// a standard deviation of 1.
fn grained_noise(out: &mut [f32], size: usize, grain: f64, rng: &mut Rng, scratch: &mut [f32]) {
    // Box-Muller in f32, both values of each pair used: a crop needs tens of thousands.
    for pair in out.chunks_mut(2) {
        // 23-bit draws: `k + 0.5` is exact in f32, so `u1` lies strictly inside (0, 1) and its log is finite.
        let bits = rng.next_u64();
        let u1 = ((bits >> 41) as f32 + 0.5) / (1u64 << 23) as f32;
        let u2 = ((bits & 0x7f_ffff) as f32) / (1u64 << 23) as f32;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        pair[0] = r * c;
        if let Some(second) = pair.get_mut(1) {
            *second = r * s;
        }
    }
    if grain >= 0.5 {
        gaussian_blur(out, size, grain, scratch);
        z_score(out);
    }
}

/// An approximately Gaussian blur of standard deviation `sigma` pixels: three box filters per axis (the
/// standard approximation, exact in variance for odd widths), edges clamped. `scratch` holds one plane.
fn gaussian_blur(plane: &mut [f32], size: usize, sigma: f64, scratch: &mut [f32]) {
    // Three boxes of width w have variance 3 (w^2 - 1) / 12.
    let w = ((4.0 * sigma * sigma + 1.0).sqrt().round() as usize) | 1;
    if w < 3 || size < 2 {
        return;
    }
    let r = (w / 2) as isize;
    for _ in 0..3 {
        box_pass(plane, scratch, size, r, true);
        box_pass(scratch, plane, size, r, false);
    }
}

/// One box filter of radius `r` along rows (`along_x`) or columns, from `src` into `dst`, edges clamped.
fn box_pass(src: &[f32], dst: &mut [f32], size: usize, r: isize, along_x: bool) {
    let n = size as isize;
    let width = (2 * r + 1) as f32;
    for line in 0..size {
        let at = |k: isize| {
            let k = k.clamp(0, n - 1) as usize;
            if along_x {
                line * size + k
            } else {
                k * size + line
            }
        };
        let mut sum: f32 = (-r..=r).map(|k| src[at(k)]).sum();
        for k in 0..n {
            dst[at(k)] = sum / width;
            sum += src[at(k + r + 1)] - src[at(k - r)];
        }
    }
}

impl Default for Augmentation {
    fn default() -> Augmentation {
        Augmentation {
            flips: true,
            max_rotation_deg: 15.0,
            max_shift: 0.08,
            intensity: 0.1,
            scanner: None,
        }
    }
}

/// Appends to `out` an augmented copy of `image` (`channels` x `size` x `size`, channel-major, `groups`
/// sequences of equally many channels).
pub fn augment(
    image: &[f32],
    channels: usize,
    size: usize,
    groups: usize,
    a: &Augmentation,
    rng: &mut Rng,
    out: &mut Vec<f32>,
) {
    a.draw(size, groups, rng).apply(image, channels, size, out);
}

/// One crop's drawn augmentation: every random choice made, so that applying it needs no generator (and
/// crops of a batch can be augmented in parallel, their draws made in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    flip_x: bool,
    flip_y: bool,
    theta: f64,
    tx: f64,
    ty: f64,
    /// Per sequence: gain and offset.
    jitter: Vec<(f32, f32)>,
    /// The scanner, and the seed of its noise.
    scanner: Option<(DrawnScanner, u64)>,
}

impl Augmentation {
    /// Draws a crop's augmentation for crops of `size` pixels and `groups` sequences.
    pub fn draw(&self, size: usize, groups: usize, rng: &mut Rng) -> Drawn {
        let a = self;
        let flip_x = a.flips && rng.bernoulli(0.5);
        let flip_y = a.flips && rng.bernoulli(0.5);
        let theta = (2.0 * rng.uniform() - 1.0) * a.max_rotation_deg.to_radians();
        let shift = |rng: &mut Rng| (2.0 * rng.uniform() - 1.0) * a.max_shift * size as f64;
        let (tx, ty) = (shift(rng), shift(rng));
        let jitter: Vec<(f32, f32)> = (0..groups.max(1))
            .map(|_| {
                (
                    (a.intensity * rng.normal()).exp() as f32,
                    (a.intensity * rng.normal()) as f32,
                )
            })
            .collect();
        // Drawn after the geometric and jitter draws, so that crops without it see the draws they always saw.
        let scanner = a
            .scanner
            .map(|s| (s.draw(size, groups.max(1), rng), rng.next_u64()));
        Drawn {
            flip_x,
            flip_y,
            theta,
            tx,
            ty,
            jitter,
            scanner,
        }
    }
}

impl Drawn {
    /// Appends to `out` the augmented copy of `image` (`channels` x `size` x `size`, channel-major).
    pub fn apply(&self, image: &[f32], channels: usize, size: usize, out: &mut Vec<f32>) {
        let Drawn {
            flip_x,
            flip_y,
            theta,
            tx,
            ty,
            ref jitter,
            ref scanner,
        } = *self;
        let per_group = channels / jitter.len().max(1);
        let start = out.len();
        let c = (size as f64 - 1.0) / 2.0;
        let (sin, cos) = theta.sin_cos();
        let last = size as f64 - 1.0;
        // Source coordinates and bilinear weights of each output pixel, shared by the channels.
        let taps: Vec<(usize, usize, usize, usize, f32, f32)> = (0..size * size)
            .map(|i| {
                let (u, v) = ((i % size) as f64 - c - tx, (i / size) as f64 - c - ty);
                let (mut su, mut sv) = (cos * u + sin * v, -sin * u + cos * v);
                if flip_x {
                    su = -su;
                }
                if flip_y {
                    sv = -sv;
                }
                let (sx, sy) = ((su + c).clamp(0.0, last), (sv + c).clamp(0.0, last));
                let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
                (
                    x0,
                    x1,
                    y0,
                    y1,
                    (sx - x0 as f64) as f32,
                    (sy - y0 as f64) as f32,
                )
            })
            .collect();
        let plane = size * size;
        for ch in 0..channels {
            let src = &image[ch * plane..(ch + 1) * plane];
            let (gain, offset) = jitter[(ch / per_group.max(1)).min(jitter.len() - 1)];
            out.extend(taps.iter().map(|&(x0, x1, y0, y1, fx, fy)| {
                let top = src[y0 * size + x0] * (1.0 - fx) + src[y0 * size + x1] * fx;
                let bottom = src[y1 * size + x0] * (1.0 - fx) + src[y1 * size + x1] * fx;
                (top * (1.0 - fy) + bottom * fy) * gain + offset
            }));
        }
        if let Some((scanner, seed)) = scanner {
            scanner.apply(&mut out[start..], size, &mut Rng::new(*seed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_augmentation_is_the_identity_and_a_flip_mirrors() {
        let size = 5;
        let image: Vec<f32> = (0..2 * size * size).map(|i| i as f32).collect();
        let none = Augmentation {
            flips: false,
            max_rotation_deg: 0.0,
            max_shift: 0.0,
            intensity: 0.0,
            scanner: None,
        };
        let mut out = Vec::new();
        augment(&image, 2, size, 2, &none, &mut Rng::new(1), &mut out);
        assert_eq!(out, image);
        // With flips on, some seed flips left-right only: row 0 becomes 4,3,2,1,0.
        let flips = Augmentation {
            flips: true,
            ..none
        };
        let mut seen_lr = false;
        for seed in 0..32 {
            let mut out = Vec::new();
            augment(&image, 2, size, 2, &flips, &mut Rng::new(seed), &mut out);
            if out[..5] == [4.0, 3.0, 2.0, 1.0, 0.0] {
                seen_lr = true;
                assert_eq!(out[25..30], [29.0, 28.0, 27.0, 26.0, 25.0]);
            }
            let mut sorted = out.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, image, "a flip permutes pixels");
        }
        assert!(seen_lr);
    }

    #[test]
    fn rotation_keeps_a_round_image_and_shifts_move_the_content() {
        let size = 33;
        let c = 16.0;
        let radial: Vec<f32> = (0..size * size)
            .map(|i| {
                let (x, y) = ((i % size) as f64 - c, (i / size) as f64 - c);
                (-(x * x + y * y) / 20.0).exp() as f32
            })
            .collect();
        let rotate = Augmentation {
            flips: false,
            max_rotation_deg: 180.0,
            max_shift: 0.0,
            intensity: 0.0,
            scanner: None,
        };
        for seed in 0..10 {
            let mut out = Vec::new();
            augment(&radial, 1, size, 1, &rotate, &mut Rng::new(seed), &mut out);
            let worst = out
                .iter()
                .zip(&radial)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 0.02, "seed {seed}: {worst}");
        }
        // A shift (no rotation, no flips): the blob's centroid moves by the drawn (tx, ty).
        let shift = Augmentation {
            max_rotation_deg: 0.0,
            max_shift: 0.1,
            ..rotate
        };
        for seed in 0..10 {
            let mut probe = Rng::new(seed);
            let _theta = probe.uniform();
            let tx = (2.0 * probe.uniform() - 1.0) * 0.1 * size as f64;
            let ty = (2.0 * probe.uniform() - 1.0) * 0.1 * size as f64;
            let mut out = Vec::new();
            augment(&radial, 1, size, 1, &shift, &mut Rng::new(seed), &mut out);
            let total: f64 = out.iter().map(|&v| f64::from(v)).sum();
            let cx: f64 = out
                .iter()
                .enumerate()
                .map(|(i, &v)| (i % size) as f64 * f64::from(v))
                .sum::<f64>()
                / total;
            let cy: f64 = out
                .iter()
                .enumerate()
                .map(|(i, &v)| (i / size) as f64 * f64::from(v))
                .sum::<f64>()
                / total;
            assert!(
                (cx - c - tx).abs() < 0.1,
                "seed {seed}: x {cx} vs {}",
                c + tx
            );
            assert!(
                (cy - c - ty).abs() < 0.1,
                "seed {seed}: y {cy} vs {}",
                c + ty
            );
        }
    }

    #[test]
    fn a_drawn_scanner_stays_within_its_ranges_and_the_same_seed_draws_the_same() {
        let style = ScannerStyle::default();
        assert!(style.check().is_ok());
        let size = 64;
        for seed in 0..200 {
            let d = style.draw(size, 3, &mut Rng::new(seed));
            assert!((0.0..=style.max_blur * size as f64).contains(&d.blur_px));
            assert!((0.0..=style.max_noise_grain * size as f64).contains(&d.grain_px));
            assert_eq!(d.sequences.len(), 3);
            for &(bias, direction, gamma, noise) in &d.sequences {
                assert!((0.0..=style.max_bias).contains(&bias));
                assert!((0.0..=std::f64::consts::TAU).contains(&direction));
                assert!((1.0 / style.max_gamma..=style.max_gamma).contains(&gamma));
                assert!((0.0..=style.max_noise).contains(&noise));
            }
            assert_eq!(d, style.draw(size, 3, &mut Rng::new(seed)), "seeded");
        }
        let spread: Vec<f64> = (0..200)
            .map(|seed| style.draw(size, 3, &mut Rng::new(seed)).blur_px)
            .collect();
        let max = spread.iter().cloned().fold(0.0, f64::max);
        assert!(
            max > 0.9 * style.max_blur * size as f64,
            "the range is used: {max}"
        );
        for bad in [
            ScannerStyle {
                max_blur: -0.1,
                ..style
            },
            ScannerStyle {
                max_gamma: 0.5,
                ..style
            },
            ScannerStyle {
                max_noise: f64::NAN,
                ..style
            },
            ScannerStyle {
                max_bias: 2.0,
                ..style
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_scanner_blurs_adds_noise_and_leaves_each_sequence_z_scored() {
        let size = 32;
        let plane = size * size;
        // Two sequences of two planes each: a fine checkerboard, whose contrast blur erases.
        let image: Vec<f32> = (0..4 * plane)
            .map(|i| {
                if ((i % size) + (i % plane) / size) % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let neighbour_contrast = |x: &[f32]| -> f64 {
            (0..plane - 1)
                .map(|i| f64::from((x[i] - x[i + 1]).abs()))
                .sum::<f64>()
                / (plane - 1) as f64
        };
        let blur_only = DrawnScanner {
            blur_px: 2.0,
            grain_px: 0.0,
            sequences: vec![(0.0, 0.0, 1.0, 0.0); 2],
        };
        let mut blurred = image.clone();
        blur_only.apply(&mut blurred, size, &mut Rng::new(1));
        assert!(
            neighbour_contrast(&blurred) < 0.2 * neighbour_contrast(&image),
            "{} vs {}",
            neighbour_contrast(&blurred),
            neighbour_contrast(&image)
        );
        let flat = vec![0.5f32; 4 * plane];
        let noisy = DrawnScanner {
            blur_px: 0.0,
            grain_px: 0.0,
            sequences: vec![(0.0, 0.0, 1.0, 0.2); 2],
        };
        let mut a = flat.clone();
        noisy.apply(&mut a, size, &mut Rng::new(7));
        let mut b = flat.clone();
        noisy.apply(&mut b, size, &mut Rng::new(7));
        assert_eq!(a, b, "the noise is the generator's");
        assert!(a.iter().any(|&v| v != a[0]), "noise was added");
        let mut styled = image.clone();
        ScannerStyle::default()
            .draw(size, 2, &mut Rng::new(3))
            .apply(&mut styled, size, &mut Rng::new(4));
        for seq in styled.chunks(2 * plane) {
            let n = seq.len() as f64;
            let mean = seq.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = seq
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            assert!(
                mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
                "{mean} {var}"
            );
        }
        // Through `augment`: without a scanner the crop is what it always was; with one, the draws follow.
        let plain = Augmentation::default();
        let mut without = Vec::new();
        augment(&image, 4, size, 2, &plain, &mut Rng::new(9), &mut without);
        let mut with = Vec::new();
        let styled = Augmentation {
            scanner: Some(ScannerStyle::default()),
            ..plain
        };
        augment(&image, 4, size, 2, &styled, &mut Rng::new(9), &mut with);
        assert_eq!(with.len(), without.len());
        assert_ne!(with, without);
    }

    #[test]
    fn grained_noise_is_standard_and_correlated_over_its_grain() {
        let size = 64;
        let neighbour_correlation = |grain: f64| {
            let (mut out, mut scratch) = (vec![0f32; size * size], vec![0f32; size * size]);
            grained_noise(&mut out, size, grain, &mut Rng::new(5), &mut scratch);
            let n = out.len() as f64;
            let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = out
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.1, "{mean} {var}");
            (0..out.len() - 1)
                .filter(|i| (i + 1) % size != 0)
                .map(|i| f64::from(out[i]) * f64::from(out[i + 1]))
                .sum::<f64>()
                / (n - size as f64)
        };
        assert!(neighbour_correlation(0.0).abs() < 0.05);
        assert!(neighbour_correlation(3.0) > 0.7);
        // Every draw finite, over many planes.
        let mut rng = Rng::new(11);
        let (mut out, mut scratch) = (vec![0f32; size * size], vec![0f32; size * size]);
        for _ in 0..2000 {
            grained_noise(&mut out, size, 0.0, &mut rng, &mut scratch);
            assert!(out.iter().all(|v| v.is_finite()));
        }
    }
}
