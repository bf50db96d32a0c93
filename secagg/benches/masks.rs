//! What secure aggregation costs one centre and the server for a model of `n` elements among `c` centres,
//! on one thread: a centre's fixed-point encoding and its `c` masks (one self-mask, `c - 1` pairwise), the
//! server's fold of one masked input, and its unmasking (`c` self-masks removed, the sum decoded). Beside
//! them, a memcpy of the same bytes as the yardstick. Run: `cargo bench -p fedslm-secagg --bench masks`
//! (`-- <elements> <centres>`; default: ResNet-18's 11 177 025 among 10).

use std::time::Instant;

use fedslm_secagg::crypto::apply_mask;
use fedslm_secagg::fixed;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(11_177_025);
    let c: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let input: Vec<f64> = (0..n)
        .map(|i| 30.0 * ((i % 1000) as f64 / 1000.0 - 0.5))
        .collect();
    let seeds: Vec<[u8; 32]> = (0..c).map(|i| [i as u8 + 1; 32]).collect();

    let t = Instant::now();
    let mut masked = fixed::encode(&input, fixed::SCALE_BITS, fixed::BOUND).expect("in range");
    let encode = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (i, s) in seeds.iter().enumerate() {
        apply_mask(s, &mut masked, i % 2 == 0);
    }
    let masks = t.elapsed().as_secs_f64();

    let mut sum = masked.clone();
    let t = Instant::now();
    for (s, v) in sum.iter_mut().zip(&masked) {
        *s = s.wrapping_add(*v);
    }
    let fold = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for s in &seeds {
        apply_mask(s, &mut sum, false);
    }
    let decoded = fixed::decode(&sum, fixed::SCALE_BITS);
    let unmask = t.elapsed().as_secs_f64();

    let bytes = 16 * n;
    let src = vec![1u8; bytes];
    let t = Instant::now();
    let copy = src.clone();
    let memcpy = t.elapsed().as_secs_f64();
    std::hint::black_box((&decoded, &copy));

    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!("secure aggregation, {n} elements ({mib:.0} MiB masked), {c} centres, one thread");
    println!("step, seconds, GiB/s of masked input, x memcpy");
    for (name, s, passes) in [
        ("centre: fixed-point encoding", encode, 1.0),
        ("centre: masks (1 self + pairwise)", masks, c as f64),
        ("server: fold one masked input", fold, 1.0),
        ("server: unmask (self-masks) and decode", unmask, c as f64),
        ("memcpy of the masked input", memcpy, 1.0),
    ] {
        println!(
            "{name}, {s:.3}, {:.2}, {:.1}",
            passes * mib / 1024.0 / s,
            s / (memcpy * passes)
        );
    }
}
