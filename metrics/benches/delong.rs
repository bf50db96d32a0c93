//! AUC with DeLong CI for 1,000,000 scores against a plain sort of the same scores, in the same run.
//!
//! `cargo bench -p fedslm-metrics --bench delong`. Target: under 3x the sort.

use std::hint::black_box;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n = 1_000_000;
    // A deterministic generator: positives score higher on average, with ties from rounding to 1e-4.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let labels: Vec<bool> = (0..n).map(|_| next() < 0.2).collect();
    let scores: Vec<f64> = labels
        .iter()
        .map(|&l| ((next() + if l { 0.3 } else { 0.0 }) * 1e4).round() / 1e4)
        .collect();
    let runs = 11;
    let (mut sort_t, mut delong_t) = (Vec::new(), Vec::new());
    let mut auc = 0.0;
    for _ in 0..runs {
        let mut copy = scores.clone();
        let t = Instant::now();
        copy.sort_unstable_by(f64::total_cmp);
        sort_t.push(t.elapsed());
        black_box(&copy);

        let t = Instant::now();
        let d = fedslm_metrics::auc_delong(black_box(&labels), black_box(&scores)).unwrap();
        let ci = d.ci95();
        delong_t.push(t.elapsed());
        auc = d.auc;
        black_box(ci);
    }
    let (s, d) = (median(sort_t), median(delong_t));
    println!("n = {n}, AUC = {auc:.4}");
    println!("sort of the scores:      {:>8.1} ms", s.as_secs_f64() * 1e3);
    println!(
        "AUC + DeLong variance + CI: {:>8.1} ms",
        d.as_secs_f64() * 1e3
    );
    println!(
        "ratio: {:.2}x the sort (target < 3x), median of {runs}",
        d.as_secs_f64() / s.as_secs_f64()
    );
}
