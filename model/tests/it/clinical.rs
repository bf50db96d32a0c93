//! The clinical model fitted from image samples' coded vectors (the combined network's head start) is the
//! statsmodels fit of the same patients.

use std::path::PathBuf;

use fedslm_cohort::{ClinicalCoding, Manifest, Sample};
use fedslm_model::clinical;

#[test]
fn the_fit_on_samples_is_the_statsmodels_pooled_fit() {
    let reference = PathBuf::from(env!("FEDSLM_REFERENCE")).join("clinical");
    let coding = ClinicalCoding::default();
    let mut samples = Vec::new();
    for center in ["center-a", "center-b", "center-c"] {
        let manifest =
            Manifest::read(&reference.join(center).join("manifest.csv"), &coding).unwrap();
        for p in &manifest.patients {
            samples.push(Sample {
                patient_id: p.id.clone(),
                center: center.into(),
                image: Vec::new(),
                channels: 0,
                size: 0,
                clinical: coding.encode(p).iter().map(|&x| x as f32).collect(),
                label: p.slm,
            });
        }
    }
    let refs: Vec<&Sample> = samples.iter().collect();
    let beta = clinical::fit_samples(&refs).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference.join("expected_pooled_logit.json")).unwrap(),
    )
    .unwrap();
    for (name, b) in clinical::names().iter().zip(&beta) {
        let want = expected["coefficients"][name].as_f64().unwrap();
        assert!(
            (b - want).abs() < 1e-6,
            "{name}: {b} against statsmodels' {want}"
        );
    }

    let mut short = samples[0].clone();
    short.clinical.truncate(3);
    let err = clinical::fit_samples(&[&short]).unwrap_err().to_string();
    assert!(err.contains(&short.patient_id), "{err}");
}
