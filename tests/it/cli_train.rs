//! `fedslm train`, `predict` and `model init`: for the clinical model statsmodels' numbers, for the image
//! networks cross-validation, out-of-fold predictions and model files on a synthetic cohort; predictions that
//! follow from the file, settings that must match, and files Python's safetensors reads.

use std::path::PathBuf;
use std::process::Command;

use crate::common::fedslm;
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
fn training_on_the_reference_centers_reproduces_statsmodels() {
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
    let Some(v) = python_reads(&model) else {
        return;
    };
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

/// The file as Python's safetensors reads it into numpy: tensors (shape and values), card and roles. `None`,
/// with a message, where no Python with safetensors is at hand and the run did not ask for one
/// (tools/test.sh sets FEDSLM_INTEROP_PYTHON, so CI always runs it).
fn python_reads(model: &std::path::Path) -> Option<Value> {
    let required = std::env::var("FEDSLM_INTEROP_PYTHON").ok();
    let python = required.clone().unwrap_or_else(|| "python3".into());
    let script = r#"
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="numpy") as f:
    out = {k: {"shape": list(f.get_tensor(k).shape), "dtype": str(f.get_tensor(k).dtype), "values": f.get_tensor(k).ravel().tolist()} for k in f.keys()}
    meta = f.metadata()
print(json.dumps({"tensors": out, "card": json.loads(meta["model_card"]), "roles": json.loads(meta["tensor_roles"])}))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(model)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).unwrap()),
        other if required.is_none() => {
            eprintln!(
                "skipped: no Python with safetensors ({python}: {}); tools/test.sh installs one",
                match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                }
            );
            None
        }
        Ok(o) => panic!(
            "{python} with safetensors (tools/test.sh installs it): {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{python}: {e}"),
    }
}

/// A tiny synthetic cohort and a client.toml whose preprocessing is small enough for quick training.
fn tiny_cohort(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let cohort = crate::common::tiny_synth_cohort(dir);
    let config = dir.join("client.toml");
    std::fs::write(
        &config,
        "center = \"center-a\"\nserver = \"h:1\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
         [preprocess]\nsize = 32\nneighbours = 0\n",
    )
    .unwrap();
    (cohort, config)
}

