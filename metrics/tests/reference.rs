//! The metrics against what established implementations computed on the same inputs: R pROC 1.18,
//! scikit-learn 1.9, dcurves 1.1 and statsmodels 0.15, in `shared/reference` beside the repository.

use std::path::PathBuf;

use fedslm_metrics::*;
use serde_json::Value;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("FEDSLM_REFERENCE"))
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(num).collect()
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        got == want || (got - want).abs() <= tol,
        "{what}: got {got:.17}, reference {want:.17}, tolerance {tol}"
    );
}

fn p_close(what: &str, got: f64, want: f64) {
    let ok = (got - want).abs() <= 1e-6 || (got - want).abs() <= 1e-4 * want.abs();
    assert!(ok, "{what}: got {got:e}, reference {want:e}");
}

struct Case {
    name: String,
    labels: Vec<bool>,
    a: Vec<f64>,
    b: Vec<f64>,
    expected: Value,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(reference_dir().join("metrics/cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            labels: c["label"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_i64() == Some(1))
                .collect(),
            a: nums(&c["score_a"]),
            b: nums(&c["score_b"]),
            expected: c["expected"].clone(),
        })
        .collect()
}

#[test]
fn there_are_the_four_documented_cases() {
    let names: Vec<String> = cases().into_iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        ["n31_ties", "n176", "n500_imbalanced", "n60_perfectish"]
    );
}

#[test]
fn auc_delong_variance_and_ci_match_proc() {
    for c in cases() {
        let r = &c.expected["pROC"];
        for (side, scores) in [("a", &c.a), ("b", &c.b)] {
            let d = delong(&c.labels, scores).unwrap().estimate;
            let what = format!("{} score_{side}", c.name);
            close(
                &format!("{what} auc"),
                d.auc,
                num(&r[format!("auc_{side}")]),
                1e-9,
            );
            close(
                &format!("{what} var"),
                d.variance,
                num(&r[format!("var_delong_{side}")]),
                1e-9,
            );
            let ci = nums(&r[format!("ci95_delong_{side}")]);
            let (lo, hi) = d.ci95();
            close(&format!("{what} ci low"), lo, ci[0], 1e-6);
            close(&format!("{what} ci high"), hi, ci[1], 1e-6);
        }
        close(
            &format!("{} sklearn auc", c.name),
            delong(&c.labels, &c.a).unwrap().estimate.auc,
            num(&c.expected["sklearn"]["roc_auc_a"]),
            1e-9,
        );
    }
}

#[test]
fn paired_delong_matches_proc_roc_test() {
    for c in cases() {
        let r = &c.expected["pROC"];
        let t = paired_delong(&c.labels, &c.a, &c.b).unwrap();
        close(
            &format!("{} z", c.name),
            t.z,
            num(&r["paired_delong_z_a_vs_b"]),
            1e-6,
        );
        p_close(
            &format!("{} p", c.name),
            t.p,
            num(&r["paired_delong_p_a_vs_b"]),
        );
    }
}

#[test]
fn youden_matches_proc_coords_best() {
    for c in cases() {
        let r = &c.expected["pROC"]["youden_a"];
        let y = youden(&c.labels, &c.a).unwrap();
        close(
            &format!("{} threshold", c.name),
            y.threshold,
            num(&r["threshold"]),
            1e-12,
        );
        close(
            &format!("{} sensitivity", c.name),
            y.sensitivity().unwrap(),
            num(&r["sensitivity"]),
            1e-12,
        );
        close(
            &format!("{} specificity", c.name),
            y.specificity().unwrap(),
            num(&r["specificity"]),
            1e-12,
        );
    }
}

#[test]
fn brier_matches_sklearn() {
    for c in cases() {
        close(
            &format!("{} brier", c.name),
            brier(&c.labels, &c.a).unwrap(),
            num(&c.expected["sklearn"]["brier_a"]),
            1e-12,
        );
    }
}

#[test]
fn net_benefit_matches_dcurves() {
    for c in cases() {
        let r = &c.expected["dcurves"];
        let thresholds = nums(&r["thresholds"]);
        let curve = decision_curve(&c.labels, &c.a, &thresholds).unwrap();
        for (k, t) in thresholds.iter().enumerate() {
            let what = format!("{} at {t}", c.name);
            close(
                &format!("{what} model"),
                curve.model[k],
                nums(&r["net_benefit_a"])[k],
                1e-9,
            );
            close(
                &format!("{what} all"),
                curve.treat_all[k],
                nums(&r["net_benefit_treat_all"])[k],
                1e-9,
            );
            close(
                &format!("{what} none"),
                curve.treat_none[k],
                nums(&r["net_benefit_treat_none"])[k],
                1e-9,
            );
        }
    }
}

