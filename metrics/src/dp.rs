//! The Gaussian mechanisms of a site's differentially private releases, and the generator their noise comes
//! from. What each protects is one patient (add/remove adjacency, as the accountant in [`crate::rdp`]):
//!
//! - histogram counts: a patient is one count in one bin of one class, so the L2 sensitivity is 1; each count
//!   gets N(0, σ²), is rounded and kept non-negative (post-processing, free);
//! - the clinical model's Newton statistics: each patient's (gradient, Hessian, log-likelihood) contribution,
//!   as one vector, is scaled to L2 norm at most C; their sum gets N(0, σ²C²) on the gradient, the
//!   log-likelihood and the Hessian's upper triangle (mirrored, so the matrix stays symmetric); then, as
//!   post-processing, the Hessian is made positive definite and every entry is kept within what `n` patients
//!   can give, so that the server's Newton step and its plausibility checks work as they do in the clear.
//!
//! DP-SGD's per-patient clipping is the model crate's (it needs the network's gradients); its noise comes from
//! the same [`SecureNoise`].
//!
//! The noise is drawn from ChaCha20 seeded by the operating system's generator (`getrandom`), never from a
//! run's seed: a server that knows the seed must not be able to subtract the noise. Floating-point Gaussian
//! samples have a known weakness in their lowest bits (Mironov 2012); like Opacus and TensorFlow Privacy,
//! fedslm does not defend against it.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::logistic::LogisticStats;
use crate::ScoreHistograms;

/// A cryptographically secure source of noise.
pub struct SecureNoise {
    rng: ChaCha20Rng,
}

/// The operating system's generator could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot seed the noise generator from the operating system: {0}")]
pub struct NoiseError(String);

impl SecureNoise {
    /// A generator seeded with 256 bits from the operating system.
    pub fn from_os() -> Result<SecureNoise, NoiseError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| NoiseError(e.to_string()))?;
        Ok(SecureNoise {
            rng: ChaCha20Rng::from_seed(seed),
        })
    }

    /// A draw from N(0, 1).
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.rng)
    }

    /// A draw from U[0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Adds N(0, `std`²) to each value.
    pub fn add_to(&mut self, values: &mut [f32], std: f64) {
        for v in values {
            *v += (std * self.normal()) as f32;
        }
    }
}

/// The factor that brings a vector of L2 norm `norm` within `clip` (1 where it already is).
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip {
        clip / norm
    } else {
        1.0
    }
}

/// Counts with N(0, `sigma`²) added to each, rounded and kept non-negative.
pub fn noised_counts(counts: &[u64], sigma: f64, noise: &mut SecureNoise) -> Vec<u64> {
    counts
        .iter()
        .map(|&c| (c as f64 + sigma * noise.normal()).round().max(0.0) as u64)
        .collect()
}

impl ScoreHistograms {
    /// Both classes' counts through [`noised_counts`].
    pub fn noised(&self, sigma: f64, noise: &mut SecureNoise) -> ScoreHistograms {
        ScoreHistograms {
            positive: noised_counts(&self.positive, sigma, noise),
            negative: noised_counts(&self.negative, sigma, noise),
        }
    }
}

/// The smallest eigenvalue kept when the noised Hessian is made positive definite.
pub const HESSIAN_FLOOR: f64 = 1e-3;

