//! Manifests as hospitals write them, and every mistake named by file, line, patient and column.

use std::path::{Path, PathBuf};

use fedslm_cohort::*;

fn reference() -> PathBuf {
    PathBuf::from(env!("FEDSLM_REFERENCE"))
}

const HEADER: &str = "patient_id,slm,sex,site,cea,ca199,t2w,dwi,adc,roi";

fn write(dir: &Path, rows: &[&str]) -> PathBuf {
    let path = dir.join("manifest.csv");
    std::fs::write(&path, format!("{}\n", rows.join("\n"))).unwrap();
    path
}

fn error(rows: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), rows);
    Manifest::read(&path, &ClinicalCoding::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn the_reference_centers_read_and_code_as_designed() {
    let mut total = 0;
    let mut positives = 0;
    for c in ["center-a", "center-b", "center-c"] {
        let m = Manifest::read(
            &reference().join("clinical").join(c).join("manifest.csv"),
            &ClinicalCoding::default(),
        )
        .unwrap();
        total += m.patients.len();
        positives += m.patients.iter().filter(|p| p.slm == Some(true)).count();
        assert!(m.patients.iter().all(|p| p.images == ImagePaths::default()));
        assert!(m
            .require_images("mri")
            .unwrap_err()
            .to_string()
            .contains("the mri model needs T2W, DWI, ADC and ROI images"));
    }
    assert_eq!(total, 176);
    assert!(positives > 0 && positives < total);
}

#[test]
fn coding_follows_the_cut_offs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        &[
            HEADER,
            "P1,1,M,low,5.0,37.0,,,,",
            "P2,0,F,high,5.01,37.5,,,,",
            "P3,,F,mid,0,0,,,,",
        ],
    );
    let m = Manifest::read(&path, &ClinicalCoding::default()).unwrap();
    let c = ClinicalCoding::default();
    // Cut-offs are strict: 5.0 ng/mL and 37 U/mL are not elevated.
    assert_eq!(c.encode(&m.patients[0]), [1.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(c.encode(&m.patients[1]), [0.0, 0.0, 1.0, 1.0, 1.0]);
    assert_eq!(m.patients[2].slm, None);
    let lower = ClinicalCoding {
        cea_cutoff: 3.0,
        ..c
    };
    assert_eq!(lower.encode(&m.patients[0])[3], 1.0);
    let s = CohortSummary::of(&m, &c);
    assert_eq!(
        (
            s.patients,
            s.slm_positive,
            s.slm_unknown,
            s.male,
            s.site_mid
        ),
        (3, 1, 1, 1, 1)
    );
    assert_eq!(s.cea.median, Some(5.0));
    assert!(s.to_string().contains("prevalence 50.0%"), "{s}");
}

#[test]
fn images_resolve_against_the_manifest_folder() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("P1")).unwrap();
    for f in ["t2w.nii.gz", "dwi.nii.gz", "adc.nii.gz", "roi.nii.gz"] {
        std::fs::write(tmp.path().join("P1").join(f), b"").unwrap();
    }
    let path = write(
        tmp.path(),
        &[
            HEADER,
            "P1,1,M,low,12.4,55.0,P1/t2w.nii.gz,P1/dwi.nii.gz,P1/adc.nii.gz,P1/roi.nii.gz",
        ],
    );
    let m = Manifest::read(&path, &ClinicalCoding::default()).unwrap();
    assert_eq!(
        m.patients[0].images.t2w.as_deref(),
        Some(tmp.path().join("P1/t2w.nii.gz").as_path())
    );
    assert!(m.require_images("combined").is_ok());
    // Image columns may be left out altogether.
    let path = write(
        tmp.path(),
        &["patient_id,slm,sex,site,cea,ca199", "P1,1,M,low,12.4,55.0"],
    );
    assert_eq!(
        Manifest::read(&path, &ClinicalCoding::default())
            .unwrap()
            .patients
            .len(),
        1
    );
}

#[test]
fn every_mistake_is_named() {
    fn row(r: &str) -> Vec<&str> {
        vec![HEADER, "P0001,1,M,low,12.4,55.0,,,,", r]
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["patient_id,slm,sex,cea,ca199", "P1,1,M,3,4"], "missing column(s) site; the header has patient_id, slm, sex, cea, ca199"),
        (vec!["patient_id,slm,sex,site,cea,cea,ca199", "P1,1,M,low,3,3,4"], "column \"cea\" appears twice (columns 5 and 6)"),
        (row("P0001,0,F,mid,1,1,,,,"), "line 3: patient P0001 appears again (first on line 2)"),
        (row("P0002,2,F,mid,1,1,,,,"), "line 3 (patient P0002), column slm: \"2\" is not 0, 1 or empty"),
        (row("P0002,0,female,mid,1,1,,,,"), "line 3 (patient P0002), column sex: \"female\" is not M or F"),
        (row("P0002,0,F,middle,1,1,,,,"), "line 3 (patient P0002), column site: \"middle\" is not low, mid or high"),
        (row("P0002,0,F,mid,,1,,,,"), "line 3 (patient P0002), column cea: missing; fill it in, or choose a missing-value policy"),
        (row("P0002,0,F,mid,1,,,,,"), "line 3 (patient P0002), column ca199: missing"),
        (row("P0002,0,F,mid,high,1,,,,"), "line 3 (patient P0002), column cea: \"high\" is not a number (ng/mL)"),
        (row("P0002,0,F,mid,1,-3,,,,"), "line 3 (patient P0002), column ca199: -3 is not a concentration"),
        (row("P0002,0,F,mid,1,NaN,,,,"), "column ca199: NaN is not a concentration"),
        (row("P0002,0,F,mid,1,1,P0002/t2w.nii.gz,,,"), "line 3 (patient P0002), column t2w:"),
        (row(",0,F,mid,1,1,,,,"), "line 3 (patient ?), column patient_id: empty"),
        (row("P0002,0,F,mid,1,1,,,"), "malformed CSV"),
        (vec![HEADER], "no patients after the header"),
    ];
    for (rows, want) in cases {
        let e = error(&rows);
        assert!(e.contains("manifest.csv"), "{e}");
        assert!(e.contains(want), "expected {want:?} in {e:?}");
    }
    assert!(
        error(&row("P0002,0,F,mid,1,1,P0002/t2w.nii.gz,,,")).contains("t2w.nii.gz does not exist")
    );
    let missing_file = Manifest::read(
        Path::new("/nonexistent/manifest.csv"),
        &ClinicalCoding::default(),
    )
    .unwrap_err();
    assert!(missing_file
        .to_string()
        .contains("cannot read /nonexistent/manifest.csv"));
}

#[test]
fn the_missing_marker_policy_is_configurable() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        &[HEADER, "P1,1,M,low,,55.0,,,,", "P2,0,F,mid,3,4,,,,"],
    );
    let exclude = ClinicalCoding {
        missing: MissingPolicy::Exclude,
        ..ClinicalCoding::default()
    };
    let m = Manifest::read(&path, &exclude).unwrap();
    assert_eq!(m.patients.len(), 1);
    assert_eq!(
        m.excluded,
        vec![("P1".to_string(), "missing cea".to_string())]
    );
    let normal = ClinicalCoding {
        missing: MissingPolicy::Normal,
        ..ClinicalCoding::default()
    };
    let m = Manifest::read(&path, &normal).unwrap();
    assert_eq!(normal.encode(&m.patients[0])[3], 0.0);
    assert_ne!(exclude.settings_hash(), normal.settings_hash());
}
