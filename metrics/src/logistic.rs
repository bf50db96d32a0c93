//! Logistic regression by Newton-Raphson with step-halving, from sufficient statistics.
//!
//! Each Newton step needs only the gradient, Hessian and log-likelihood at the current coefficients, and those
//! are sums over patients: [`LogisticStats`] from several centres add up to the pooled statistics, so a
//! federated fit that sums them reproduces the pooled maximum-likelihood fit exactly, and no patient row moves.

use crate::dist::{two_sided_p, Z_975};

/// Why a logistic regression has no (finite, unique) maximum-likelihood estimate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LogisticError {
    #[error("perfect separation: {covariates} predict the outcome exactly, so their coefficients are infinite; drop or merge them")]
    Separation { covariates: String },
    #[error(
        "singular Hessian: covariate {name} is constant or collinear with the covariates before it"
    )]
    Singular { name: String },
    #[error("no convergence after {iterations} Newton iterations")]
    NotConverged { iterations: usize },
    #[error("no observations")]
    Empty,
    #[error("the design has {values} values for {rows} rows of {columns} covariates")]
    Shape {
        values: usize,
        rows: usize,
        columns: usize,
    },
    #[error("statistics for {got} coefficients where {expected} were expected")]
    Dimension { expected: usize, got: usize },
}

/// Gradient, Hessian (of the negative log-likelihood, so positive definite) and log-likelihood of a logistic
/// model at given coefficients, summed over patients.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticStats {
    pub gradient: Vec<f64>,
    /// Row-major p × p: the Fisher information X'WX.
    pub hessian: Vec<f64>,
    pub log_likelihood: f64,
    pub n: u64,
    /// Patients whose fitted probability is within 1e-10 of their label: a sign of separation.
    pub fitted_exactly: u64,
}

impl LogisticStats {
    pub fn zeros(p: usize) -> LogisticStats {
        LogisticStats {
            gradient: vec![0.0; p],
            hessian: vec![0.0; p * p],
            log_likelihood: 0.0,
            n: 0,
            fitted_exactly: 0,
        }
    }

    pub fn dim(&self) -> usize {
        self.gradient.len()
    }

    /// Adds another centre's statistics at the same coefficients.
    pub fn add(&mut self, other: &LogisticStats) -> Result<(), LogisticError> {
        if other.dim() != self.dim() || other.hessian.len() != self.hessian.len() {
            return Err(LogisticError::Dimension {
                expected: self.dim(),
                got: other.dim(),
            });
        }
        for (a, b) in self.gradient.iter_mut().zip(&other.gradient) {
            *a += b;
        }
        for (a, b) in self.hessian.iter_mut().zip(&other.hessian) {
            *a += b;
        }
        self.log_likelihood += other.log_likelihood;
        self.n += other.n;
        self.fitted_exactly += other.fitted_exactly;
        Ok(())
    }

