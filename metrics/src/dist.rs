//! The distributions the tests and intervals need: the standard normal and the chi-square upper tail.

/// 97.5th percentile of the standard normal, for 95% intervals (R's `qnorm(0.975)`).
pub const Z_975: f64 = 1.959_963_984_540_054;

/// Standard normal CDF, accurate in the tails (through `erfc`, not `1 - erf`).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Two-sided p-value of a z statistic.
pub fn two_sided_p(z: f64) -> f64 {
    (2.0 * normal_cdf(-z.abs())).min(1.0)
}

/// Upper tail of the chi-square distribution with `df` degrees of freedom: P(X >= x).
pub fn chi_square_sf(x: f64, df: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    regularized_gamma_q(df / 2.0, x / 2.0)
}

/// Q(a, x) = Γ(a, x) / Γ(a): a series below a + 1, Lentz's continued fraction above.
fn regularized_gamma_q(a: f64, x: f64) -> f64 {
    let ln_prefix = a * x.ln() - x - libm::lgamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-17 {
                break;
            }
        }
        1.0 - sum * ln_prefix.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        ln_prefix.exp() * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_matches_r() {
        // R: pnorm(-1.959963984540054) = 0.025; pnorm(-5) = 2.866515718791946e-07; pnorm(1) = 0.8413447460685429
        assert!((normal_cdf(-Z_975) - 0.025).abs() < 1e-15);
        assert!((normal_cdf(-5.0) / 2.866_515_718_791_946e-7 - 1.0).abs() < 1e-12);
        assert!((normal_cdf(1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert_eq!(two_sided_p(0.0), 1.0);
    }

    #[test]
    fn chi_square_matches_r() {
        // Even degrees of freedom have a closed form: exp(-x/2) * sum_{i<k} (x/2)^i / i!, with df = 2k.
        assert!((chi_square_sf(15.507_313_055_865_453, 8.0) - 0.05).abs() < 1e-12);
        assert!((chi_square_sf(40.0, 8.0) / 3.203_719_780_476_998_2e-6 - 1.0).abs() < 1e-10);
        assert!((chi_square_sf(3.5, 4.0) - 0.477_878_344_488_724_1).abs() < 1e-13);
        // Odd: P(chi2_1 >= z^2) is the two-sided normal p-value.
        assert!((chi_square_sf(Z_975 * Z_975, 1.0) - 0.05).abs() < 1e-12);
        assert_eq!(chi_square_sf(0.0, 4.0), 1.0);
    }
}