#[test]
fn image_networks_train_predict_and_load_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    let (cohort, config) = tiny_cohort(tmp.path());
    let out = tmp.path().join("out");
    let (ok, stdout, err) = fedslm(&[
        "train",
        "--cohort",
        &cohort.display().to_string(),
        "--centers",
        "center-a,center-b,center-c",
        "--model",
        "combined",
        "--config",
        &config.display().to_string(),
        "--folds",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--out",
        &out.display().to_string(),
        "--cache",
        &tmp.path().join("cache").display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("combined network (ResNet-10, width 8")
            && stdout.contains("on 26 patients")
            && stdout.contains("out-of-fold AUC"),
        "{stdout}"
    );
    let model = out.join("combined.safetensors");
    let (network, card) = fedslm_model::Network::load(&model).unwrap();
    assert_eq!(card.preprocess.size, 32);
    assert_eq!(card.training["patients"], 26);
    assert_eq!(card.training["train"]["epochs"], 2);
    assert_eq!(
        card.metrics["cross_validation"]["per_fold"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The standardisation is that of all 26 training patients' coded factors.
    let st = card.standardisation.clone().expect("a standardisation");
    assert_eq!(st.mean.len(), 5);
    assert!(st.mean.iter().all(|m| (0.0..=1.0).contains(m)));
    let cv = std::fs::read_to_string(out.join("combined-cv-predictions.csv")).unwrap();
    assert_eq!(cv.lines().count(), 27);
    assert!(cv.starts_with("patient_id,center,fold,label,probability\n"));

    // Predictions from the CLI are the network's on the same crops.
    let manifest = cohort.join("external/manifest.csv");
    let csv = tmp.path().join("external.csv");
    let (ok, _, err) = fedslm(&[
        "predict",
        "--model",
        &model.display().to_string(),
        "--manifest",
        &manifest.display().to_string(),
        "--config",
        &config.display().to_string(),
        "--out",
        &csv.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (coding, preprocess) = (card.coding, card.preprocess);
    let m = fedslm_cohort::Manifest::read(&manifest, &coding).unwrap();
    let (samples, _) =
        fedslm_cohort::load_center(&m, "external", &coding, &preprocess, None).unwrap();
    let want = network
        .predict(&samples.iter().collect::<Vec<_>>())
        .unwrap();
    let got: Vec<f64> = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, want);
    // Without the site's preprocessing the settings differ.
    let (ok, _, err) = fedslm(&[
        "predict",
        "--model",
        &model.display().to_string(),
        "--manifest",
        &manifest.display().to_string(),
    ]);
    assert!(!ok && err.contains("settings hash"), "{err}");

    let Some(v) = python_reads(&model) else {
        return;
    };
    let weights = network.to_weights().unwrap();
    assert_eq!(v["tensors"].as_object().unwrap().len(), weights.len());
    for t in weights.tensors() {
        let py = &v["tensors"][t.name()];
        assert_eq!(py["shape"], serde_json::json!(t.shape()), "{}", t.name());
        assert_eq!(py["dtype"], "float32", "{}", t.name());
        let values: Vec<f32> = py["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(values, t.to_f32_vec(), "{}", t.name());
    }
    assert_eq!(
        v["roles"]["layer2.0.downsample.1.running_var"],
        "batch_norm_statistic"
    );
    assert_eq!(v["roles"]["layer1.0.bn1.weight"], "batch_norm_parameter");
    assert_eq!(v["roles"]["fc.weight"], "parameter");
    assert_eq!(v["card"]["network"]["depth"], 10);
}

#[test]
fn model_init_writes_a_fresh_network() {
    let tmp = tempfile::tempdir().unwrap();
    let init = |out: &std::path::Path| {
        fedslm(&[
            "model",
            "init",
            "--model",
            "mri",
            "--arch",
            "resnet18",
            "--seed",
            "7",
            "--out",
            &out.display().to_string(),
        ])
    };
    let out = tmp.path().join("mri.safetensors");
    let (ok, stdout, err) = init(&out);
    assert!(ok, "{err}");
    assert!(stdout.contains("ResNet-18, width 64"), "{stdout}");
    let (network, card) = fedslm_model::Network::load(&out).unwrap();
    assert_eq!(card.model, "mri");
    assert_eq!(network.config.in_channels, 9);
    assert_eq!(network.config.input_size, 64);
    // The same seed gives the same weights.
    let again = tmp.path().join("again.safetensors");
    let (ok, _, err) = init(&again);
    assert!(ok, "{err}");
    let (a, _) = load(&out).unwrap();
    let (b, _) = load(&again).unwrap();
    assert_eq!(a, b);
    // An architecture the crop cannot carry is refused before anything is written.
    let (ok, _, err) = fedslm(&[
        "model",
        "init",
        "--model",
        "combined",
        "--arch",
        "resnet18",
        "--width",
        "0",
        "--out",
        &tmp.path().join("bad.safetensors").display().to_string(),
    ]);
    assert!(!ok && err.contains("width 0"), "{err}");
}

#[test]
fn model_init_starts_the_combined_head_at_a_clinical_model() {
    let tmp = tempfile::tempdir().unwrap();
    let clinical_file = train(tmp.path());
    let beta = clinical::coefficients(&load(&clinical_file).unwrap().0).unwrap();
    let init = |model: &str, clinical: &std::path::Path, out: &std::path::Path| {
        fedslm(&[
            "model",
            "init",
            "--model",
            model,
            "--clinical",
            &clinical.display().to_string(),
            "--out",
            &out.display().to_string(),
        ])
    };
    let out = tmp.path().join("combined.safetensors");
    let (ok, _, err) = init("combined", &clinical_file, &out);
    assert!(ok, "{err}");
    // The head's clinical columns and bias are the clinical model's coefficients (identity standardisation).
    let (weights, card) = load(&out).unwrap();
    let fc = weights.get("fc.weight").unwrap().to_f32_vec();
    let bias = weights.get("fc.bias").unwrap().to_f32_vec();
    assert_eq!(bias, vec![beta[0] as f32]);
    assert_eq!(
        &fc[fc.len() - 5..],
        &beta[1..].iter().map(|&b| b as f32).collect::<Vec<_>>()[..]
    );
    assert_eq!(
        card.training["head_from_clinical"]["coefficients"][4],
        beta[4]
    );

    // Only the combined network has a clinical head; only a clinical model can start it.
    let (ok, _, err) = init("mri", &clinical_file, &tmp.path().join("mri.safetensors"));
    assert!(
        !ok && err.contains("does not apply to the mri model"),
        "{err}"
    );
    let (ok, _, err) = init("combined", &out, &tmp.path().join("again.safetensors"));
    assert!(
        !ok && err.contains("a combined model, not a clinical one"),
        "{err}"
    );
    assert!(!tmp.path().join("again.safetensors").exists());
}