    /// Adds one patient: covariates `x`, outcome `y`, offset (0 where there is none), at coefficients `beta`.
    pub fn add_patient(&mut self, x: &[f64], y: bool, offset: f64, beta: &[f64]) {
        let eta = offset + x.iter().zip(beta).map(|(a, b)| a * b).sum::<f64>();
        let p = 1.0 / (1.0 + (-eta).exp());
        let yf = if y { 1.0 } else { 0.0 };
        // log p = -log(1 + e^-eta), log(1-p) = -log(1 + e^eta), both without cancellation.
        self.log_likelihood -= if y { softplus(-eta) } else { softplus(eta) };
        let w = p * (1.0 - p);
        let d = x.len();
        for i in 0..d {
            self.gradient[i] += (yf - p) * x[i];
            for j in 0..d {
                self.hessian[i * d + j] += w * x[i] * x[j];
            }
        }
        self.n += 1;
        if (p - yf).abs() < 1e-10 {
            self.fitted_exactly += 1;
        }
    }
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// Statistics of patients in a row-major design `x` (n × p).
pub fn logistic_stats(
    x: &[f64],
    y: &[bool],
    offset: Option<&[f64]>,
    beta: &[f64],
) -> Result<LogisticStats, LogisticError> {
    let p = beta.len();
    if p == 0 || x.len() != y.len() * p || offset.is_some_and(|o| o.len() != y.len()) {
        return Err(LogisticError::Shape {
            values: x.len(),
            rows: y.len(),
            columns: p,
        });
    }
    let mut s = LogisticStats::zeros(p);
    for (i, (row, &yi)) in x.chunks_exact(p).zip(y).enumerate() {
        s.add_patient(row, yi, offset.map_or(0.0, |o| o[i]), beta);
    }
    Ok(s)
}

/// A fitted logistic model with Wald inference.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticFit {
    pub names: Vec<String>,
    pub coefficients: Vec<f64>,
    pub std_errors: Vec<f64>,
    pub z: Vec<f64>,
    pub p: Vec<f64>,
    /// Inverse of the information at the estimate.
    pub covariance: Vec<f64>,
    pub log_likelihood: f64,
    pub n: u64,
    pub iterations: usize,
}

impl LogisticFit {
    pub fn odds_ratio(&self, i: usize) -> f64 {
        self.coefficients[i].exp()
    }

    /// Wald 95% interval of the odds ratio: exp(beta ± 1.96 se).
    pub fn odds_ratio_ci95(&self, i: usize) -> (f64, f64) {
        let half = Z_975 * self.std_errors[i];
        (
            (self.coefficients[i] - half).exp(),
            (self.coefficients[i] + half).exp(),
        )
    }

    /// Index of a coefficient by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// Newton's method settings.
#[derive(Debug, Clone, Copy)]
pub struct NewtonOptions {
    pub max_iterations: usize,
    /// Converged when no coefficient moves more than this.
    pub tolerance: f64,
}

impl Default for NewtonOptions {
    fn default() -> NewtonOptions {
        NewtonOptions {
            max_iterations: 100,
            tolerance: 1e-10,
        }
    }
}

/// A coefficient this large on the logit scale (an odds ratio above 10^13) means the estimate is running off
/// to infinity.
const DIVERGED: f64 = 30.0;

/// Lower-triangular Cholesky factor of a p × p matrix, or the index of the first column that is not
/// positive definite.
fn cholesky(a: &[f64], p: usize) -> Result<Vec<f64>, usize> {
    let scale = (0..p)
        .map(|i| a[i * p + i].abs())
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut l = vec![0.0; p * p];
    for j in 0..p {
        let mut d = a[j * p + j];
        for k in 0..j {
            d -= l[j * p + k] * l[j * p + k];
        }
        if d.is_nan() || d <= 1e-12 * scale {
            return Err(j);
        }
        let d = d.sqrt();
        l[j * p + j] = d;
        for i in j + 1..p {
            let mut s = a[i * p + j];
            for k in 0..j {
                s -= l[i * p + k] * l[j * p + k];
            }
            l[i * p + j] = s / d;
        }
    }
    Ok(l)
}

fn cholesky_solve(l: &[f64], p: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..p {
        for k in 0..i {
            y[i] -= l[i * p + k] * y[k];
        }
        y[i] /= l[i * p + i];
    }
    for i in (0..p).rev() {
        for k in i + 1..p {
            y[i] -= l[k * p + i] * y[k];
        }
        y[i] /= l[i * p + i];
    }
    y
}

fn separation(names: &[String], beta: &[f64]) -> LogisticError {
    let mut worst: Vec<&str> = names
        .iter()
        .zip(beta)
        .filter(|(n, b)| b.abs() > DIVERGED / 2.0 && n.as_str() != "intercept")
        .map(|(n, _)| n.as_str())
        .collect();
    if worst.is_empty() {
        worst = names.iter().map(String::as_str).collect();
    }
    LogisticError::Separation {
        covariates: worst.join(", "),
    }
}

/// What a [`NewtonSolver`] needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum NewtonStep {
    /// The statistics at these coefficients.
    Evaluate(Vec<f64>),
    /// The maximum-likelihood fit.
    Converged(LogisticFit),
}

