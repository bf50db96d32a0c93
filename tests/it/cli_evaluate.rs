//! `fedslm evaluate` end to end: the JSON it prints against R pROC, scikit-learn and dcurves, and a clear
//! error naming the line and column for each kind of bad input.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn evaluate(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["evaluate"];
    all.extend(args);
    crate::common::fedslm_in(dir, &all)
}

fn reference_dir() -> PathBuf {
    crate::common::reference("")
}

fn close(what: &str, got: &Value, want: &Value, tol: f64) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!((g - w).abs() <= tol, "{what}: {g} vs reference {w}");
}

#[test]
fn json_matches_the_reference_implementations() {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(reference_dir().join("metrics/cases.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        // Columns in an unusual order, with an id column that is not a score.
        let mut csv = String::from("patient_id,model_b,outcome,model_a\n");
        for i in 0..case["label"].as_array().unwrap().len() {
            csv += &format!(
                "P{i:04},{},{},{}\n",
                case["score_b"][i], case["label"][i], case["score_a"][i]
            );
        }
        let file = tmp.path().join(format!("{name}.csv"));
        std::fs::write(&file, csv).unwrap();
        let (ok, out, err) = evaluate(
            tmp.path(),
            &[
                "--predictions",
                file.to_str().unwrap(),
                "--label",
                "outcome",
                "--json",
            ],
        );
        assert!(ok, "{name}: {err}");
        let got: Value = serde_json::from_str(&out).unwrap();
        let e = &case["expected"];
        let keys: Vec<&String> = got["scores"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["model_b", "model_a"], "{name}: file order");
        assert_eq!(got["n"], case["label"].as_array().unwrap().len());
        for (col, side) in [("model_a", "a"), ("model_b", "b")] {
            let s = &got["scores"][col];
            let what = format!("{name} {col}");
            close(
                &format!("{what} auc"),
                &s["auc"],
                &e["pROC"][format!("auc_{side}")],
                1e-9,
            );
            close(
                &format!("{what} var"),
                &s["delong_var"],
                &e["pROC"][format!("var_delong_{side}")],
                1e-9,
            );
            close(
                &format!("{what} ci lo"),
                &s["ci95"][0],
                &e["pROC"][format!("ci95_delong_{side}")][0],
                1e-6,
            );
            close(
                &format!("{what} ci hi"),
                &s["ci95"][1],
                &e["pROC"][format!("ci95_delong_{side}")][1],
                1e-6,
            );
        }
        let a = &got["scores"]["model_a"];
        let y = &e["pROC"]["youden_a"];
        close(
            &format!("{name} youden threshold"),
            &a["youden"]["threshold"],
            &y["threshold"],
            1e-12,
        );
        close(
            &format!("{name} youden sens"),
            &a["youden"]["sensitivity"],
            &y["sensitivity"],
            1e-12,
        );
        close(
            &format!("{name} youden spec"),
            &a["youden"]["specificity"],
            &y["specificity"],
            1e-12,
        );
        close(
            &format!("{name} brier"),
            &a["brier"],
            &e["sklearn"]["brier_a"],
            1e-12,
        );
        let thresholds = a["dca"]["thresholds"].as_array().unwrap();
        assert_eq!(
            thresholds,
            e["dcurves"]["thresholds"].as_array().unwrap(),
            "{name}: default grid"
        );
        for k in 0..thresholds.len() {
            close(
                &format!("{name} nb {k}"),
                &a["dca"]["net_benefit"][k],
                &e["dcurves"]["net_benefit_a"][k],
                1e-9,
            );
            close(
                &format!("{name} all {k}"),
                &a["dca"]["treat_all"][k],
                &e["dcurves"]["net_benefit_treat_all"][k],
                1e-9,
            );
            close(
                &format!("{name} none {k}"),
                &a["dca"]["treat_none"][k],
                &e["dcurves"]["net_benefit_treat_none"][k],
                1e-9,
            );
        }
        let c = &got["comparisons"][0];
        assert_eq!(
            (c["a"].as_str(), c["b"].as_str()),
            (Some("model_b"), Some("model_a"))
        );
        // b vs a: the sign of z flips, p does not.
        let z = -c["z"].as_f64().unwrap();
        let want_z = e["pROC"]["paired_delong_z_a_vs_b"].as_f64().unwrap();
        assert!((z - want_z).abs() < 1e-6, "{name}: z {z} vs {want_z}");
        let (p, want_p) = (
            c["p"].as_f64().unwrap(),
            e["pROC"]["paired_delong_p_a_vs_b"].as_f64().unwrap(),
        );
        assert!(
            (p - want_p).abs() < 1e-6 || (p - want_p).abs() < 1e-4 * want_p,
            "{name}: p {p} vs {want_p}"
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    name.to_string()
}

fn fails_with(dir: &Path, text: &str, extra: &[&str], expected: &str) {
    let f = write(dir, "bad.csv", text);
    let mut args = vec!["--predictions", f.as_str()];
    args.extend(extra);
    let (ok, _, err) = evaluate(dir, &args);
    assert!(!ok, "accepted:\n{text}");
    assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
}

#[test]
fn bad_input_is_named_by_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = "label,score\n1,0.9\n0,0.2\n1,0.7\n0,0.4\n";
    let (ok, out, err) = evaluate(d, &["--predictions", &write(d, "good.csv", good)]);
    assert!(ok, "{err}");
    assert!(out.contains("4 patients, 2 positive"), "{out}");

    fails_with(
        d,
        "label,score\n1,0.9\n2,0.2\n1,0.7\n0,0.4\n",
        &[],
        "bad.csv: line 3, column \"label\": label \"2\" is not 0 or 1",
    );
    fails_with(
        d,
        "label,score\n1,0.9\n0,\n1,0.7\n0,0.4\n",
        &[],
        "line 3, column \"score\": empty score",
    );
    fails_with(
        d,
        "label,score\n1,0.9\n0,0.2\n1,high\n0,0.4\n",
        &[],
        "line 4, column \"score\": \"high\" is not a number",
    );
    fails_with(
        d,
        "label,score\n1,0.9\n0,NaN\n1,0.7\n0,0.4\n",
        &[],
        "line 3, column \"score\": NaN is not a finite score",
    );
    fails_with(
        d,
        "label,score\n1,0.9\n0,0.2\n1,inf\n0,0.4\n",
        &[],
        "line 4, column \"score\": inf is not a finite score",
    );
    fails_with(
        d,
        "label,score\n1,0.9\n1,0.2\n1,0.7\n",
        &[],
        "all 3 patients have label 1; ROC analysis needs both classes",
    );
    fails_with(d, "label,id\n1,a\n0,b\n", &[], "no score column");
    fails_with(
        d,
        "label,score,score\n1,0.9,0.1\n0,0.2,0.3\n",
        &[],
        "column \"score\" appears twice (columns 2 and 3)",
    );
    fails_with(
        d,
        "outcome,score\n1,0.9\n0,0.2\n",
        &[],
        "no column \"label\"; the columns are outcome, score",
    );
    fails_with(d, good, &["--score", "nope"], "no column \"nope\"");
    fails_with(d, "label,score\n1,0.9\n0,0.2,7\n", &[], "malformed CSV");
    fails_with(
        d,
        good,
        &["--thresholds", "0.1,1.5"],
        "--thresholds: 1.5 is not strictly between 0 and 1",
    );
    fails_with(
        d,
        "label,score\n1,0.9\n0,0.2\n",
        &[],
        "at least 2 positive and 2 negative",
    );
}

#[test]
fn plots_scores_that_are_not_probabilities_and_chosen_thresholds() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f = write(
        d,
        "p.csv",
        "label,risk,logit\n1,0.9,2.1\n0,0.2,-1.3\n1,0.7,0.4\n0,0.4,-0.2\n0,0.1,-2.0\n1,0.3,0.1\n",
    );
    let (ok, out, err) = evaluate(
        d,
        &[
            "--predictions",
            &f,
            "--json",
            "--plot",
            "figs",
            "--thresholds",
            "0.1,0.5",
        ],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["scores"]["logit"]["brier"].is_null());
    assert!(v["scores"]["logit"]["calibration"].is_null());
    assert!(v["scores"]["logit"]["dca"].is_null());
    assert!(v["scores"]["risk"]["brier"].is_number());
    assert_eq!(
        v["scores"]["risk"]["dca"]["thresholds"],
        serde_json::json!([0.1, 0.5])
    );
    for name in ["roc.png", "dca.png", "calibration.png"] {
        let bytes = std::fs::read(d.join("figs").join(name)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}");
    }
    let svg = std::fs::read_to_string(d.join("figs/roc.svg")).unwrap();
    assert!(
        svg.contains("risk: AUC") && svg.contains("Sensitivity"),
        "{svg}"
    );
    let svg = std::fs::read_to_string(d.join("figs/dca.svg")).unwrap();
    assert!(svg.contains("Net benefit") && svg.contains("Treat all"));
    // Only the probability gets a calibration curve (the logit is not one).
    let svg = std::fs::read_to_string(d.join("figs/calibration.svg")).unwrap();
    assert!(
        svg.contains("risk: Brier") && !svg.contains("logit"),
        "{svg}"
    );
}
