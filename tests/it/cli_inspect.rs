//! `fedslm inspect --json` against what pydicom and nibabel read from the reference files.

use std::path::PathBuf;

use serde_json::Value;

fn inspect(path: &std::path::Path) -> (bool, String, String) {
    crate::common::fedslm(&["inspect", "--json", &path.display().to_string()])
}

fn reference_dir() -> PathBuf {
    crate::common::reference("")
}

#[test]
fn json_agrees_with_pydicom_and_nibabel() {
    let dir = reference_dir().join("imaging");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (name, e) in expected.as_object().unwrap() {
        let (ok, out, err) = inspect(&dir.join(name));
        assert!(ok, "{name}: {err}");
        let got: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got["format"], e["format"], "{name}");
        assert_eq!(got["dims"], e["dims"], "{name}");
        let want_spacing = if e["format"] == "dicom" {
            &e["spacing_xy"]
        } else {
            &e["spacing"]
        };
        match want_spacing.as_array() {
            Some(w) => {
                for (k, v) in w.iter().enumerate() {
                    let g = got["spacing"][k].as_f64().unwrap();
                    assert!((g - v.as_f64().unwrap()).abs() < 1e-5, "{name} spacing {k}");
                }
            }
            None => assert!(got["spacing"].is_null(), "{name}"),
        }
        assert_eq!(got["min"].as_f64(), e["min"].as_f64(), "{name} min");
        assert_eq!(got["max"].as_f64(), e["max"].as_f64(), "{name} max");
        for k in ["sum", "mean"] {
            let (g, w) = (got[k].as_f64().unwrap(), e[k].as_f64().unwrap());
            assert!((g - w).abs() <= 1e-9 * w.abs(), "{name} {k}: {g} vs {w}");
        }
        assert!(
            got["dtype"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}"
        );
    }
}

#[test]
fn a_manifest_gets_a_cohort_summary() {
    let path = reference_dir().join("clinical/center-b/manifest.csv");
    let (ok, out, err) = inspect(&path);
    assert!(ok, "{err}");
    let s: Value = serde_json::from_str(&out).unwrap();
    let n = s["patients"].as_u64().unwrap();
    assert_eq!(
        n,
        s["slm_positive"].as_u64().unwrap() + s["slm_negative"].as_u64().unwrap()
    );
    assert_eq!(
        n,
        s["male"].as_u64().unwrap() + s["female"].as_u64().unwrap()
    );
    assert_eq!(s["t2w"], 0);
    assert_eq!(s["cea"]["cutoff"], 5.0);
}

#[test]
fn unreadable_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("scan.nii.gz");
    std::fs::write(&bad, b"\x1f\x8b\x08\x00garbage").unwrap();
    let (ok, _, err) = inspect(&bad);
    assert!(!ok);
    assert!(err.contains("scan.nii.gz"), "{err}");
}
