//! The synthetic cohort on disk: real NIfTI files and manifests that read back as generated, byte-identical
//! for the same seed, and partitions into virtual centres.

use std::collections::BTreeMap;
use std::path::Path;

use fedslm_cohort::synth::{synth_center, write_cohort, Geometry, Plan, Preset};
use fedslm_cohort::*;

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn the_tiny_preset_reads_back_through_its_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let centers = Preset::Tiny.centers();
    let g = Geometry::standard();
    let report = write_cohort(
        tmp.path(),
        5,
        &centers,
        &Plan::natural(&centers),
        &g,
        &|_| {},
    )
    .unwrap();
    assert_eq!(report.centers.len(), 4);
    for (ci, spec) in centers.iter().enumerate() {
        let m = Manifest::read(
            &tmp.path().join(&spec.name).join("manifest.csv"),
            &ClinicalCoding::default(),
        )
        .unwrap();
        assert_eq!(m.patients.len(), spec.patients);
        m.require_images("combined").unwrap();
        let generated = synth_center(5, ci, spec, &g);
        for (p, gen) in m.patients.iter().zip(&generated) {
            assert_eq!(p.id, gen.id);
            assert_eq!(p.slm, Some(gen.slm));
            assert!((p.cea.unwrap() - gen.cea).abs() <= 0.005 + 1e-9);
            for (column, volume) in [("t2w", &gen.t2w), ("adc", &gen.adc), ("roi", &gen.roi)] {
                let read = read_image(p.images.get(column).unwrap()).unwrap();
                assert_eq!(read.dims, volume.dims, "{} {column}", p.id);
                // Stored as integers: what comes back is what was written, the generated values rounded.
                let want: Vec<f64> = volume
                    .data
                    .iter()
                    .map(|v| v.round().clamp(-32768.0, 32767.0))
                    .collect();
                assert_eq!(read.data, want, "{} {column}", p.id);
                for (a, b) in read
                    .affine
                    .iter()
                    .flatten()
                    .zip(volume.affine.iter().flatten())
                {
                    assert!((a - b).abs() < 1e-4);
                }
            }
        }
        // Every patient has a tumour, and preprocessing accepts them all.
        let (samples, _) = load_center(
            &m,
            &spec.name,
            &ClinicalCoding::default(),
            &PreprocessSettings::default(),
            None,
        )
        .unwrap();
        assert_eq!(samples.len(), spec.patients);
    }
    assert!(tmp.path().join("synth.json").is_file());
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut centers = Preset::Tiny.centers();
    for spec in &mut centers {
        spec.patients = 3;
    }
    let g = Geometry::standard();
    let plan = Plan::natural(&centers);
    write_cohort(a.path(), 9, &centers, &plan, &g, &|_| {}).unwrap();
    write_cohort(b.path(), 9, &centers, &plan, &g, &|_| {}).unwrap();
    write_cohort(c.path(), 10, &centers, &plan, &g, &|_| {}).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert_eq!(fa.len(), 4 * 3 * 4 + 4 + 1);
    assert!(fa == fb, "same seed, different bytes");
    assert!(fa != fc, "another seed, same bytes");
}

#[test]
fn a_partitioned_federation_keeps_every_patient_once_and_the_external_center() {
    let centers = Preset::Study.centers();
    let plan = Plan::partitioned(3, &centers, 8, Partitioner::Dirichlet { alpha: 0.5 });
    assert_eq!(plan.groups.len(), 9);
    assert_eq!(plan.groups[0].0, "site-01");
    assert_eq!(plan.groups[8].0, "external");
    assert_eq!(plan.groups[8].1.len(), 31);
    let mut all: Vec<(usize, usize)> = plan.groups[..8].iter().flat_map(|g| g.1.clone()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 176);
    assert!(all.iter().all(|&(ci, _)| ci < 3));
    assert_eq!(
        plan,
        Plan::partitioned(3, &centers, 8, Partitioner::Dirichlet { alpha: 0.5 })
    );
}