/// Newton-Raphson with step-halving as a resumable machine: it says at which coefficients it needs the
/// statistics next and takes them when they come. A local fit evaluates them at once; a federated one asks the
/// centres over a round, so the server's Newton steps are exactly the local fit's.
#[derive(Debug, Clone)]
pub struct NewtonSolver {
    names: Vec<String>,
    options: NewtonOptions,
    beta: Vec<f64>,
    /// Statistics at `beta`, once known.
    current: Option<LogisticStats>,
    /// The Newton step from `beta` and the fraction of it being tried.
    step: Vec<f64>,
    t: f64,
    candidate: Vec<f64>,
    iterations: usize,
}

impl NewtonSolver {
    /// A solver that starts at zero.
    pub fn new(names: &[&str], options: NewtonOptions) -> NewtonSolver {
        let p = names.len();
        NewtonSolver {
            names: names.iter().map(|s| s.to_string()).collect(),
            options,
            beta: vec![0.0; p],
            current: None,
            step: vec![0.0; p],
            t: 1.0,
            candidate: vec![0.0; p],
            iterations: 0,
        }
    }

    /// The coefficients at which the statistics are needed next.
    pub fn point(&self) -> &[f64] {
        &self.candidate
    }

    /// Newton iterations taken so far.
    pub fn iterations(&self) -> usize {
        self.iterations
    }

    /// Takes the statistics at [`NewtonSolver::point`].
    pub fn observe(&mut self, stats: LogisticStats) -> Result<NewtonStep, LogisticError> {
        let p = self.names.len();
        if stats.dim() != p || stats.hessian.len() != p * p {
            return Err(LogisticError::Dimension {
                expected: p,
                got: stats.dim(),
            });
        }
        let Some(current) = &self.current else {
            if stats.n == 0 {
                return Err(LogisticError::Empty);
            }
            self.current = Some(stats);
            return self.propose();
        };
        // Halve while the likelihood drops, allowing for rounding at the optimum.
        if stats.log_likelihood >= current.log_likelihood - 1e-12 * current.log_likelihood.abs()
            || self.t < 1e-8
        {
            let moved = self
                .step
                .iter()
                .map(|s| (self.t * s).abs())
                .fold(0.0, f64::max);
            self.beta = std::mem::take(&mut self.candidate);
            self.current = Some(stats);
            if moved < self.options.tolerance {
                return self.finish().map(NewtonStep::Converged);
            }
            return self.propose();
        }
        self.t /= 2.0;
        self.candidate = self.at(self.t);
        Ok(NewtonStep::Evaluate(self.candidate.clone()))
    }

    /// Takes noised statistics (differential privacy) at [`NewtonSolver::point`]: every step is taken whole,
    /// since a noised log-likelihood cannot tell a worse point from a better one, and with `last` the fit is
    /// stated at that point (its covariance from the noised Hessian) instead of a next point.
    pub fn observe_noised(
        &mut self,
        stats: LogisticStats,
        last: bool,
    ) -> Result<NewtonStep, LogisticError> {
        let p = self.names.len();
        if stats.dim() != p || stats.hessian.len() != p * p {
            return Err(LogisticError::Dimension {
                expected: p,
                got: stats.dim(),
            });
        }
        if stats.n == 0 {
            return Err(LogisticError::Empty);
        }
        self.beta = self.candidate.clone();
        self.current = Some(stats);
        if last {
            return self.finish().map(NewtonStep::Converged);
        }
        self.propose()
    }

    fn at(&self, t: f64) -> Vec<f64> {
        self.beta
            .iter()
            .zip(&self.step)
            .map(|(b, s)| b + t * s)
            .collect()
    }