/// Scores rounded down to a grid of `bins`, as histograms see them.
fn rounded(scores: &[f64], h: &ScoreHistograms) -> Vec<f64> {
    scores.iter().map(|&s| h.bin_value(h.bin_of(s))).collect()
}

#[test]
fn histograms_give_the_direct_results_on_scores_rounded_to_the_bin_grid() {
    for c in cases() {
        for bins in [10, 97, DEFAULT_BINS] {
            // Two "centres": the first third of the patients and the rest, merged.
            let cut = c.labels.len() / 3;
            let mut h = ScoreHistograms::from_scores(&c.labels[..cut], &c.a[..cut], bins).unwrap();
            h.merge(&ScoreHistograms::from_scores(&c.labels[cut..], &c.a[cut..], bins).unwrap())
                .unwrap();
            let r = rounded(&c.a, &h);
            let what = format!("{} with {bins} bins", c.name);
            let direct = delong(&c.labels, &r).unwrap().estimate;
            let binned = h.delong().unwrap();
            close(&format!("{what} auc"), binned.auc, direct.auc, 1e-12);
            close(
                &format!("{what} var"),
                binned.variance,
                direct.variance,
                1e-12,
            );
            let roc_direct = roc_curve(&c.labels, &r).unwrap();
            let roc_binned = h.roc_curve().unwrap();
            assert_eq!(roc_direct.len(), roc_binned.len(), "{what}");
            for (p, q) in roc_direct.iter().zip(&roc_binned) {
                close(
                    &format!("{what} roc threshold"),
                    q.threshold,
                    p.threshold,
                    1e-12,
                );
                assert_eq!(
                    (p.sensitivity, p.specificity),
                    (q.sensitivity, q.specificity),
                    "{what}"
                );
            }
            let t = default_thresholds();
            let dc_direct = decision_curve(&c.labels, &r, &t).unwrap();
            let dc_binned = h.decision_curve(&t).unwrap();
            for k in 0..t.len() {
                close(
                    &format!("{what} nb"),
                    dc_binned.model[k],
                    dc_direct.model[k],
                    1e-12,
                );
                close(
                    &format!("{what} all"),
                    dc_binned.treat_all[k],
                    dc_direct.treat_all[k],
                    1e-12,
                );
            }
            // The second pass: placement sums from two centres give the paired test.
            let hb = ScoreHistograms::from_scores(&c.labels, &c.b, bins).unwrap();
            let mut sums =
                PlacementSums::from_patients(&h, &hb, &c.labels[..cut], &c.a[..cut], &c.b[..cut])
                    .unwrap();
            sums.add(
                &PlacementSums::from_patients(&h, &hb, &c.labels[cut..], &c.a[cut..], &c.b[cut..])
                    .unwrap(),
            );
            let federated = sums.paired_test().unwrap();
            let direct = paired_delong(&c.labels, &r, &rounded(&c.b, &hb)).unwrap();
            close(&format!("{what} paired z"), federated.z, direct.z, 1e-9);
            p_close(&format!("{what} paired p"), federated.p, direct.p);
        }
        // Fine bins barely move the AUC.
        let h = ScoreHistograms::from_scores(&c.labels, &c.a, DEFAULT_BINS).unwrap();
        close(
            &format!("{} binned vs exact", c.name),
            h.delong().unwrap().auc,
            delong(&c.labels, &c.a).unwrap().estimate.auc,
            1e-3,
        );
    }
}

const NAMES: [&str; 6] = [
    "intercept",
    "male",
    "site_low",
    "site_high",
    "cea_high",
    "ca199_high",
];

/// A centre's design matrix under DESIGN.md's default clinical coding, read from its manifest.
fn center(name: &str) -> (Vec<f64>, Vec<bool>) {
    let path = reference_dir()
        .join("clinical")
        .join(name)
        .join("manifest.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let site = f[col("site")];
        let cea: f64 = f[col("cea")].parse().unwrap();
        let ca199: f64 = f[col("ca199")].parse().unwrap();
        let b = |c: bool| if c { 1.0 } else { 0.0 };
        x.extend([
            1.0,
            b(f[col("sex")] == "M"),
            b(site == "low"),
            b(site == "high"),
            b(cea > 5.0),
            b(ca199 > 37.0),
        ]);
        y.push(f[col("slm")] == "1");
    }
    (x, y)
}

