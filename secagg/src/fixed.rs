//! Fixed point in the ring of 2^128: `x` becomes `round(x * 2^scale_bits)` as a two's-complement u128, so that
//! masked values sum with wrapping addition and the sum decodes back to f64.
//!
//! Why 2^128 and 64 fractional bits: a centre's term of a model update is `examples × w` for an f32 weight `w`,
//! which, for `|w| ≥ 2^-40`, is a whole multiple of 2^-64. Those terms, and so their sum, are then exact: the
//! secure sum rounds once, where it becomes an f64, as the plain sum of the same terms does, and the averaged
//! model is the plain FedAvg's to the bit (not merely within a bound), so that a training run does not drift
//! from its plain twin. Counts are exact; Newton's statistics (f64) are rounded at 2^-65.

use crate::SecureError;

/// Fractional bits: an absolute rounding error of at most 2^-65 (2.7e-20) per element per centre.
pub const SCALE_BITS: u8 = 64;

/// The clipping range: every element's magnitude at most 2^30 (about 1.07e9) before encoding. With 64
/// fractional bits and at most 255 centres the sum stays below 2^102, far inside the ring.
pub const BOUND: f64 = (1u64 << 30) as f64;

/// A sum's fixed point: its fractional bits and its clipping range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    pub scale_bits: u8,
    pub bound: f64,
}

impl FixedPoint {
    /// Every kind of sum's: [`SCALE_BITS`] and [`BOUND`].
    pub const DEFAULT: FixedPoint = FixedPoint {
        scale_bits: SCALE_BITS,
        bound: BOUND,
    };
}

/// Whether `participants` values each within `bound` sum without wrapping at `scale_bits`.
pub fn fits(scale_bits: u8, bound: f64, participants: usize) -> bool {
    scale_bits <= 100
        && bound.is_finite()
        && bound > 0.0
        && bound * 2f64.powi(i32::from(scale_bits)) * (participants as f64) < 2f64.powi(127)
}

/// The largest absolute error of a decoded sum of `participants` terms: each rounding is at most half a unit
/// of the last place.
pub fn error_bound(scale_bits: u8, participants: usize) -> f64 {
    participants as f64 * 2f64.powi(-i32::from(scale_bits) - 1)
}

/// Encodes `values`, each finite and within `bound`; names the first that is not.
pub fn encode(values: &[f64], scale_bits: u8, bound: f64) -> Result<Vec<u128>, SecureError> {
    let scale = 2f64.powi(i32::from(scale_bits));
    values
        .iter()
        .enumerate()
        .map(|(index, &x)| {
            if !x.is_finite() || x.abs() > bound {
                return Err(SecureError::OutOfRange {
                    index,
                    value: x,
                    bound,
                });
            }
            // Scaling by a power of two is exact in f64; so is the conversion of the rounded value.
            Ok((x * scale).round() as i128 as u128)
        })
        .collect()
}

/// Decodes a sum of encoded values.
pub fn decode(sum: &[u128], scale_bits: u8) -> Vec<f64> {
    let scale = 2f64.powi(i32::from(scale_bits));
    sum.iter().map(|&v| v as i128 as f64 / scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_of_encodings_decodes_to_the_sum_within_the_bound_and_counts_exactly() {
        let a = [1.5, -2.25, 1e-9, 123456.789, 17.0];
        let b = [-0.75, 4.0, -3e-9, -0.001, 25.0];
        let ea = encode(&a, SCALE_BITS, BOUND).unwrap();
        let eb = encode(&b, SCALE_BITS, BOUND).unwrap();
        let sum: Vec<u128> = ea
            .iter()
            .zip(&eb)
            .map(|(x, y)| x.wrapping_add(*y))
            .collect();
        let back = decode(&sum, SCALE_BITS);
        for i in 0..a.len() {
            assert!(
                (back[i] - (a[i] + b[i])).abs()
                    <= error_bound(SCALE_BITS, 2) + 1e-16 * back[i].abs()
            );
        }
        assert_eq!(back[4], 42.0, "counts are exact");
    }

    #[test]
    fn examples_times_f32_weights_sum_exactly_as_the_plain_f64_sum_does() {
        // Three centres' terms n × w, w f32: the secure sum is the plain f64 sum to the bit.
        let ws: [[f32; 4]; 3] = [
            [0.012_345_67, -1.5e-6, 3.25, -0.000_976_562_5],
            [0.012_345_68, 2.0e-6, -3.0, 0.5],
            [-0.1, 7.7e-5, 0.001, 1e-11],
        ];
        let ns = [70.0, 56.0, 50.0];
        let mut plain = [0.0f64; 4];
        let mut secure = vec![0u128; 4];
        for (w, n) in ws.iter().zip(ns) {
            let terms: Vec<f64> = w.iter().map(|&v| n * f64::from(v)).collect();
            for (p, t) in plain.iter_mut().zip(&terms) {
                *p += t;
            }
            for (s, e) in secure
                .iter_mut()
                .zip(encode(&terms, SCALE_BITS, BOUND).unwrap())
            {
                *s = s.wrapping_add(e);
            }
        }
        assert_eq!(decode(&secure, SCALE_BITS), plain.to_vec());
    }

    #[test]
    fn values_outside_the_clipping_range_or_not_finite_are_named() {
        let e = encode(&[0.0, BOUND * 2.0], SCALE_BITS, BOUND).unwrap_err();
        assert!(matches!(e, SecureError::OutOfRange { index: 1, .. }), "{e}");
        assert!(encode(&[f64::NAN], SCALE_BITS, BOUND).is_err());
        assert!(fits(SCALE_BITS, BOUND, 255));
        assert!(!fits(SCALE_BITS, BOUND, 1 << 34));
    }
}
