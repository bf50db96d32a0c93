//! Encode + decode of a 45 MB model against a plain memcpy of the same bytes, measured in the same run.
//!
//! `cargo bench -p fedslm-protocol --bench codec`. Prints medians and the ratio (target: at most 2x).

use std::hint::black_box;
use std::time::{Duration, Instant};

use fedslm_protocol::codec::{self, FrameDecoder};
use fedslm_protocol::*;

/// A ResNet-18-like set of tensors: many small, a few large, 45 MB of f32 in all.
fn model() -> Weights {
    let mut tensors = Vec::new();
    let mut total = 0usize;
    let target = 45_000_000 / 4;
    let mut i = 0;
    while total < target {
        let n = match i % 4 {
            0 => 64,
            1 => 9 * 256 * 256,
            2 => 256,
            _ => 9 * 512 * 512,
        }
        .min(target - total);
        let values: Vec<f32> = (0..n).map(|j| (j as f32).sin()).collect();
        let role = if i % 2 == 0 {
            TensorRole::BatchNormStatistic
        } else {
            TensorRole::Parameter
        };
        tensors.push(Tensor::from_f32(format!("layer{i}.weight"), vec![n], role, &values).unwrap());
        total += n;
        i += 1;
    }
    Weights::from_tensors(tensors).unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let weights = model();
    let bytes = weights.data_bytes();
    let flat: Vec<u8> = weights
        .tensors()
        .iter()
        .flat_map(|t| t.bytes().iter().copied())
        .collect();
    let msg = Message::FitResult(FitResult {
        round: 1,
        weights,
        examples: 176,
        train_loss: 0.3,
    });
    let limits = Limits::default();
    let runs = 21;
    let (mut copy, mut codec_t, mut enc_t, mut warm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut warm_dst = vec![0u8; flat.len()];
    let (mut reused, mut warm_codec) = (Vec::<u8>::new(), Vec::new());
    // Alternate the two so that both see the same machine state.
    for _ in 0..runs {
        let t = Instant::now();
        let dup = black_box(&flat).to_vec();
        black_box(&dup);
        copy.push(t.elapsed());
        drop(dup);

        let t = Instant::now();
        warm_dst.copy_from_slice(black_box(&flat));
        black_box(&warm_dst);
        warm.push(t.elapsed());

        let t = Instant::now();
        let frame = codec::encode(black_box(&msg), &limits).unwrap();
        let e = t.elapsed();
        // As received from a stream: the frame's buffer is handed over, not copied.
        let mut buf = bytes::BytesMut::from(bytes::Bytes::from(frame));
        let t2 = Instant::now();
        let back = FrameDecoder::new(limits, ByteBudget::default())
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        let d = t2.elapsed();
        black_box(&back);
        enc_t.push(e);

        // A sender that keeps its frame buffer between rounds encodes into warm memory.
        reused.clear();
        let t = Instant::now();
        codec::encode_into(black_box(&msg), &limits, &mut reused).unwrap();
        let e2 = t.elapsed();
        let frame = std::mem::take(&mut reused);
        let mut buf2 = bytes::BytesMut::from(bytes::Bytes::from(frame));
        let t = Instant::now();
        let back = FrameDecoder::new(limits, ByteBudget::default())
            .decode(&mut buf2)
            .unwrap()
            .unwrap();
        let d2 = t.elapsed();
        black_box(&back);
        drop(back);
        reused = buf2.into();
        warm_codec.push(e2 + d2);
        codec_t.push(e + d);
    }
    let (c, x, e, w) = (median(copy), median(codec_t), median(enc_t), median(warm));
    let gbs = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "weights: {} tensors, {:.1} MB",
        match &msg {
            Message::FitResult(r) => r.weights.len(),
            _ => 0,
        },
        bytes as f64 / 1e6
    );
    println!(
        "memcpy (to a new buffer):  {:>8.2} ms  {:>6.2} GB/s",
        c.as_secs_f64() * 1e3,
        gbs(c)
    );
    println!(
        "memcpy (to a warm buffer): {:>8.2} ms  {:>6.2} GB/s",
        w.as_secs_f64() * 1e3,
        gbs(w)
    );
    println!(
        "encode:                    {:>8.2} ms  {:>6.2} GB/s",
        e.as_secs_f64() * 1e3,
        gbs(e)
    );
    println!(
        "encode + decode:           {:>8.2} ms  {:>6.2} GB/s",
        x.as_secs_f64() * 1e3,
        gbs(x)
    );
    println!(
        "ratio encode+decode / memcpy: {:.2}x (target <= 2x), median of {runs}",
        x.as_secs_f64() / c.as_secs_f64()
    );
    let wc = median(warm_codec);
    println!(
        "encode (reused buffer) + decode: {:>8.2} ms  {:>6.2} GB/s",
        wc.as_secs_f64() * 1e3,
        gbs(wc)
    );
    println!(
        "ratio, reused buffer / warm memcpy: {:.2}x",
        wc.as_secs_f64() / w.as_secs_f64()
    );
}
