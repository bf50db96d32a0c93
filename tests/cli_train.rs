//! `fedslm train`, `predict` and `model init` for the clinical model: statsmodels' numbers, predictions that
//! follow from the file, settings that must match, and a file Python's safetensors reads.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::fedslm;
use fedslm_model::{clinical, load};
use serde_json::Value;

fn reference() -> PathBuf {
    PathBuf::from(env!("FEDSLM_REFERENCE"))
}

fn train(out: &std::path::Path) -> PathBuf {
    let cohort = reference().join("clinical");
    let (ok, stdout, err) = fedslm(&[
        "train",
        "--cohort",
        &cohort.display().to_string(),
        "--model",
        "clinical",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("cea_high") && stdout.contains("out-of-fold AUC"),
        "{stdout}"
    );
    out.join("clinical.safetensors")
}

#[test]
fn training_on_the_reference_centres_reproduces_statsmodels() {
    let tmp = tempfile::tempdir().unwrap();
    let model = train(tmp.path());
    let (weights, card) = load(&model).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(reference().join("clinical/expected_pooled_logit.json")).unwrap(),
    )
    .unwrap();
    let table = card.clinical.expect("an odds-ratio table");
    let coefficients = clinical::coefficients(&weights).unwrap();
    for (i, name) in clinical::names().iter().enumerate() {
        let row = &table.coefficients[*name];
        let want = expected["coefficients"][name].as_f64().unwrap();
        assert!(
            (row["estimate"].as_f64().unwrap() - want).abs() < 1e-6,
            "{name}"
        );
        assert_eq!(
            row["estimate"].as_f64().unwrap(),
            coefficients[i],
            "{name}: card and tensor"
        );
        assert!(
            (row["std_error"].as_f64().unwrap() - expected["std_errors"][name].as_f64().unwrap())
                .abs()
                < 1e-5,
            "{name}"
        );
        assert!(
            (row["odds_ratio"].as_f64().unwrap() - expected["odds_ratios"][name].as_f64().unwrap())
                .abs()
                < 1e-5,
            "{name}"
        );
        for k in 0..2 {
            let (g, w) = (
                row["or_ci95"][k].as_f64().unwrap(),
                expected["or_ci95"][name][k].as_f64().unwrap(),
            );
            assert!(
                (g - w).abs() < 1e-4 * w.max(1.0),
                "{name} CI {k}: {g} vs {w}"
            );
        }
    }
    assert!((table.log_likelihood - expected["log_likelihood"].as_f64().unwrap()).abs() < 1e-8);
    assert_eq!(card.training["patients"], 176);
    let cv = &card.metrics["cross_validation"];
    assert_eq!(cv["per_fold"].as_array().unwrap().len(), 5);
    let auc = cv["out_of_fold"]["auc"].as_f64().unwrap();
    assert!(auc > 0.7 && auc < 0.9, "{auc}");
}

#[test]
fn predictions_follow_from_the_file_and_settings_must_match() {
    let tmp = tempfile::tempdir().unwrap();
    let model = train(tmp.path());
    let (weights, _) = load(&model).unwrap();
    let beta = clinical::coefficients(&weights).unwrap();
    let manifest = reference().join("clinical/center-b/manifest.csv");
    let out = tmp.path().join("p.csv");
    let (ok, _, err) = fedslm(&[
        "predict",
        "--model",
        &model.display().to_string(),
        "--manifest",
        &manifest.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let csv = std::fs::read_to_string(&out).unwrap();
    let m = fedslm_cohort::Manifest::read(&manifest, &Default::default()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "patient_id,label,probability");
    assert_eq!(lines.len(), m.patients.len() + 1);
    for (p, line) in m.patients.iter().zip(&lines[1..]) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], p.id);
        let x = clinical::row(&fedslm_cohort::ClinicalCoding::default(), p);
        let eta: f64 = x.iter().zip(&beta).map(|(a, b)| a * b).sum();
        let prob: f64 = f[2].parse().unwrap();
        assert!(
            (prob - 1.0 / (1.0 + (-eta).exp())).abs() < 1e-15,
            "{}",
            p.id
        );
    }
    // A site coding CEA at 10 ng/mL would feed the model other inputs.
    let config = tmp.path().join("client.toml");
    std::fs::write(&config, "center = \"center-b\"\nserver = \"h:1\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[coding]\ncea_cutoff = 10.0\n").unwrap();
    let (ok, _, err) = fedslm(&[
        "predict",
        "--model",
        &model.display().to_string(),
        "--manifest",
        &manifest.display().to_string(),
        "--config",
        &config.display().to_string(),
    ]);
    assert!(
        !ok && err.contains("settings hash") && err.contains("differs from the model's"),
        "{err}"
    );
}

#[test]
fn model_init_and_python_reads_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    let (ok, _, err) = fedslm(&[
        "model",
        "init",
        "--model",
        "clinical",
        "--seed",
        "1",
        "--out",
        &init.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (w, card) = load(&init).unwrap();
    assert_eq!(clinical::coefficients(&w).unwrap(), vec![0.0; 6]);
    assert_eq!(card.model, "clinical");

    let model = train(tmp.path());
    let python = std::env::var("FEDSLM_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="numpy") as f:
    out = {k: {"shape": list(f.get_tensor(k).shape), "values": f.get_tensor(k).ravel().tolist()} for k in f.keys()}
    meta = f.metadata()
print(json.dumps({"tensors": out, "card": json.loads(meta["model_card"]), "roles": json.loads(meta["tensor_roles"])}))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&model)
        .output()
        .expect("no Python");
    assert!(
        out.status.success(),
        "{python} with safetensors (tools/test.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (weights, card) = load(&model).unwrap();
    for t in weights.tensors() {
        let py = &v["tensors"][t.name()];
        assert_eq!(py["shape"], serde_json::json!(t.shape()), "{}", t.name());
        let values: Vec<f64> = py["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(values, t.to_f64_vec(), "{}", t.name());
        assert_eq!(v["roles"][t.name()], "parameter");
    }
    assert_eq!(v["card"]["settings_hash"], card.settings_hash);
    assert!(v["card"]["clinical"]["coefficients"]["cea_high"]["or_ci95"].is_array());
}