fn check_against_statsmodels(fit: &LogisticFit, how: &str) {
    let text = std::fs::read_to_string(reference_dir().join("clinical/expected_pooled_logit.json"))
        .unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fit.n, r["n"].as_u64().unwrap(), "{how}");
    close(
        &format!("{how} log-likelihood"),
        fit.log_likelihood,
        num(&r["log_likelihood"]),
        1e-8,
    );
    for (i, name) in NAMES.iter().enumerate() {
        close(
            &format!("{how} {name} coefficient"),
            fit.coefficients[i],
            num(&r["coefficients"][name]),
            1e-6,
        );
        close(
            &format!("{how} {name} se"),
            fit.std_errors[i],
            num(&r["std_errors"][name]),
            1e-5,
        );
        close(
            &format!("{how} {name} OR"),
            fit.odds_ratio(i),
            num(&r["odds_ratios"][name]),
            1e-5,
        );
        let (lo, hi) = fit.odds_ratio_ci95(i);
        let ci = nums(&r["or_ci95"][name]);
        close(&format!("{how} {name} OR low"), lo, ci[0], 1e-5);
        close(&format!("{how} {name} OR high"), hi, ci[1], 1e-4);
    }
}

#[test]
fn pooled_logistic_regression_matches_statsmodels() {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for c in ["center-a", "center-b", "center-c"] {
        let (cx, cy) = center(c);
        x.extend(cx);
        y.extend(cy);
    }
    let fit = fit_logistic(&NAMES, &x, &y, None).unwrap();
    check_against_statsmodels(&fit, "pooled");
}

#[test]
fn federated_newton_from_summed_statistics_gives_the_pooled_fit() {
    let centers: Vec<(Vec<f64>, Vec<bool>)> = ["center-a", "center-b", "center-c"]
        .iter()
        .map(|c| center(c))
        .collect();
    let mut rounds = 0;
    let fit = fit_newton(
        &NAMES,
        |beta| {
            rounds += 1;
            let mut total = LogisticStats::zeros(beta.len());
            for (x, y) in &centers {
                // Each centre computes its own statistics; only these sums leave it.
                total.add(&logistic_stats(x, y, None, beta)?)?;
            }
            Ok::<_, LogisticError>(total)
        },
        NewtonOptions::default(),
    )
    .unwrap();
    check_against_statsmodels(&fit, "federated");
    assert!(rounds < 20, "{rounds} rounds of statistics");
}

/// The accountant against Google's dp-accounting 0.6.0 `RdpAccountant`: each case's per-step RDP at every order
/// (within 1e-9 relative; an order dp-accounting left infinite is infinite here too) and its epsilon (within
/// 1e-6 relative) at the order it chose.
#[test]
fn the_accountant_equals_dp_accountings() {
    // The file writes dp-accounting's excluded orders as `Infinity`, which JSON lacks.
    let text = std::fs::read_to_string(reference_dir().join("privacy/accountant.json"))
        .unwrap()
        .replace("Infinity", "null");
    let cases: Value = serde_json::from_str(&text).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let (q, sigma) = (num(&case["sampling_rate"]), num(&case["noise_multiplier"]));
        let steps = case["steps"].as_u64().unwrap();
        let delta = num(&case["delta"]);
        let orders = nums(&case["orders"]);
        let what = format!("q {q}, sigma {sigma}, {steps} steps");
        let want: Vec<f64> = case["rdp_per_step"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::INFINITY))
            .collect();
        for (&a, &w) in orders.iter().zip(&want) {
            let got = rdp::subsampled_gaussian(q, sigma, a).unwrap();
            if w.is_infinite() {
                assert!(
                    got.is_infinite(),
                    "{what}, order {a}: got {got}, dp-accounting excluded it"
                );
            } else {
                close(&format!("{what}, order {a}"), got, w, 1e-9 * w.abs());
            }
        }
        let total = rdp::composed(q, sigma, steps, &orders).unwrap();
        let e = rdp::epsilon(&orders, &total, delta).unwrap();
        let want_eps = num(&case["epsilon"]);
        close(
            &format!("{what}: epsilon"),
            e.epsilon,
            want_eps,
            1e-6 * want_eps,
        );
        assert_eq!(e.order, num(&case["optimal_order"]), "{what}");
    }
}