    fn propose(&mut self) -> Result<NewtonStep, LogisticError> {
        let p = self.names.len();
        let Some(stats) = &self.current else {
            return Err(LogisticError::Empty);
        };
        let l = match cholesky(&stats.hessian, p) {
            Ok(l) => l,
            Err(col) => {
                return Err(
                    if stats.fitted_exactly > 0 || self.beta.iter().any(|b| b.abs() > DIVERGED) {
                        separation(&self.names, &self.beta)
                    } else {
                        LogisticError::Singular {
                            name: self.names[col].clone(),
                        }
                    },
                )
            }
        };
        if self.iterations == self.options.max_iterations {
            return Err(if self.beta.iter().any(|b| b.abs() > DIVERGED) {
                separation(&self.names, &self.beta)
            } else {
                LogisticError::NotConverged {
                    iterations: self.iterations,
                }
            });
        }
        self.iterations += 1;
        self.step = cholesky_solve(&l, p, &stats.gradient);
        self.t = 1.0;
        self.candidate = self.at(1.0);
        Ok(NewtonStep::Evaluate(self.candidate.clone()))
    }

    fn finish(&self) -> Result<LogisticFit, LogisticError> {
        let p = self.names.len();
        let Some(stats) = &self.current else {
            return Err(LogisticError::Empty);
        };
        if stats.fitted_exactly == stats.n {
            return Err(separation(&self.names, &self.beta));
        }
        let l = cholesky(&stats.hessian, p).map_err(|col| LogisticError::Singular {
            name: self.names[col].clone(),
        })?;
        let mut covariance = vec![0.0; p * p];
        for j in 0..p {
            let mut e = vec![0.0; p];
            e[j] = 1.0;
            for (i, v) in cholesky_solve(&l, p, &e).into_iter().enumerate() {
                covariance[i * p + j] = v;
            }
        }
        let std_errors: Vec<f64> = (0..p).map(|i| covariance[i * p + i].sqrt()).collect();
        let z: Vec<f64> = self
            .beta
            .iter()
            .zip(&std_errors)
            .map(|(b, s)| b / s)
            .collect();
        Ok(LogisticFit {
            p: z.iter().map(|&z| two_sided_p(z)).collect(),
            names: self.names.clone(),
            coefficients: self.beta.clone(),
            std_errors,
            z,
            covariance,
            log_likelihood: stats.log_likelihood,
            n: stats.n,
            iterations: self.iterations,
        })
    }
}

/// Maximum-likelihood fit by Newton-Raphson with step-halving, from statistics evaluated by `stats_at` (a
/// local sum, or a sum over federated centres). Starts at zero.
pub fn fit_newton<E: From<LogisticError>>(
    names: &[&str],
    mut stats_at: impl FnMut(&[f64]) -> Result<LogisticStats, E>,
    options: NewtonOptions,
) -> Result<LogisticFit, E> {
    let mut solver = NewtonSolver::new(names, options);
    loop {
        let stats = stats_at(solver.point())?;
        if let NewtonStep::Converged(fit) = solver.observe(stats)? {
            return Ok(fit);
        }
    }
}

