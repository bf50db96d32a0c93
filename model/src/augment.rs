//! Training-side augmentation of a crop: flips, a small rotation and shift (one geometric transform for all
//! channels, so the sequences stay registered), and intensity jitter per sequence. Draws come from the caller's
//! seeded generator.

use fedslm_cohort::Rng;
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
}

impl Default for Augmentation {
    fn default() -> Augmentation {
        Augmentation {
            flips: true,
            max_rotation_deg: 15.0,
            max_shift: 0.08,
            intensity: 0.1,
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
    let flip_x = a.flips && rng.bernoulli(0.5);
    let flip_y = a.flips && rng.bernoulli(0.5);
    let theta = (2.0 * rng.uniform() - 1.0) * a.max_rotation_deg.to_radians();
    let shift = |rng: &mut Rng| (2.0 * rng.uniform() - 1.0) * a.max_shift * size as f64;
    let (tx, ty) = (shift(rng), shift(rng));
    let per_group = channels / groups.max(1);
    let jitter: Vec<(f32, f32)> = (0..groups.max(1))
        .map(|_| {
            (
                (a.intensity * rng.normal()).exp() as f32,
                (a.intensity * rng.normal()) as f32,
            )
        })
        .collect();
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
}
