//! Fixed point in the ring of 2^64: `x` becomes `round(x * 2^scale_bits)` as a two's-complement u64, so that
//! masked values sum with wrapping addition and the sum decodes back to f64. Counts (integers) are exact.

use crate::SecureError;

/// The default scale: 24 fractional bits, an absolute rounding error of at most 2^-25 (3.0e-8) per element
/// per centre.
pub const SCALE_BITS: u8 = 24;

/// The default clipping range: every element's magnitude at most 2^30 (about 1.07e9) before encoding. With
/// the default scale and at most 255 centres the sum stays below 2^62, far inside the ring.
pub const BOUND: f64 = (1u64 << 30) as f64;

/// A sum's fixed point: its fractional bits and its clipping range. The two trade against each other inside
/// 2^63 / participants; each kind of sum has its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    pub scale_bits: u8,
    pub bound: f64,
}

impl FixedPoint {
    /// Model updates and evaluations: [`SCALE_BITS`], [`BOUND`] (examples times weights, counts).
    pub const UPDATES: FixedPoint = FixedPoint {
        scale_bits: SCALE_BITS,
        bound: BOUND,
    };
    /// Federated Newton's statistics: 36 fractional bits (an error of at most 2^-37, 7.3e-12, per element
    /// per centre, far inside Newton's convergence tolerance of 1e-10), each element within ±2^18 (a centre of
    /// up to 262 144 patients: gradient entries lie within ±n, Hessian entries within n/4).
    pub const STATISTICS: FixedPoint = FixedPoint {
        scale_bits: 36,
        bound: (1u64 << 18) as f64,
    };
    /// Placement sums (each within [0, n]): 32 fractional bits, up to 2^22 patients a centre.
    pub const PLACEMENTS: FixedPoint = FixedPoint {
        scale_bits: 32,
        bound: (1u64 << 22) as f64,
    };
}

/// Whether `participants` values each within `bound` sum without wrapping at `scale_bits`.
pub fn fits(scale_bits: u8, bound: f64, participants: usize) -> bool {
    scale_bits <= 62
        && bound.is_finite()
        && bound > 0.0
        && bound * 2f64.powi(i32::from(scale_bits)) * (participants as f64) < 2f64.powi(63)
}

/// The largest absolute error of a decoded sum of `participants` terms: each rounding is at most half a unit
/// of the last place.
pub fn error_bound(scale_bits: u8, participants: usize) -> f64 {
    participants as f64 * 2f64.powi(-i32::from(scale_bits) - 1)
}

/// Encodes `values`, each finite and within `bound`; names the first that is not.
pub fn encode(values: &[f64], scale_bits: u8, bound: f64) -> Result<Vec<u64>, SecureError> {
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
            Ok((x * scale).round() as i64 as u64)
        })
        .collect()
}

/// Decodes a sum of encoded values.
pub fn decode(sum: &[u64], scale_bits: u8) -> Vec<f64> {
    let scale = 2f64.powi(i32::from(scale_bits));
    sum.iter().map(|&v| v as i64 as f64 / scale).collect()
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
        let sum: Vec<u64> = ea
            .iter()
            .zip(&eb)
            .map(|(x, y)| x.wrapping_add(*y))
            .collect();
        let back = decode(&sum, SCALE_BITS);
        for i in 0..a.len() {
            assert!((back[i] - (a[i] + b[i])).abs() <= error_bound(SCALE_BITS, 2));
        }
        assert_eq!(back[4], 42.0, "counts are exact");
    }

    #[test]
    fn values_outside_the_clipping_range_or_not_finite_are_named() {
        let e = encode(&[0.0, BOUND * 2.0], SCALE_BITS, BOUND).unwrap_err();
        assert!(matches!(e, SecureError::OutOfRange { index: 1, .. }), "{e}");
        assert!(encode(&[f64::NAN], SCALE_BITS, BOUND).is_err());
        assert!(fits(SCALE_BITS, BOUND, 255));
        assert!(!fits(SCALE_BITS, BOUND, 1 << 9));
        for f in [
            FixedPoint::UPDATES,
            FixedPoint::STATISTICS,
            FixedPoint::PLACEMENTS,
        ] {
            assert!(fits(f.scale_bits, f.bound, 254), "{f:?}");
        }
    }
}