/// Fits `y` on the row-major design `x` (n × names.len(); include a column of ones for an intercept).
pub fn fit_logistic(
    names: &[&str],
    x: &[f64],
    y: &[bool],
    offset: Option<&[f64]>,
) -> Result<LogisticFit, LogisticError> {
    fit_newton(
        names,
        |beta| logistic_stats(x, y, offset, beta),
        NewtonOptions::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_steps_on_exact_statistics_reach_the_maximum_likelihood_fit() {
        let x: Vec<f64> = (0..60)
            .flat_map(|i| [1.0, (i % 2) as f64, ((i * 7) % 5) as f64 / 4.0])
            .collect();
        let y: Vec<bool> = (0..60).map(|i| (i * 13) % 7 < 3).collect();
        let names = ["(intercept)", "a", "b"];
        let exact = fit_logistic(&names, &x, &y, None).unwrap();
        let mut solver = NewtonSolver::new(&names, NewtonOptions::default());
        let mut fit = None;
        for round in 1..=12 {
            let stats = logistic_stats(&x, &y, None, solver.point()).unwrap();
            match solver.observe_noised(stats, round == 12).unwrap() {
                NewtonStep::Converged(f) => fit = Some(f),
                NewtonStep::Evaluate(_) => {}
            }
        }
        let fit = fit.unwrap();
        for (a, b) in fit.coefficients.iter().zip(&exact.coefficients) {
            assert!((a - b).abs() < 1e-9, "{a} {b}");
        }
        assert!((fit.std_errors[1] - exact.std_errors[1]).abs() < 1e-9);
    }

    #[test]
    fn a_single_binary_covariate_gives_the_two_by_two_table() {
        // 2x2 table: x=1: 8 events of 10; x=0: 3 of 12. Log odds ratio = ln((8/2)/(3/9)), se = sqrt(sum 1/cells).
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (xi, events, total) in [(1.0, 8, 10), (0.0, 3, 12)] {
            for k in 0..total {
                x.extend([1.0, xi]);
                y.push(k < events);
            }
        }
        let fit = fit_logistic(&["intercept", "x"], &x, &y, None).unwrap();
        let log_or = ((8.0 / 2.0) / (3.0 / 9.0f64)).ln();
        assert!((fit.coefficients[1] - log_or).abs() < 1e-10);
        let se = (1.0 / 8.0 + 1.0 / 2.0 + 1.0 / 3.0 + 1.0 / 9.0f64).sqrt();
        assert!((fit.std_errors[1] - se).abs() < 1e-10);
        assert!((fit.coefficients[0] - (3.0 / 9.0f64).ln()).abs() < 1e-10);
    }

    #[test]
    fn separation_and_collinearity_are_named() {
        let y = [false, false, true, true, false, true];
        // Complete separation: y equals x.
        let xs: Vec<f64> = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
            .iter()
            .flat_map(|&v| [1.0, v])
            .collect();
        let e = fit_logistic(&["intercept", "x"], &xs, &y, None).unwrap_err();
        assert!(
            matches!(&e, LogisticError::Separation { covariates } if covariates == "x"),
            "{e}"
        );
        // Quasi-complete: x = 1 only in events, but x = 0 has both outcomes.
        let xq: Vec<f64> = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
            .iter()
            .flat_map(|&v| [1.0, v])
            .collect();
        let e = fit_logistic(&["intercept", "x"], &xq, &y, None).unwrap_err();
        assert!(
            matches!(&e, LogisticError::Separation { covariates } if covariates == "x"),
            "{e}"
        );
        // A copy of the intercept.
        let ones = [1.0; 12];
        let e = fit_logistic(&["intercept", "one"], &ones, &y, None).unwrap_err();
        assert_eq!(e, LogisticError::Singular { name: "one".into() }, "{e}");
    }

    #[test]
    fn statistics_add_up_across_centers() {
        let x: Vec<f64> = (0..40)
            .flat_map(|i| [1.0, (i % 7) as f64, (i % 3) as f64])
            .collect();
        let y: Vec<bool> = (0..40).map(|i| (i * 7 + 3) % 5 < 2).collect();
        let beta = [0.1, -0.2, 0.3];
        let all = logistic_stats(&x, &y, None, &beta).unwrap();
        let mut sum = logistic_stats(&x[..45], &y[..15], None, &beta).unwrap();
        sum.add(&logistic_stats(&x[45..], &y[15..], None, &beta).unwrap())
            .unwrap();
        assert!((all.log_likelihood - sum.log_likelihood).abs() < 1e-12);
        for (a, b) in all.hessian.iter().zip(&sum.hessian) {
            assert!((a - b).abs() < 1e-12);
        }
        assert!(sum.add(&LogisticStats::zeros(2)).is_err());
    }
}