/// The Newton statistics of `x` (row-major, each patient's design row, intercept first, as
/// [`crate::logistic::logistic_stats`] takes it) with outcomes `y` at `beta`,
/// each patient's contribution clipped to `clip` and the sum noised with N(0, (`sigma` `clip`)²), then
/// post-processed (see the module's notes). `fitted_exactly` is not released (0).
pub fn private_newton_stats(
    x: &[f64],
    y: &[bool],
    beta: &[f64],
    clip: f64,
    sigma: f64,
    noise: &mut SecureNoise,
) -> LogisticStats {
    let p = beta.len();
    let mut sum = LogisticStats::zeros(p);
    for (x, &yi) in x.chunks_exact(p.max(1)).zip(y) {
        let mut one = LogisticStats::zeros(p);
        one.add_patient(x, yi, 0.0, beta);
        let norm = (one.gradient.iter().map(|g| g * g).sum::<f64>()
            + one.hessian.iter().map(|h| h * h).sum::<f64>()
            + one.log_likelihood * one.log_likelihood)
            .sqrt();
        let f = clip_factor(norm, clip);
        for (s, g) in sum.gradient.iter_mut().zip(&one.gradient) {
            *s += f * g;
        }
        for (s, h) in sum.hessian.iter_mut().zip(&one.hessian) {
            *s += f * h;
        }
        sum.log_likelihood += f * one.log_likelihood;
    }
    let n = y.len() as u64;
    sum.n = n;
    sum.fitted_exactly = 0;
    let std = sigma * clip;
    for g in &mut sum.gradient {
        *g += std * noise.normal();
    }
    for i in 0..p {
        for j in i..p {
            let h = sum.hessian[i * p + j] + std * noise.normal();
            sum.hessian[i * p + j] = h;
            sum.hessian[j * p + i] = h;
        }
    }
    sum.log_likelihood += std * noise.normal();
    plausible_after_noise(&mut sum);
    sum
}

/// Post-processing of noised statistics: the gradient within ±n, the log-likelihood at most 0, the Hessian
/// positive definite (eigenvalues at least [`HESSIAN_FLOOR`]) and scaled, if need be, so that every entry is
/// within the ±n/4 that n patients' Fisher information can reach.
fn plausible_after_noise(s: &mut LogisticStats) {
    let n = s.n as f64;
    let p = s.gradient.len();
    for g in &mut s.gradient {
        *g = g.clamp(-n, n);
    }
    s.log_likelihood = s.log_likelihood.min(0.0);
    s.hessian = positive_definite(&s.hessian, p, HESSIAN_FLOOR);
    let largest = s.hessian.iter().fold(0.0f64, |m, h| m.max(h.abs()));
    let limit = n / 4.0;
    if largest > limit && largest > 0.0 {
        let f = limit / largest;
        for h in &mut s.hessian {
            *h *= f;
        }
    }
}

