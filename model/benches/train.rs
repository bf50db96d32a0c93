//! Training and inference steps of the image networks on random crops: the default (ResNet-10, width 16,
//! compact stem) at the default preprocessing and at 3 x 32 x 32, and the study's scale (ResNet-18, width 64,
//! torchvision stem) at 3 x 224 x 224; batch 16, median of timed steps after warm-up.
//! `cargo bench -p fedslm-model --bench train` (`FEDSLM_BENCH_STEPS` steps, default 10; `FEDSLM_BENCH_ONLY=default`
//! skips ResNet-18).

use std::time::Instant;

use fedslm_cohort::{Rng, Sample};
use fedslm_model::{NetConfig, Network, NetworkKind, TrainConfig};

fn samples(n: usize, channels: usize, size: usize, rng: &mut Rng) -> Vec<Sample> {
    (0..n)
        .map(|i| Sample {
            patient_id: format!("P{i}"),
            center: "bench".into(),
            image: (0..channels * size * size)
                .map(|_| rng.normal() as f32)
                .collect(),
            channels,
            size,
            clinical: (0..5).map(|_| f32::from(rng.bernoulli(0.4))).collect(),
            label: Some(i % 2 == 0),
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let steps: usize = std::env::var("FEDSLM_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let only_default = std::env::var("FEDSLM_BENCH_ONLY").is_ok_and(|v| v == "default");
    let batch = 16;
    let mut cases = vec![
        ("default, 9 x 64 x 64", NetConfig::compact(9, 64, 5)),
        ("default, 3 x 32 x 32", NetConfig::compact(3, 32, 5)),
    ];
    if !only_default {
        cases.push(("ResNet-18, 3 x 224 x 224", NetConfig::resnet18(3, 224, 5)));
    }
    let mut rng = Rng::new(1);
    for (name, config) in cases {
        let net = Network::new(NetworkKind::Combined, config, 1).unwrap();
        let data = samples(batch, config.in_channels, config.input_size, &mut rng);
        let refs: Vec<&Sample> = data.iter().collect();
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: batch,
            augmentation: None,
            ..TrainConfig::default()
        };
        let mut train = Vec::new();
        let mut infer = Vec::new();
        for i in 0..steps + 2 {
            let t = Instant::now();
            net.fit(&refs, &cfg, |_| {}).unwrap();
            let fit = t.elapsed().as_secs_f64();
            let t = Instant::now();
            net.predict(&refs).unwrap();
            let predict = t.elapsed().as_secs_f64();
            if i >= 2 {
                train.push(fit);
                infer.push(predict);
            }
        }
        println!(
            "{name:<26} {:>9} parameters: train step {:>8.1} ms, inference {:>7.1} ms per batch of {batch} ({:.0} patients/s)",
            net.parameter_count(),
            1e3 * median(train.clone()),
            1e3 * median(infer.clone()),
            batch as f64 / median(infer)
        );
    }
}
