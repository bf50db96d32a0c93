//! The groups of predicted risk that Hosmer-Lemeshow and the calibration figure share, against numpy's
//! quantiles (R's type 7) live, on the reference cases' scores. Runs tools/interop/calibration_groups.py in the
//! Python that tools/test.sh sets up.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

#[test]
fn risk_groups_and_the_statistic_are_numpys_deciles() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(crate::common::reference("metrics/cases.json")).unwrap(),
    )
    .unwrap();
    let inputs: Vec<(Vec<bool>, Vec<f64>)> = cases
        .iter()
        .flat_map(|c| {
            let labels: Vec<bool> = c["label"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64() == Some(1))
                .collect();
            ["score_a", "score_b"].map(|k| {
                let p = c[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                (labels.clone(), p)
            })
        })
        .collect();
    let request = json!({
        "g": 10,
        "cases": inputs.iter().map(|(y, p)| json!({"label": y.iter().map(|&b| u8::from(b)).collect::<Vec<_>>(), "prob": p})).collect::<Vec<_>>(),
    });
    let python = std::env::var("FEDSLM_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/interop/calibration_groups.py"
    );
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("no Python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{python} {script} failed (run the tests with tools/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(want.len(), inputs.len());
    for (i, ((labels, probs), w)) in inputs.iter().zip(&want).enumerate() {
        let groups = fedslm_metrics::risk_groups(labels, probs, 10).unwrap();
        let nums = |k: &str| -> Vec<f64> {
            w[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let (count, observed, expected) = (nums("count"), nums("observed"), nums("expected"));
        assert_eq!(groups.len(), count.len(), "case {i}: groups");
        for (k, g) in groups.iter().enumerate() {
            assert_eq!(g.count, count[k], "case {i} group {k}: count");
            assert_eq!(g.observed, observed[k], "case {i} group {k}: observed");
            assert!(
                (g.expected - expected[k]).abs() < 1e-9,
                "case {i} group {k}: expected {} vs {}",
                g.expected,
                expected[k]
            );
        }
        let hl = fedslm_metrics::hosmer_lemeshow(labels, probs, 10).unwrap();
        let statistic = w["statistic"].as_f64().unwrap();
        assert!(
            (hl.statistic - statistic).abs() < 1e-9 * statistic.max(1.0),
            "case {i}: {} vs {statistic}",
            hl.statistic
        );
    }
}
