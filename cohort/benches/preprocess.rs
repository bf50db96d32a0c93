//! Loading and preprocessing the `study` preset (207 patients), cold and from the cache, in patients per second.
//! `cargo bench -p fedslm-cohort --bench preprocess`.

use std::time::Instant;

use fedslm_cohort::synth::{write_cohort, Geometry, Plan, Preset};
use fedslm_cohort::{load_center, ClinicalCoding, Manifest, PreprocessSettings, Source};

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let centers = Preset::Study.centers();
    write_cohort(
        tmp.path(),
        42,
        &centers,
        &Plan::natural(&centers),
        &Geometry::standard(),
        &|_| {},
    )
    .unwrap();
    let coding = ClinicalCoding::default();
    let settings = PreprocessSettings::default();
    let cache = tmp.path().join("cache");
    let manifests: Vec<(String, Manifest)> = centers
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                Manifest::read(&tmp.path().join(&c.name).join("manifest.csv"), &coding).unwrap(),
            )
        })
        .collect();
    let patients: usize = manifests.iter().map(|m| m.1.patients.len()).sum();
    let threads = rayon::current_num_threads();
    for pass in ["cold", "cached"] {
        let t = Instant::now();
        for (name, m) in &manifests {
            let (samples, source) = load_center(m, name, &coding, &settings, Some(&cache)).unwrap();
            assert_eq!(samples.len(), m.patients.len());
            assert_eq!(matches!(source, Source::Cache(_)), pass == "cached");
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{pass:>6}: {patients} patients in {s:.2} s: {:.0} patients/s ({threads} threads, {} x {} x {} per sample)",
            patients as f64 / s,
            settings.channels(),
            settings.size,
            settings.size
        );
    }
}
