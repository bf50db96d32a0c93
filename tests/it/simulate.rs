//! `fedslm simulate` from the shell: the whole study's machinery over loopback QUIC, checked against reference
//! values.

use std::path::Path;

use crate::common::fedslm;
use serde_json::Value;

fn reference() -> std::path::PathBuf {
    crate::common::reference("clinical")
}

#[test]
fn the_clinical_model_simulated_over_the_reference_centers_is_the_pooled_statsmodels_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sim");
    let (ok, stdout, err) = fedslm(&[
        "--log",
        "warn",
        "simulate",
        "--cohort",
        &reference().display().to_string(),
        "--models",
        "clinical",
        "--holdout",
        "none",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{stdout}\n{err}");
    assert!(stdout.contains("clinical fold 5/5"), "{stdout}");

    // The model fitted on all three centres is statsmodels' pooled fit.
    crate::common::assert_pooled_statsmodels_fit(&out.join("models/clinical.safetensors"));

    // The internal estimate scores every labelled patient once, out of fold; no external centre here.
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let clinical = &results["models"]["clinical"];
    let n = &clinical["internal"]["n"];
    assert_eq!(
        n["positives"].as_u64().unwrap() + n["negatives"].as_u64().unwrap(),
        176,
        "{clinical}"
    );
    let auc = clinical["internal"]["auc"].as_f64().unwrap();
    let ci = clinical["internal"]["ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < auc && auc < ci[1].as_f64().unwrap());
    assert!(auc > 0.7, "{auc}");
    assert_eq!(clinical["external"], Value::Null);
    assert_eq!(clinical["rounds"]["folds"].as_array().unwrap().len(), 5);
    assert_eq!(
        clinical["per_center_internal"].as_object().unwrap().len(),
        3
    );
    assert!(results["wall_seconds"].as_f64().unwrap() > 0.0);
    // Where the time went, phase by phase; the centralised baseline trained alongside the federations.
    let phases = crate::common::field_strs(&results["phases"], "name");
    assert!(phases.contains(&"clinical federations"), "{phases:?}");
    assert!(
        phases
            .iter()
            .any(|p| p.starts_with("centralised baselines")),
        "{phases:?}"
    );
    assert!(stdout.contains("time by phase: "), "{stdout}");
    // The centralised baseline's model is the same pooled fit, and it too scores everyone out of fold.
    let central = &clinical["centralised"];
    crate::common::assert_pooled_statsmodels_fit(Path::new(central["model"].as_str().unwrap()));
    let n = &central["internal"]["n"];
    assert_eq!(
        n["positives"].as_u64().unwrap() + n["negatives"].as_u64().unwrap(),
        176,
        "{central}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| cea_high |"), "{report}");
    for f in [
        "roc.png",
        "roc.svg",
        "dca.png",
        "dca.svg",
        "calibration.png",
        "calibration.svg",
    ] {
        assert!(out.join("figures/internal").join(f).is_file(), "{f}");
    }

    // Settings that cannot work are refused before anything is written.
    for (flag, value, needle) in [
        ("--folds", "1", "--folds 1"),
        ("--bins", "1", "--bins 1"),
        ("--rounds", "0", "--rounds"),
    ] {
        let fresh = tmp.path().join(format!("bad{flag}"));
        let (ok, _, err) = fedslm(&[
            "simulate",
            "--cohort",
            &reference().display().to_string(),
            flag,
            value,
            "--out",
            &fresh.display().to_string(),
        ]);
        assert!(!ok && err.contains(needle), "{flag}: {err}");
        assert!(!fresh.exists(), "{flag}: nothing written");
    }

    // A second run into the same folder is refused rather than mixed with the first.
    let (ok, _, err) = fedslm(&[
        "simulate",
        "--cohort",
        &reference().display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(!ok);
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn a_network_is_cross_validated_and_validated_externally_with_figures_for_both() {
    // combined brings the clinical model with it: each fold's network starts at that fold's clinical fit.
    let tmp = tempfile::tempdir().unwrap();
    let cohort = tmp.path().join("cohort");
    let (ok, _, err) = fedslm(&[
        "synth",
        "--preset",
        "study",
        "--out",
        &cohort.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let out = tmp.path().join("sim");
    let (stdout, results) = quick(&cohort, &out, "combined", "2", &[]);
    assert!(
        stdout.contains("held out for external validation"),
        "{stdout}"
    );
    let combined = &results["models"]["combined"];
    assert_eq!(results["holdout"], "external");
    // Every labelled training patient once internally; the external centre's patients externally.
    let n = |side: &str| {
        combined[side]["n"]["positives"].as_u64().unwrap()
            + combined[side]["n"]["negatives"].as_u64().unwrap()
    };
    assert_eq!(n("internal"), 176, "{combined}");
    assert!(n("external") > 0, "{combined}");
    // The cut-off applied externally is the one chosen internally.
    assert_eq!(
        combined["external"]["at_internal_youden"]["threshold"],
        combined["youden_cutoff"]
    );
    assert!(out.join("models/combined.safetensors").is_file());
    assert!(out.join("models/clinical.safetensors").is_file());
    for (init, clinical) in [("fold-1", "fold-1"), ("fold-2", "fold-2"), ("all", "all")] {
        let (_, card) =
            fedslm_model::load(&out.join(format!("runs/combined/init-{init}.safetensors")))
                .unwrap();
        let from = card.training["head_from_clinical"]["file"]
            .as_str()
            .unwrap();
        assert!(
            from.contains(&format!("runs/clinical/{clinical}/")),
            "{init} started from {from}"
        );
    }
    // The centralised baseline, internally and at the same held-out centre.
    for side in ["internal", "external"] {
        let auc = combined["centralised"][side]["auc"].as_f64();
        assert!(
            auc.is_some_and(|a| (0.0..=1.0).contains(&a)),
            "{side}: {combined}"
        );
    }
    assert_eq!(
        combined["centralised"]["internal"]["n"]["positives"]
            .as_u64()
            .unwrap()
            + combined["centralised"]["internal"]["n"]["negatives"]
                .as_u64()
                .unwrap(),
        176
    );
    assert_eq!(
        combined["head_start"],
        "the clinical model federated on the same patients"
    );
    // The paired tests of the second pass: the AUCs the placement sums give are the pooled histograms' (so
    // the centres placed exactly the patients the AUCs are of, each once), with a p-value.
    let comparisons = results["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 2, "{comparisons:?}");
    for c in comparisons {
        let side = c["side"].as_str().unwrap();
        assert_eq!(c["a"], "clinical");
        let close = |got: &Value, model: &str| {
            let want = results["models"][model][side]["auc"].as_f64().unwrap();
            assert!(
                (got.as_f64().unwrap() - want).abs() < 1e-9,
                "{side} {model}: {c}"
            );
        };
        close(&c["auc_a"], "clinical");
        close(&c["auc_b"], "combined");
        let p = c["p"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{c}");
    }
    assert!(
        stdout.contains("paired DeLong, clinical vs combined, external"),
        "{stdout}"
    );
    for side in ["internal", "external"] {
        assert!(
            out.join("figures").join(side).join("roc.png").is_file(),
            "{side}"
        );
    }
}

#[test]
fn where_the_clinical_model_cannot_be_fitted_the_combined_network_starts_plain() {
    // The tiny cohort's 13 patients a fold separate perfectly on the clinical factors.
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());
    let out = tmp.path().join("sim");
    let (stdout, results) = quick(&cohort, &out, "combined", "2", &["--no-centralised"]);
    assert!(
        stdout.contains("the clinical model cannot be fitted here"),
        "{stdout}"
    );
    assert!(stdout.contains("perfect separation"), "{stdout}");
    let combined = &results["models"]["combined"];
    assert!(
        combined["head_start"].as_str().unwrap().starts_with("none"),
        "{combined}"
    );
    assert_eq!(combined["centralised"], Value::Null);
    assert!(results["models"].get("clinical").is_none());
    assert!(out.join("models/combined.safetensors").is_file());
}

/// `fedslm simulate --models MODELS --folds FOLDS` of 1 round of 1 epoch (and `extra`) into `out`: its
/// standard output and results.json.
fn quick(cohort: &Path, out: &Path, models: &str, folds: &str, extra: &[&str]) -> (String, Value) {
    let (cohort, out_arg) = (cohort.display().to_string(), out.display().to_string());
    let mut args = vec![
        "--log",
        "warn",
        "simulate",
        "--cohort",
        &cohort,
        "--models",
        models,
        "--folds",
        folds,
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--out",
        &out_arg,
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, err) = fedslm(&args);
    assert!(ok, "{stdout}\n{err}");
    let results =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    (stdout, results)
}

#[test]
fn under_a_dp_budget_every_federation_spends_at_most_it_at_every_site() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());
    let out = tmp.path().join("sim");
    let (_, results) = quick(
        &cohort,
        &out,
        "combined",
        "2",
        &["--no-centralised", "--dp-epsilon", "8"],
    );
    let dp = &results["settings"]["dp"];
    assert_eq!(dp["epsilon_per_federation"], 8.0, "{dp}");
    assert_eq!(results["settings"]["bins"], 10);
    let mut sites = 0;
    for entry in std::fs::read_dir(out.join("ledgers")).unwrap() {
        let path = entry.unwrap().path();
        let ledger = fedslm_node::ledger::Ledger::open(&path).unwrap();
        let runs = ledger.runs(1e-5).unwrap();
        assert!(runs.len() >= 3, "{path:?}: {runs:?}");
        for (run, e) in &runs {
            assert!(e.epsilon > 0.0 && e.epsilon <= 8.0, "{path:?} {run}: {e:?}");
        }
        // Over the whole study the federations compose: more than one's budget.
        let center = path.file_stem().unwrap().to_str().unwrap();
        let study = dp["study_epsilon_by_center"][center].as_f64().unwrap();
        assert!(study > 8.0, "{center}: {study}");
        assert!((study - ledger.spent(None, 1e-5).unwrap().epsilon).abs() < 1e-9 * study);
        sites += 1;
    }
    assert!(sites >= 3);
    // The paired tests' placement sums carry no noise: the sites refused them.
    for c in results["comparisons"].as_array().unwrap() {
        let error = c["error"].as_str().unwrap_or_default();
        assert!(error.contains("privacy.require_dp"), "{c}");
    }
}

#[test]
fn repeats_report_the_spread_and_each_method_against_scanner_shift_is_on_record() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());
    let out = tmp.path().join("spread");
    let (ok, stdout, err) = fedslm(&[
        "--log",
        "warn",
        "simulate",
        "--cohort",
        &cohort.display().to_string(),
        "--models",
        "mri",
        "--folds",
        "0",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--no-centralised",
        "--seeds",
        "5,6",
        "--shift",
        "augment,adabn,fedbn",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{stdout}\n{err}");
    assert!(stdout.contains("over 2 repeats"), "{stdout}");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let repeats = results["repeats"].as_array().unwrap();
    assert_eq!(repeats.len(), 2);
    let spread = &results["models"]["mri"]["external_auc"];
    assert_eq!(spread["n"], 2, "{results}");
    let aucs: Vec<f64> = repeats
        .iter()
        .map(|r| r["models"]["mri"]["external_auc"].as_f64().unwrap())
        .collect();
    let (lo, hi) = (aucs[0].min(aucs[1]), aucs[0].max(aucs[1]));
    assert_eq!(spread["min"].as_f64().unwrap(), lo);
    assert_eq!(spread["max"].as_f64().unwrap(), hi);
    assert!((spread["median"].as_f64().unwrap() - (lo + hi) / 2.0).abs() < 1e-12);
    assert_eq!(
        results["shift"],
        serde_json::json!(["augment", "adabn", "fedbn"])
    );
    assert!(out.join("figures/spread.png").is_file());
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("## Each repeat"));
    for (r, seed) in repeats.iter().zip([5, 6]) {
        let dir = out.join(r["folder"].as_str().unwrap());
        let one: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(one["settings"]["training_seed"], seed);
        // AdaBN is named in the final federation's audit log, for the validating centre only.
        let store = fedslm_server::Store::open_existing(&dir.join("runs/mri/all")).unwrap();
        let evaluated: Vec<Value> = store
            .audit_entries()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
            .filter(|e| e["event"] == "round_evaluated")
            .collect();
        assert!(!evaluated.is_empty());
        for e in evaluated {
            assert_eq!(
                e["adapted_batch_norm"],
                serde_json::json!(["external"]),
                "{e}"
            );
        }
    }
    // The two training seeds trained different models on the same cohort.
    let model = |r: &Value| {
        std::fs::read(
            out.join(r["folder"].as_str().unwrap())
                .join("models/mri.safetensors"),
        )
        .unwrap()
    };
    assert_ne!(model(&repeats[0]), model(&repeats[1]));
}

#[test]
fn the_study_through_secure_sums_gives_the_plain_studys_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, secure: bool| -> Value {
        let out = tmp.path().join(name);
        let mut args = vec![
            "--log".to_string(),
            "warn".into(),
            "simulate".into(),
            "--cohort".into(),
            reference().display().to_string(),
            "--models".into(),
            "clinical".into(),
            "--holdout".into(),
            "none".into(),
            "--no-centralised".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        if secure {
            args.push("--secure-aggregation".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, err) = fedslm(&args);
        assert!(ok, "{stdout}\n{err}");
        crate::common::assert_pooled_statsmodels_fit(&out.join("models/clinical.safetensors"));
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
    };
    let plain = run("plain", false);
    let secure = run("secure", true);
    assert_eq!(secure["settings"]["secure_aggregation"], true);
    let (p, s) = (&plain["models"]["clinical"], &secure["models"]["clinical"]);
    assert_eq!(
        p["internal"], s["internal"],
        "the same pooled out-of-fold figure"
    );
    assert_eq!(p["youden_cutoff"], s["youden_cutoff"]);
    // No centre's own histograms reach the server: the per-centre table is empty.
    assert_eq!(s["per_center_internal"], serde_json::json!({}));
    // The study's sites required secure sums: a plain answer was never given.
    let log = std::fs::read_to_string(tmp.path().join("secure/fedslm.log")).unwrap();
    assert!(!log.contains("PolicyRefused"), "{log}");
}

#[test]
fn the_paired_tests_second_pass_through_secure_sums_gives_the_plain_tests() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());
    let run = |name: &str, secure: bool| -> Value {
        let extra: &[&str] = if secure {
            &["--no-centralised", "--secure-aggregation"]
        } else {
            &["--no-centralised"]
        };
        quick(&cohort, &tmp.path().join(name), "mri,combined", "2", extra).1
    };
    let plain = run("plain", false);
    let secure = run("secure", true);
    for m in ["mri", "combined"] {
        for side in ["internal", "external"] {
            assert_eq!(
                plain["models"][m][side], secure["models"][m][side],
                "{m} {side}"
            );
        }
    }
    // The training sites require secure sums, so the internal test's placement sums went through one (an
    // answer in the clear would have been refused and the test not computed); the external centre, alone on
    // its side, answered in the clear. The sums agree to rounding.
    let (p, s) = (
        plain["comparisons"].as_array().unwrap(),
        secure["comparisons"].as_array().unwrap(),
    );
    assert_eq!(p.len(), 2);
    for (a, b) in p.iter().zip(s) {
        assert_eq!(a["side"], b["side"]);
        let (za, zb) = (a["z"].as_f64().unwrap(), b["z"].as_f64().unwrap());
        assert!((za - zb).abs() < 1e-9, "{a} vs {b}");
    }
}

/// Each training centre's mean landmarks and image count, worked out here from its crops sequence by
/// sequence (the validating centre's are no part of the scale).
fn training_landmarks(cohort: &Path, holdout: &str) -> Vec<([[f64; 11]; 3], u64)> {
    let coding = fedslm_cohort::ClinicalCoding::default();
    let settings = fedslm_cohort::PreprocessSettings::default();
    let centers = fedslm_cohort::open_cohort(cohort, &coding, &[]).unwrap();
    let mut out = Vec::new();
    for (center, manifest) in centers.iter().filter(|(c, _)| c != holdout) {
        let (samples, _) =
            fedslm_cohort::load_center(manifest, center, &coding, &settings, None).unwrap();
        let (mut sum, mut images) = ([[0.0; 11]; 3], 0u64);
        for s in &samples {
            let per = s.image.len() / 3;
            let l: Vec<[f64; 11]> = s
                .image
                .chunks_exact(per)
                .map(fedslm_cohort::landmarks)
                .collect();
            if l.iter().any(|l| l[10] != 1.0) {
                continue;
            }
            for (acc, l) in sum.iter_mut().zip(&l) {
                for (a, v) in acc.iter_mut().zip(l) {
                    *a += v;
                }
            }
            images += 1;
        }
        out.push((sum, images));
    }
    out
}

#[test]
fn standardisation_agrees_the_scale_in_a_landmarks_round_and_every_centre_then_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = crate::common::tiny_synth_cohort(tmp.path());
    let run = |name: &str, secure: bool| -> Value {
        let extra: &[&str] = if secure {
            &[
                "--no-centralised",
                "--shift",
                "standardise",
                "--secure-aggregation",
            ]
        } else {
            &["--no-centralised", "--shift", "standardise"]
        };
        quick(&cohort, &tmp.path().join(name), "mri", "0", extra).1
    };
    let plain = run("plain", false);
    let scale: fedslm_cohort::IntensityScale =
        serde_json::from_value(plain["settings"]["intensity_scale"].clone()).unwrap();
    scale.check().unwrap();
    // The image-weighted mean of the training centres' landmarks.
    let per_center = training_landmarks(&cohort, "external");
    assert!(per_center.len() >= 3);
    let images: u64 = per_center.iter().map(|(_, n)| n).sum();
    for (s, agreed) in scale.sequences().into_iter().enumerate() {
        for (i, v) in agreed.iter().enumerate() {
            let mean = per_center.iter().map(|(sum, _)| sum[s][i]).sum::<f64>() / images as f64;
            assert!(
                (v - mean).abs() < 1e-12,
                "sequence {s} landmark {i}: {v} {mean}"
            );
        }
    }
    // The network was made, trained and validated on crops mapped onto that scale: its card says so (a site
    // that uses the model must preprocess alike), and the report gives it as client.toml takes it.
    let out = tmp.path().join("plain");
    let (_, card) = fedslm_model::load(&out.join("models/mri.safetensors")).unwrap();
    assert_eq!(card.preprocess.intensity_scale, Some(scale));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("[preprocess.intensity_scale]"), "{report}");
    // Every centre, the held-out one too, made its crops twice: as its scanner gave them (for the
    // landmarks), then on the agreed scale (the preprocessing cache keys them by their settings).
    for c in ["center-a", "center-b", "center-c", "external"] {
        let made = std::fs::read_dir(out.join("cache"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(&format!("{c}-"))
            })
            .count();
        assert_eq!(made, 2, "{c}");
    }
    assert_eq!(
        plain["settings"]["shift"],
        serde_json::json!(["standardise"])
    );
    assert!(
        plain["models"]["mri"]["external"]["auc"].is_f64(),
        "{plain}"
    );
    // The landmarks round committed once in its own store, its audit chain intact.
    let store = fedslm_server::Store::open_existing(&out.join("runs/landmarks")).unwrap();
    let committed = store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap())
        .filter(|e| e["event"] == "round_committed")
        .count();
    assert_eq!(committed, 1);
    // Through secure sums (the server sees only the sum of the centres' landmarks) the same scale.
    let secure = run("secure", true);
    let through_sums: fedslm_cohort::IntensityScale =
        serde_json::from_value(secure["settings"]["intensity_scale"].clone()).unwrap();
    for (a, b) in scale.sequences().into_iter().zip(through_sums.sequences()) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{x} {y}");
        }
    }
}