/// The symmetric `p` x `p` matrix `a` with its eigenvalues raised to at least `floor` (cyclic Jacobi).
pub fn positive_definite(a: &[f64], p: usize, floor: f64) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut v = vec![0.0; p * p];
    for i in 0..p {
        v[i * p + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..p)
            .flat_map(|i| (0..p).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * p + j] * m[i * p + j])
            .sum();
        let scale: f64 = m.iter().map(|x| x * x).sum();
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for k in 0..p {
            for l in k + 1..p {
                let akl = m[k * p + l];
                if akl == 0.0 {
                    continue;
                }
                let theta = (m[l * p + l] - m[k * p + k]) / (2.0 * akl);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // m <- Jᵀ m J, v <- v J, J the rotation in the (k, l) plane.
                for i in 0..p {
                    let (mik, mil) = (m[i * p + k], m[i * p + l]);
                    m[i * p + k] = c * mik - s * mil;
                    m[i * p + l] = s * mik + c * mil;
                }
                for j in 0..p {
                    let (mkj, mlj) = (m[k * p + j], m[l * p + j]);
                    m[k * p + j] = c * mkj - s * mlj;
                    m[l * p + j] = s * mkj + c * mlj;
                }
                for i in 0..p {
                    let (vik, vil) = (v[i * p + k], v[i * p + l]);
                    v[i * p + k] = c * vik - s * vil;
                    v[i * p + l] = s * vik + c * vil;
                }
            }
        }
    }
    let eig: Vec<f64> = (0..p).map(|i| m[i * p + i].max(floor)).collect();
    let mut out = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..p {
            out[i * p + j] = (0..p).map(|k| v[i * p + k] * eig[k] * v[j * p + k]).sum();
        }
    }
    // Exactly symmetric.
    for i in 0..p {
        for j in i + 1..p {
            let h = 0.5 * (out[i * p + j] + out[j * p + i]);
            out[i * p + j] = h;
            out[j * p + i] = h;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_noise_has_the_asked_spread_and_differs_between_generators() {
        let mut a = SecureNoise::from_os().unwrap();
        let n = 200_000;
        let draws: Vec<f64> = (0..n).map(|_| 3.0 * a.normal()).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let sd = (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        assert!(
            mean.abs() < 0.05 && (sd / 3.0 - 1.0).abs() < 0.01,
            "{mean} {sd}"
        );
        let mut b = SecureNoise::from_os().unwrap();
        assert_ne!(
            a.uniform(),
            b.uniform(),
            "seeded from the OS, not a constant"
        );
    }

    #[test]
    fn noised_counts_are_whole_non_negative_and_centred() {
        let mut noise = SecureNoise::from_os().unwrap();
        let counts = vec![0u64, 5, 100];
        let mut sums = [0.0f64; 3];
        let reps = 20_000;
        for _ in 0..reps {
            for (s, c) in sums.iter_mut().zip(noised_counts(&counts, 2.0, &mut noise)) {
                *s += c as f64;
            }
        }
        // Far from zero the rounding is unbiased; at zero the clamp lifts the mean (post-processing).
        assert!((sums[2] / reps as f64 - 100.0).abs() < 0.1);
        assert!((sums[1] / reps as f64 - 5.0).abs() < 0.15);
        assert!(sums[0] / reps as f64 > 0.5);
    }

    #[test]
    fn jacobi_keeps_a_positive_definite_matrix_and_lifts_a_negative_eigenvalue() {
        let a = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let b = positive_definite(&a, 3, 1e-3);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-12, "{a:?} {b:?}");
        }
        // Eigenvalues 3 and -1, eigenvectors (1, 1) and (1, -1) / sqrt 2.
        let c = positive_definite(&[1.0, 2.0, 2.0, 1.0], 2, 0.5);
        let expect = [1.75, 1.25, 1.25, 1.75];
        for (x, y) in c.iter().zip(expect) {
            assert!((x - y).abs() < 1e-12, "{c:?}");
        }
    }

    #[test]
    fn private_newton_statistics_are_clipped_noised_and_plausible() {
        let rows: Vec<f64> = (0..40)
            .flat_map(|i| [1.0, (i % 2) as f64, ((i * 7) % 5) as f64 / 4.0])
            .collect();
        let y: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
        let beta = [0.1, 0.5, -0.2];
        let mut noise = SecureNoise::from_os().unwrap();
        // With almost no noise and a clip no patient reaches, the statistics are the exact ones.
        let exact = crate::logistic::logistic_stats(&rows, &y, None, &beta).unwrap();
        let s = private_newton_stats(&rows, &y, &beta, 1e6, 1e-12, &mut noise);
        for (a, b) in s.gradient.iter().zip(&exact.gradient) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
        for (a, b) in s.hessian.iter().zip(&exact.hessian) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
        // With a clip of 0.5 and no noise, each patient adds at most 0.5 to the norm of the sum.
        let s = private_newton_stats(&rows, &y, &beta, 0.5, 1e-12, &mut noise);
        let norm = (s.gradient.iter().map(|g| g * g).sum::<f64>()
            + s.hessian.iter().map(|h| h * h).sum::<f64>()
            + s.log_likelihood.powi(2))
        .sqrt();
        assert!(norm <= 0.5 * 40.0 + 1e-9, "{norm}");
        // Heavy noise: still symmetric, positive definite, within n's bounds.
        let s = private_newton_stats(&rows, &y, &beta, 4.0, 10.0, &mut noise);
        assert_eq!(s.fitted_exactly, 0);
        assert!(s.log_likelihood <= 0.0);
        for i in 0..3 {
            assert!(s.hessian[i * 3 + i] > 0.0);
            for j in 0..3 {
                assert_eq!(s.hessian[i * 3 + j], s.hessian[j * 3 + i]);
                assert!(s.hessian[i * 3 + j].abs() <= 10.0 + 1e-9);
            }
        }
    }
}
