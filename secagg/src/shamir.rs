//! Shamir's secret sharing of 32-byte secrets over GF(2^8) (the AES field, x^8 + x^4 + x^3 + x + 1), byte by
//! byte: a share is its x coordinate (1 to 255) and the 32 bytes of y. Any `threshold` shares rebuild the
//! secret; fewer tell nothing about it.

use fedslm_protocol::secure::SHARE_LEN;

use crate::SecureError;

const fn tables() -> ([u8; 256], [u8; 256]) {
    let mut exp = [0u8; 256];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        log[x as usize] = i as u8;
        // multiply by the generator 3: x * 2 + x, reduced
        let mut doubled = x << 1;
        if doubled & 0x100 != 0 {
            doubled ^= 0x11b;
        }
        x = doubled ^ x;
        i += 1;
    }
    exp[255] = exp[0];
    (exp, log)
}

const TABLES: ([u8; 256], [u8; 256]) = tables();

fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    let (exp, log) = &TABLES;
    exp[(usize::from(log[a as usize]) + usize::from(log[b as usize])) % 255]
}

fn inv(a: u8) -> u8 {
    let (exp, log) = &TABLES;
    exp[(255 - usize::from(log[a as usize])) % 255]
}

/// Shares of `secret` at the x coordinates `xs` (distinct, non-zero), `threshold` of which rebuild it;
/// `random` fills the polynomials' coefficients.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u8],
    random: &mut impl FnMut(&mut [u8]),
) -> Vec<[u8; SHARE_LEN]> {
    // coefficients[k][j]: the k-th coefficient (k >= 1) of byte j's polynomial
    let mut coefficients = vec![[0u8; 32]; threshold.saturating_sub(1)];
    for c in &mut coefficients {
        random(c);
    }
    xs.iter()
        .map(|&x| {
            let mut share = [0u8; SHARE_LEN];
            share[0] = x;
            for j in 0..32 {
                // Horner from the highest coefficient down to the secret.
                let mut y = 0u8;
                for c in coefficients.iter().rev() {
                    y = mul(y, x) ^ c[j];
                }
                share[1 + j] = mul(y, x) ^ secret[j];
            }
            share
        })
        .collect()
}

/// The secret behind `shares` (at least the threshold of them, at distinct non-zero x): Lagrange at zero.
pub fn combine(shares: &[[u8; SHARE_LEN]]) -> Result<[u8; 32], SecureError> {
    let xs: Vec<u8> = shares.iter().map(|s| s[0]).collect();
    for (i, x) in xs.iter().enumerate() {
        if *x == 0 || xs[..i].contains(x) {
            return Err(SecureError::BadShares(format!(
                "x coordinate {x} is zero or repeated"
            )));
        }
    }
    let mut secret = [0u8; 32];
    for (i, share) in shares.iter().enumerate() {
        // l_i(0) = prod_{m != i} x_m / (x_m - x_i); subtraction is xor.
        let mut l = 1u8;
        for (m, &xm) in xs.iter().enumerate() {
            if m != i {
                l = mul(l, mul(xm, inv(xm ^ xs[i])));
            }
        }
        for j in 0..32 {
            secret[j] ^= mul(l, share[1 + j]);
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut(&mut [u8]) {
        let mut n = 0u8;
        move |buf: &mut [u8]| {
            for b in buf {
                n = n.wrapping_mul(31).wrapping_add(7);
                *b = n;
            }
        }
    }

    #[test]
    fn the_field_inverts_every_non_zero_element() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
        }
        assert_eq!(mul(0x57, 0x83), 0xc1, "FIPS-197's example product");
    }

    #[test]
    fn any_threshold_of_shares_rebuilds_the_secret_and_fewer_do_not() {
        let secret: [u8; 32] = std::array::from_fn(|i| i as u8 * 7 + 1);
        let shares = split(&secret, 3, &[1, 2, 3, 4, 5], &mut counter());
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let chosen: Vec<_> = pick.iter().map(|&i| shares[i]).collect();
            assert_eq!(combine(&chosen).unwrap(), secret);
        }
        assert_eq!(combine(&shares).unwrap(), secret, "more than enough");
        assert_ne!(
            combine(&shares[..2]).unwrap(),
            secret,
            "two of a threshold of three"
        );
        let mut twice = shares[..3].to_vec();
        twice[2] = twice[0];
        assert!(combine(&twice).is_err());
    }
}
