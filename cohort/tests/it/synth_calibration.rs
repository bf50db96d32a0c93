//! The synthetic cohort behaves like the study's: over three seeds of the `large` preset, models fitted on the
//! training centres and scored on held-out patients give a clinical AUC of 0.75-0.85, an image-feature AUC
//! below it but above 0.6, a combination above both, and an image model that loses at least 0.05 more AUC at
//! the external centre than the clinical model does.

use fedslm_cohort::synth::{synth_center, Geometry, Preset};
use fedslm_cohort::{crop_volumes, stratified_folds, ClinicalCoding, PreprocessSettings};
use fedslm_metrics::{auc_delong, fit_logistic};

struct Row {
    clinical: Vec<f64>,
    image: Vec<f64>,
    label: bool,
    external: bool,
}

/// A few statistics of the crop: tumour-versus-surround contrast in ADC and DWI, T2W texture and edges.
fn image_features(crop: &[f32], size: usize) -> Vec<f64> {
    let plane = size * size;
    let (t2w, dwi, adc) = (
        &crop[..plane],
        &crop[plane..2 * plane],
        &crop[2 * plane..3 * plane],
    );
    let c = (size as f64 - 1.0) / 2.0;
    let inner = |i: usize| {
        let (x, y) = ((i % size) as f64 - c, (i / size) as f64 - c);
        (x * x + y * y).sqrt() < 0.3 * size as f64
    };
    let mean = |ch: &[f32], want: bool| {
        let v: Vec<f64> = (0..plane)
            .filter(|&i| inner(i) == want)
            .map(|i| f64::from(ch[i]))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let sd_inner = |ch: &[f32]| {
        let m = mean(ch, true);
        let v: Vec<f64> = (0..plane)
            .filter(|&i| inner(i))
            .map(|i| (f64::from(ch[i]) - m).powi(2))
            .collect();
        (v.iter().sum::<f64>() / v.len() as f64).sqrt()
    };
    let edges = {
        let mut total = 0.0;
        let mut n = 0.0;
        for y in 1..size - 1 {
            for x in 1..size - 1 {
                let i = y * size + x;
                if inner(i) {
                    let gx = f64::from(t2w[i + 1] - t2w[i - 1]);
                    let gy = f64::from(t2w[i + size] - t2w[i - size]);
                    total += (gx * gx + gy * gy).sqrt();
                    n += 1.0;
                }
            }
        }
        total / n
    };
    vec![
        mean(adc, true) - mean(adc, false),
        mean(dwi, true) - mean(dwi, false),
        sd_inner(t2w),
        edges,
        sd_inner(adc),
    ]
}

fn standardise(train: &[Vec<f64>], all: &mut [Vec<f64>]) {
    let p = train[0].len();
    for j in 0..p {
        let m = train.iter().map(|r| r[j]).sum::<f64>() / train.len() as f64;
        let sd = (train.iter().map(|r| (r[j] - m).powi(2)).sum::<f64>() / train.len() as f64)
            .sqrt()
            .max(1e-9);
        for r in all.iter_mut() {
            r[j] = (r[j] - m) / sd;
        }
    }
}

/// AUCs (internal held-out, external) of a logistic model on the columns `pick` returns.
fn evaluate(rows: &[Row], test: &[bool], pick: impl Fn(&Row) -> Vec<f64>) -> (f64, f64) {
    let mut x: Vec<Vec<f64>> = rows.iter().map(&pick).collect();
    let train_rows: Vec<Vec<f64>> = rows
        .iter()
        .zip(&x)
        .zip(test)
        .filter(|((r, _), t)| !r.external && !**t)
        .map(|((_, x), _)| x.clone())
        .collect();
    standardise(&train_rows, &mut x);
    let p = x[0].len();
    let names: Vec<String> = (0..=p).map(|i| format!("x{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (mut design, mut y) = (Vec::new(), Vec::new());
    for ((r, xr), t) in rows.iter().zip(&x).zip(test) {
        if !r.external && !*t {
            design.push(1.0);
            design.extend(xr);
            y.push(r.label);
        }
    }
    let fit = fit_logistic(&names, &design, &y, None).unwrap();
    let score = |xr: &Vec<f64>| {
        fit.coefficients[0]
            + xr.iter()
                .zip(&fit.coefficients[1..])
                .map(|(a, b)| a * b)
                .sum::<f64>()
    };
    let auc = |keep: &dyn Fn(&Row, bool) -> bool| {
        let (l, s): (Vec<bool>, Vec<f64>) = rows
            .iter()
            .zip(&x)
            .zip(test)
            .filter(|((r, _), t)| keep(r, **t))
            .map(|((r, xr), _)| (r.label, score(xr)))
            .unzip();
        auc_delong(&l, &s).unwrap().auc
    };
    (auc(&|r, t| !r.external && t), auc(&|r, _| r.external))
}

#[test]
fn the_large_preset_is_calibrated_like_the_study() {
    let coding = ClinicalCoding::default();
    let settings = PreprocessSettings {
        size: 32,
        neighbours: 0,
        margin: 0.25,
        ..PreprocessSettings::default()
    };
    let geometry = Geometry::standard();
    let mut summary = Vec::new();
    let seeds: Vec<u64> = std::env::var("FEDSLM_SEEDS").map_or(vec![1, 2, 3], |s| {
        s.split(',').filter_map(|x| x.parse().ok()).collect()
    });
    for seed in seeds {
        let mut rows = Vec::new();
        for (ci, spec) in Preset::Large.centers().iter().enumerate() {
            for p in synth_center(seed, ci, spec, &geometry) {
                let crop = crop_volumes(&p.id, "roi", [&p.t2w, &p.dwi, &p.adc], &p.roi, &settings)
                    .unwrap();
                let clinical = [
                    f64::from(u8::from(p.male)),
                    f64::from(u8::from(p.site == "low")),
                    f64::from(u8::from(p.site == "high")),
                    f64::from(u8::from(p.cea > coding.cea_cutoff)),
                    f64::from(u8::from(p.ca199 > coding.ca199_cutoff)),
                ];
                rows.push(Row {
                    clinical: clinical.to_vec(),
                    image: image_features(&crop, settings.size),
                    label: p.slm,
                    external: spec.name == "external",
                });
            }
        }
        let internal_labels: Vec<bool> = rows
            .iter()
            .filter(|r| !r.external)
            .map(|r| r.label)
            .collect();
        let folds = stratified_folds(&internal_labels, 10, seed);
        let mut k = 0;
        let test: Vec<bool> = rows
            .iter()
            .map(|r| {
                if r.external {
                    false
                } else {
                    k += 1;
                    folds[k - 1] < 3
                }
            })
            .collect();
        let clinical = evaluate(&rows, &test, |r| r.clinical.clone());
        let image = evaluate(&rows, &test, |r| r.image.clone());
        let combined = evaluate(&rows, &test, |r| {
            r.clinical.iter().chain(&r.image).copied().collect()
        });
        println!(
            "seed {seed}: clinical {:.3} / {:.3}, image {:.3} / {:.3}, combined {:.3} / {:.3} (internal / external)",
            clinical.0, clinical.1, image.0, image.1, combined.0, combined.1
        );
        summary.push((clinical, image, combined));
    }
    for (seed, (clinical, image, combined)) in summary.iter().enumerate() {
        let seed = seed + 1;
        assert!(
            (0.75..=0.85).contains(&clinical.0),
            "seed {seed}: clinical AUC {:.3}",
            clinical.0
        );
        assert!(
            image.0 > 0.6 && image.0 < clinical.0,
            "seed {seed}: image AUC {:.3} vs clinical {:.3}",
            image.0,
            clinical.0
        );
        assert!(
            combined.0 > clinical.0 && combined.0 > image.0,
            "seed {seed}: combined {:.3}",
            combined.0
        );
        let drop_image = image.0 - image.1;
        let drop_clinical = clinical.0 - clinical.1;
        assert!(
            drop_image - drop_clinical >= 0.05,
            "seed {seed}: image drops {drop_image:.3}, clinical {drop_clinical:.3}"
        );
    }
}
