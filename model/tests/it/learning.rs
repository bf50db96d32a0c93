//! The image networks learn what the synthetic cohorts hold: on patients they never saw, `mri` and `combined`
//! come within 0.1 of the generator's oracle AUC (its own latent risk, on the same patients), and `combined`
//! beats `mri` by at least 0.03.

use fedslm_cohort::synth::{synth_center_samples, Geometry, Preset};
use fedslm_cohort::{ClinicalCoding, PreprocessSettings, Sample};
use fedslm_metrics::auc_delong;
use fedslm_model::{ModelKind, NetConfig, Network, TrainConfig};

fn settings() -> PreprocessSettings {
    PreprocessSettings {
        size: env_or("FEDSLM_SIZE", 32),
        neighbours: env_or("FEDSLM_NEIGHBOURS", 0),
        margin: 0.25,
        ..PreprocessSettings::default()
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The internal (training) centres of `preset` drawn with `seed`: samples and latent risks.
fn internal(preset: Preset, seed: u64, settings: &PreprocessSettings) -> Vec<(Sample, f64)> {
    let coding = ClinicalCoding::default();
    let mut out = Vec::new();
    for (ci, spec) in preset.centers().iter().enumerate() {
        if spec.name == "external" {
            continue;
        }
        out.extend(
            synth_center_samples(seed, ci, spec, &Geometry::standard(), &coding, settings)
                .expect("synthetic patients preprocess"),
        );
    }
    out
}

fn auc(samples: &[&Sample], scores: &[f64]) -> f64 {
    let labels: Vec<bool> = samples.iter().map(|s| s.label == Some(true)).collect();
    auc_delong(&labels, scores).expect("both classes").auc
}

struct Outcome {
    oracle: f64,
    mri: f64,
    combined: f64,
}

fn learn(train: &[(Sample, f64)], test: &[(Sample, f64)], cfg: &TrainConfig) -> Outcome {
    let settings = settings();
    let train_samples: Vec<&Sample> = train.iter().map(|(s, _)| s).collect();
    let test_samples: Vec<&Sample> = test.iter().map(|(s, _)| s).collect();
    let latent: Vec<f64> = test.iter().map(|(_, a)| *a).collect();
    let oracle = auc(&test_samples, &latent);
    let design = |ss: &[&Sample]| -> Vec<f64> {
        ss.iter()
            .flat_map(|s| std::iter::once(1.0).chain(s.clinical.iter().map(|&v| f64::from(v))))
            .collect()
    };
    let labels: Vec<bool> = train_samples
        .iter()
        .map(|s| s.label == Some(true))
        .collect();
    let names = fedslm_model::clinical::names();
    let fit = fedslm_metrics::fit_logistic(&names, &design(&train_samples), &labels, None).unwrap();
    let clinical_scores: Vec<f64> = design(&test_samples)
        .chunks(names.len())
        .map(|row| row.iter().zip(&fit.coefficients).map(|(x, b)| x * b).sum())
        .collect();
    eprintln!(
        "clinical logistic model: held-out AUC {:.3}",
        auc(&test_samples, &clinical_scores)
    );
    let mut result = [0.0; 2];
    let kinds: Vec<(usize, ModelKind)> = [ModelKind::Mri, ModelKind::Combined]
        .into_iter()
        .enumerate()
        .filter(|(_, k)| std::env::var("FEDSLM_KIND").map_or(true, |v| v == k.name()))
        .collect();
    for (i, kind) in kinds {
        let features = if kind == ModelKind::Mri { 0 } else { 5 };
        let config = NetConfig {
            width: env_or("FEDSLM_WIDTH", 8),
            ..NetConfig::compact(settings.channels(), settings.size, features)
        };
        let mut net = Network::new(kind, config, 7).unwrap();
        if kind == ModelKind::Combined {
            net.standardisation = fedslm_model::Standardisation::fit(&train_samples, 5);
        }
        let start = std::time::Instant::now();
        net.fit(&train_samples, cfg, |r| {
            eprintln!("{} epoch {} loss {:.4}", kind.name(), r.epoch, r.loss)
        })
        .unwrap();
        let scores = net.predict(&test_samples).unwrap();
        result[i] = auc(&test_samples, &scores);
        let train_auc = auc(&train_samples, &net.predict(&train_samples).unwrap());
        eprintln!(
            "{}: {} parameters, {:.1} s, held-out AUC {:.3} (train {:.3}), oracle {oracle:.3}",
            kind.name(),
            net.parameter_count(),
            start.elapsed().as_secs_f64(),
            result[i],
            train_auc
        );
    }
    Outcome {
        oracle,
        mri: result[0],
        combined: result[1],
    }
}

fn check(o: &Outcome, what: &str) {
    assert!(
        o.mri >= o.oracle - 0.1,
        "{what}: mri AUC {:.3} is more than 0.1 below the oracle's {:.3}",
        o.mri,
        o.oracle
    );
    assert!(
        o.combined >= o.oracle - 0.1,
        "{what}: combined AUC {:.3} is more than 0.1 below the oracle's {:.3}",
        o.combined,
        o.oracle
    );
    assert!(
        o.combined >= o.mri + 0.03,
        "{what}: combined AUC {:.3} does not beat mri's {:.3} by 0.03",
        o.combined,
        o.mri
    );
}

#[test]
fn study_preset_networks_approach_the_oracle() {
    let settings = settings();
    let train = internal(Preset::Study, 11, &settings);
    // Unseen patients of the same centres: two more draws of the study's internal centres.
    let mut test = internal(Preset::Study, 1011, &settings);
    test.extend(internal(Preset::Study, 2011, &settings));
    assert!(test.len() >= 200);
    let cfg = TrainConfig {
        epochs: env_or("FEDSLM_EPOCHS", 30),
        learning_rate: env_or("FEDSLM_LR", 5e-3),
        optimizer: fedslm_model::Optimizer::AdamW {
            weight_decay: env_or("FEDSLM_WD", 1e-2),
        },
        augmentation: (env_or("FEDSLM_AUG", 1) == 1).then(Default::default),
        ..TrainConfig::default()
    };
    let o = learn(&train, &test, &cfg);
    check(&o, "study preset");
}

#[test]
fn large_preset_networks_approach_the_oracle() {
    let settings = settings();
    let all = internal(Preset::Large, 12, &settings);
    let labels: Vec<bool> = all.iter().map(|(s, _)| s.label == Some(true)).collect();
    // A stratified quarter of the internal centres' 1,600 patients held out.
    let folds = fedslm_cohort::stratified_folds(&labels, 4, 12);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (item, fold) in all.into_iter().zip(folds) {
        if fold == 0 {
            test.push(item);
        } else {
            train.push(item);
        }
    }
    // And a fresh draw of the same centres, so that the comparison with the oracle is not at the mercy of
    // one small sample.
    test.extend(internal(Preset::Large, 1012, &settings));
    assert!(test.len() >= 200);
    let cfg = TrainConfig {
        epochs: env_or("FEDSLM_EPOCHS", 12),
        learning_rate: env_or("FEDSLM_LR", 5e-3),
        ..TrainConfig::default()
    };
    let o = learn(&train, &test, &cfg);
    check(&o, "large preset");
}
