//! Rényi differential privacy (RDP) of the Poisson-subsampled Gaussian mechanism, composed over steps and
//! converted to (ε, δ): the accountant of DP-SGD and of the other Gaussian releases of a site.
//!
//! One step samples each record with probability `q` and adds Gaussian noise of standard deviation `σ` times
//! the clipping norm. Its RDP at order α is `log(A_α) / (α - 1)` (Mironov, Talwar & Zhang 2019, "Rényi
//! Differential Privacy of the Sampled Gaussian Mechanism", §3.3): for an integer α a finite binomial sum, for a
//! fractional α two series split at `z0 = σ² log(1/q - 1) + 1/2`, each term with a Gaussian tail, summed in log
//! space until both series decrease and are 30 nats below the total (at most 1000 terms; an order whose series
//! has not converged by then is infinite, and so never chosen). RDP composes by addition. The conversion to ε
//! for a δ is Proposition 12 of Canonne, Kamath & Steinke 2020 (also Asoodeh et al. 2020, eq. 20):
//! `ε = r + log(1 - 1/α) - log(δ α) / (α - 1)`, with the KL bound (ε = 0 where `δ² > 1 - exp(-r)`), minimised
//! over the orders. These are the choices of Google's dp-accounting `RdpAccountant`, and the values equal its
//! own (`shared/reference/privacy/accountant.json`).

/// The orders a site's accountant tracks by default: fractional ones near 1 for small budgets, integers up to
/// 256 for large ones.
pub const DEFAULT_ORDERS: [f64; 20] = [
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0,
    64.0, 128.0, 256.0,
];

/// Terms of a fractional order's series before it counts as not converging.
const MAX_FRACTIONAL_TERMS: usize = 1000;

/// Why an accountant's input cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RdpError {
    #[error("sampling rate {0} is outside [0, 1]")]
    SamplingRate(f64),
    #[error("noise multiplier {0} is negative or not a number")]
    NoiseMultiplier(f64),
    #[error("Rényi order {0} is below 1")]
    Order(f64),
    #[error("delta {0} is outside [0, 1]")]
    Delta(f64),
    #[error("{orders} orders but {values} RDP values")]
    Lengths { orders: usize, values: usize },
}

/// log(e^a + e^b), exact where either is -∞.
fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// log |C(n, k)| for real n and k, through log |Γ|.
fn log_binomial(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log(erfc(x)), accurate far into the upper tail (where erfc itself underflows).
fn log_erfc(x: f64) -> f64 {
    if x < 10.0 {
        return libm::erfc(x).ln();
    }
    // erfc(x) = exp(-x²) / (x √π) · Σ (-1)^n (2n - 1)!! / (2x²)^n, an asymptotic series whose terms shrink
    // until n ≈ x²: for x ≥ 10 it is exact to rounding long before.
    let inv = 1.0 / (2.0 * x * x);
    let (mut sum, mut term) = (1.0, 1.0);
    for n in 1..60 {
        term *= -((2 * n - 1) as f64) * inv;
        sum += term;
        if term.abs() < 1e-17 * sum.abs() {
            break;
        }
    }
    -x * x - (x * std::f64::consts::PI.sqrt()).ln() + sum.ln()
}

/// log(A_α) for an integer α ≥ 2 and 0 < q < 1.
fn log_a_integer(q: f64, sigma: f64, alpha: u32) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (i, a) = (f64::from(i), f64::from(alpha));
        let term = log_binomial(a, i)
            + i * log_q
            + (a - i) * log_1mq
            + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// log(A_α) for a fractional α > 1 and 0 < q < 1; +∞ where the series does not converge.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let root2_sigma = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_FRACTIONAL_TERMS {
        let i = i as f64;
        let j = alpha - i;
        let log_coef = log_binomial(alpha, i);
        let log_t0 = log_coef + i * log_q + j * log_1mq;
        let log_t1 = log_coef + j * log_q + i * log_1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / root2_sigma);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / root2_sigma);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last0 && log_s1 < last1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        (last0, last1) = (log_s0, log_s1);
    }
    f64::INFINITY
}

/// The RDP at `order` of one step of the Poisson-subsampled Gaussian mechanism with sampling rate `q` and
/// noise multiplier `sigma`; +∞ where it is unbounded or its series does not converge.
pub fn subsampled_gaussian(q: f64, sigma: f64, order: f64) -> Result<f64, RdpError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(RdpError::SamplingRate(q));
    }
    if sigma.is_nan() || sigma < 0.0 {
        return Err(RdpError::NoiseMultiplier(sigma));
    }
    if order.is_nan() || order < 1.0 {
        return Err(RdpError::Order(order));
    }
    if q == 0.0 {
        return Ok(0.0);
    }
    if order.is_infinite() || sigma == 0.0 {
        return Ok(f64::INFINITY);
    }
    if q == 1.0 {
        return Ok(order / (2.0 * sigma * sigma));
    }
    let log_a = if order.fract() == 0.0 && order <= f64::from(u32::MAX) {
        log_a_integer(q, sigma, order as u32)
    } else {
        log_a_fractional(q, sigma, order)
    };
    Ok(log_a / (order - 1.0))
}

/// The RDP of `steps` composed steps at each of `orders`.
pub fn composed(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> Result<Vec<f64>, RdpError> {
    orders
        .iter()
        .map(|&a| subsampled_gaussian(q, sigma, a).map(|r| r * steps as f64))
        .collect()
}

/// The RDP at each of `orders` of every release of `releases`, each `(sampling rate, steps)` and all with
/// noise multiplier `sigma`, composed.
pub fn composed_releases(
    releases: &[(f64, u64)],
    sigma: f64,
    orders: &[f64],
) -> Result<Vec<f64>, RdpError> {
    let mut total = vec![0.0; orders.len()];
    for &(q, steps) in releases {
        for (t, r) in total.iter_mut().zip(composed(q, sigma, steps, orders)?) {
            *t += r;
        }
    }
    Ok(total)
}

/// An (ε, δ) guarantee and the order that gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Epsilon {
    pub epsilon: f64,
    pub order: f64,
}

/// The smallest ε, over `orders`, for which RDP values `rdp` (at those orders) give (ε, `delta`)-DP.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<Epsilon, RdpError> {
    if orders.len() != rdp.len() {
        return Err(RdpError::Lengths {
            orders: orders.len(),
            values: rdp.len(),
        });
    }
    if !(0.0..=1.0).contains(&delta) {
        return Err(RdpError::Delta(delta));
    }
    if let Some(&a) = orders.iter().find(|a| a.is_nan() || **a < 1.0) {
        return Err(RdpError::Order(a));
    }
    if delta == 0.0 {
        let none = rdp.iter().all(|r| *r == 0.0);
        return Ok(Epsilon {
            epsilon: if none { 0.0 } else { f64::INFINITY },
            order: 0.0,
        });
    }
    let mut best = Epsilon {
        epsilon: f64::INFINITY,
        order: orders.first().copied().unwrap_or(0.0),
    };
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            // Numerical noise below zero, or small enough for the KL bound.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.epsilon {
            best = Epsilon {
                epsilon: eps,
                order: a,
            };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    Ok(best)
}

/// The noise multiplier that spends at most `target` ε (at `delta`) over `steps` steps at sampling rate `q`,
/// to within 0.1 % (the smallest such σ found by bisection; a larger σ spends less).
pub fn noise_for_epsilon(
    q: f64,
    steps: u64,
    delta: f64,
    target: f64,
    orders: &[f64],
) -> Result<f64, RdpError> {
    noise_for_releases(&[(q, steps)], delta, target, orders)
}

/// The noise multiplier that spends at most `target` ε (at `delta`) over every release of `releases`, each
/// `(sampling rate, steps)` and all with that one noise multiplier: a run's DP-SGD steps and its noised
/// histograms, say. To within 0.1 %, as [`noise_for_epsilon`].
pub fn noise_for_releases(
    releases: &[(f64, u64)],
    delta: f64,
    target: f64,
    orders: &[f64],
) -> Result<f64, RdpError> {
    let spent = |sigma: f64| -> Result<f64, RdpError> {
        Ok(epsilon(orders, &composed_releases(releases, sigma, orders)?, delta)?.epsilon)
    };
    let mut hi = 1.0;
    while spent(hi)? > target {
        hi *= 2.0;
        if hi > 1e6 {
            return Ok(f64::INFINITY);
        }
    }
    let mut lo = 0.0;
    while hi - lo > 1e-3 * hi {
        let mid = 0.5 * (lo + hi);
        if spent(mid)? > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_erfc_joins_the_library_value_at_the_switch() {
        for x in [9.9, 9.999, 10.0, 10.001, 12.0] {
            let direct = libm::erfc(x).ln();
            assert!((log_erfc(x) - direct).abs() < 1e-12 * direct.abs(), "{x}");
        }
        // Far beyond where erfc underflows: -x² - log(x √π) to leading order.
        let x: f64 = 100.0;
        assert!((log_erfc(x) - (-x * x - (x * std::f64::consts::PI.sqrt()).ln())).abs() < 1e-4);
    }

    #[test]
    fn without_subsampling_it_is_the_gaussian_mechanism() {
        assert_eq!(subsampled_gaussian(1.0, 2.0, 3.0).unwrap(), 3.0 / 8.0);
        assert_eq!(subsampled_gaussian(0.0, 2.0, 3.0).unwrap(), 0.0);
        assert!(subsampled_gaussian(0.5, 0.0, 3.0).unwrap().is_infinite());
    }

    #[test]
    fn bad_inputs_are_refused_by_name() {
        assert_eq!(
            subsampled_gaussian(1.5, 1.0, 2.0),
            Err(RdpError::SamplingRate(1.5))
        );
        assert_eq!(
            subsampled_gaussian(0.1, -1.0, 2.0),
            Err(RdpError::NoiseMultiplier(-1.0))
        );
        assert_eq!(
            subsampled_gaussian(0.1, 1.0, 0.5),
            Err(RdpError::Order(0.5))
        );
        assert!(matches!(
            epsilon(&[2.0], &[1.0, 2.0], 1e-5),
            Err(RdpError::Lengths { .. })
        ));
    }

    #[test]
    fn more_noise_spends_less_and_the_calibration_meets_its_target() {
        let orders = DEFAULT_ORDERS;
        let eps = |sigma| {
            epsilon(
                &orders,
                &composed(0.01, sigma, 1000, &orders).unwrap(),
                1e-5,
            )
            .unwrap()
            .epsilon
        };
        assert!(eps(2.0) < eps(1.1));
        let sigma = noise_for_epsilon(0.01, 1000, 1e-5, 3.0, &orders).unwrap();
        assert!(eps(sigma) <= 3.0 && eps(sigma * 0.99) > 3.0, "{sigma}");
        // A histogram release more needs more noise for the same budget.
        let both = noise_for_releases(&[(0.01, 1000), (1.0, 1)], 1e-5, 3.0, &orders).unwrap();
        assert!(both > sigma, "{both} {sigma}");
    }
}
