//! Our CPU kernels against candle's own ops: forward values and every gradient, on random shapes, strides,
//! paddings and odd sizes, contiguous and strided inputs; and whole networks trained both ways.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use fedslm_cohort::{Rng, Sample};
use fedslm_model::kernels::{
    batch_norm_eval, batch_norm_train, conv2d, conv2d_on, max_pool2d, FusedAdamW, Isa, Then,
};
use fedslm_model::{Kernels, ModelKind, NetConfig, Network, TrainConfig};

fn random(rng: &mut Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The gradients of `sum(y * probe)`: every element of `y` with its own weight.
fn try_gradients(y: &Tensor, probe: &Tensor) -> candle_core::Result<GradStore> {
    (y * probe)?.sum_all()?.backward()
}

fn gradients(y: &Tensor, probe: &Tensor) -> GradStore {
    try_gradients(y, probe).unwrap()
}

/// Largest difference relative to the reference's largest magnitude (at least 1).
fn assert_close(ours: &Tensor, reference: &Tensor, tol: f32, what: &str) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shapes");
    let (a, b) = (values(ours), values(reference));
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what}: differs by {worst} (scale {scale}, tolerance {tol})"
    );
}

#[test]
fn convolution_equals_candles_forward_and_gradients() {
    let mut rng = Rng::new(7);
    let mut cases = vec![
        // (n, cin, h, w, cout, k, stride, pad): the network's own, then odd ones.
        (2, 3, 9, 9, 4, 3, 2, 1),
        (3, 4, 8, 8, 5, 1, 2, 0),
        (2, 4, 7, 7, 4, 1, 1, 0),
        (1, 3, 11, 11, 2, 7, 2, 3),
        (5, 2, 5, 7, 3, 3, 1, 1),
        (1, 1, 1, 1, 1, 1, 1, 0),
        (2, 2, 3, 3, 2, 3, 3, 2),
        // Wide enough for whole tiles (8 and 6 rows, 32 and 16 columns) and their edges.
        (2, 16, 12, 12, 40, 3, 1, 1),
        (3, 20, 13, 11, 33, 3, 2, 1),
        (1, 3, 23, 23, 17, 7, 2, 3),
        (3, 64, 7, 7, 64, 3, 1, 1),
        (2, 24, 9, 9, 36, 1, 2, 0),
        (1, 70, 6, 5, 12, 3, 1, 1),
        (2, 40, 9, 11, 8, 3, 2, 1),
        (2, 36, 7, 9, 40, 1, 2, 0),
        // A weight gradient above a mebibyte (576 x 528 floats) on small planes: the threads split its
        // tiles rather than the samples.
        (4, 64, 4, 4, 512, 3, 1, 1),
    ];
    for _ in 0..25 {
        let k = 1 + rng.below(5);
        let pad = rng.below(k.div_ceil(2) + 1);
        let h = (k.saturating_sub(2 * pad)).max(1) + rng.below(9);
        let w = (k.saturating_sub(2 * pad)).max(1) + rng.below(9);
        cases.push((
            1 + rng.below(5),
            1 + rng.below(5),
            h,
            w,
            1 + rng.below(6),
            k,
            1 + rng.below(3),
            pad,
        ));
    }
    let mut candle_compared = 0;
    for (i, &(n, cin, h, w, cout, k, stride, pad)) in cases.iter().enumerate() {
        let what = format!(
            "case {i}: n {n} cin {cin} {h}x{w} cout {cout} k {k} stride {stride} pad {pad}"
        );
        // Half the cases give the kernel a strided view (a transposed tensor) instead of a contiguous one.
        let x = if i % 2 == 1 {
            Var::from_tensor(&random(&mut rng, &[n, cin, w, h]).transpose(2, 3).unwrap()).unwrap()
        } else {
            Var::from_tensor(&random(&mut rng, &[n, cin, h, w])).unwrap()
        };
        let weight = Var::from_tensor(&random(&mut rng, &[cout, cin, k, k])).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(weight.as_tensor(), pad, stride, 1, 1)
            .unwrap();
        // A random linear function of the output, so every output position carries its own gradient.
        let probe = random(&mut rng, reference.dims());
        // candle's own backward fails where the stride leaves input rows or columns unused (its transposed
        // convolution gets the size wrong): there the direct sums below are the only reference.
        let g_ref = try_gradients(&reference, &probe);
        let direct = direct_gradients(
            &values(x.as_tensor()),
            &values(weight.as_tensor()),
            &values(&probe),
            (n, cin, h, w, cout, k, stride, pad),
        );
        // Every instruction set this CPU runs: the micro-kernels differ in tile shape and code, but each sum
        // runs in the same order with fused multiply-adds, so every one gives the same bits.
        let mut first: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = None;
        for &isa in Isa::available() {
            let what = format!("{what} on {isa:?}");
            let ours = conv2d_on(isa, x.as_tensor(), weight.as_tensor(), stride, pad).unwrap();
            assert_close(&ours, &reference, 1e-5, &format!("{what}: output"));
            let g_ours = gradients(&ours, &probe);
            let bits = (
                values(&ours),
                values(g_ours.get(&x).unwrap()),
                values(g_ours.get(&weight).unwrap()),
            );
            match &first {
                None => first = Some(bits),
                Some(first) => assert!(
                    first == &bits,
                    "{what}: not the same bits as on the first instruction set"
                ),
            }
            for (var, name, direct) in [(&x, "input", &direct.0), (&weight, "weight", &direct.1)] {
                let ours = g_ours.get(var).unwrap();
                let direct = Tensor::from_vec(direct.clone(), ours.dims(), &Device::Cpu).unwrap();
                assert_close(
                    ours,
                    &direct,
                    1e-5,
                    &format!("{what}: {name} gradient, direct sums"),
                );
                if let Ok(g_ref) = &g_ref {
                    assert_close(
                        ours,
                        g_ref.get(var).unwrap(),
                        1e-5,
                        &format!("{what}: {name} gradient"),
                    );
                }
            }
        }
        candle_compared += usize::from(g_ref.is_ok());
    }
    // Most cases have candle's gradients to compare with.
    assert!(
        candle_compared * 2 > cases.len(),
        "{candle_compared} of {}",
        cases.len()
    );
}

/// The gradients of `sum(probe * conv(x, weight))` by the definition: every (output, kernel tap) pair adds
/// its product once.
#[allow(clippy::type_complexity)]
fn direct_gradients(
    x: &[f32],
    weight: &[f32],
    probe: &[f32],
    (n, cin, h, w, cout, k, stride, pad): (usize, usize, usize, usize, usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; weight.len()];
    for b in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let g = f64::from(probe[((b * cout + co) * ho + oy) * wo + ox]);
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                                if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                    continue;
                                }
                                let xi = ((b * cin + ci) * h + iy - pad) * w + ix - pad;
                                let wi = ((co * cin + ci) * k + ky) * k + kx;
                                dx[xi] += g * f64::from(weight[wi]);
                                dw[wi] += g * f64::from(x[xi]);
                            }
                        }
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(dx), f(dw))
}

#[test]
fn convolution_refuses_mismatched_shapes() {
    let x = Tensor::zeros((2, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    // No channels: an error, where the planes' arithmetic would underflow.
    let none = Tensor::zeros((2, 0, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w0 = Tensor::zeros((4, 0, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = conv2d(&none, &w0, 1, 1).unwrap_err().to_string();
    assert!(err.contains("need channels"), "{err}");
    let big = Tensor::zeros((4, 3, 9, 9), DType::F32, &Device::Cpu).unwrap();
    let err = conv2d(&x, &big, 1, 1).unwrap_err().to_string();
    assert!(err.contains("larger than the padded input"), "{err}");
    assert!(conv2d(
        &x,
        &Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        0,
        1
    )
    .is_err());
}

/// Batch norm from candle's tensor ops, biased variance.
fn reference_batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: Option<(&Tensor, &Tensor)>,
) -> Tensor {
    let c = gamma.dim(0).unwrap();
    let shape = (1, c, 1, 1);
    let (mean, var) = match stats {
        Some((m, v)) => (m.reshape(shape).unwrap(), v.reshape(shape).unwrap()),
        None => {
            let per_channel = |t: &Tensor| {
                t.mean_keepdim(0)
                    .and_then(|t| t.mean_keepdim(2))
                    .and_then(|t| t.mean_keepdim(3))
                    .unwrap()
            };
            let mean = per_channel(x);
            let var = per_channel(&x.broadcast_sub(&mean).unwrap().sqr().unwrap());
            (mean, var)
        }
    };
    let scale = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
    x.broadcast_sub(&mean)
        .unwrap()
        .broadcast_mul(&scale)
        .unwrap()
        .broadcast_mul(&gamma.reshape(shape).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape(shape).unwrap())
        .unwrap()
}

#[test]
fn batch_norm_equals_candles_forward_and_gradients() {
    let mut rng = Rng::new(11);
    let mut cases = vec![(16, 8, 4, 4), (2, 3, 1, 1), (3, 5, 7, 5), (1, 2, 3, 3)];
    for _ in 0..10 {
        cases.push((
            1 + rng.below(6),
            1 + rng.below(9),
            1 + rng.below(9),
            1 + rng.below(9),
        ));
    }
    for (i, &(n, c, h, w)) in cases.iter().enumerate() {
        if n * h * w < 2 {
            continue;
        }
        for (relu, add) in [(false, false), (true, false), (true, true), (false, true)] {
            for train in [true, false] {
                let what = format!(
                    "case {i}: {n}x{c}x{h}x{w}, relu {relu}, residual {add}, train {train}"
                );
                let residual = Var::from_tensor(&random(&mut rng, &[n, c, h, w])).unwrap();
                let then = Then {
                    residual: add.then_some(residual.as_tensor()),
                    relu,
                };
                let x =
                    Var::from_tensor(&random(&mut rng, &[n, c, h, w]).affine(3.0, 1.0).unwrap())
                        .unwrap();
                let gamma = Var::from_tensor(&random(&mut rng, &[c])).unwrap();
                let beta = Var::from_tensor(&random(&mut rng, &[c])).unwrap();
                let running_mean = random(&mut rng, &[c]);
                let running_var = (random(&mut rng, &[c]).abs().unwrap() + 0.5).unwrap();
                let (ours, reference) = if train {
                    let (y, stats) = batch_norm_train(
                        x.as_tensor(),
                        gamma.as_tensor(),
                        beta.as_tensor(),
                        1e-5,
                        then,
                    )
                    .unwrap();
                    // The returned statistics are the batch's mean and biased variance.
                    let flat = x
                        .as_tensor()
                        .transpose(0, 1)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .reshape((c, n * h * w))
                        .unwrap();
                    let mean = flat.mean(1).unwrap();
                    let var = flat
                        .broadcast_sub(&mean.unsqueeze(1).unwrap())
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .mean(1)
                        .unwrap();
                    assert_close(
                        &Tensor::new(stats.mean.as_slice(), &Device::Cpu).unwrap(),
                        &mean,
                        1e-5,
                        &what,
                    );
                    assert_close(
                        &Tensor::new(stats.var.as_slice(), &Device::Cpu).unwrap(),
                        &var,
                        1e-5,
                        &what,
                    );
                    (
                        y,
                        reference_batch_norm(
                            x.as_tensor(),
                            gamma.as_tensor(),
                            beta.as_tensor(),
                            None,
                        ),
                    )
                } else {
                    let y = batch_norm_eval(
                        x.as_tensor(),
                        gamma.as_tensor(),
                        beta.as_tensor(),
                        &running_mean,
                        &running_var,
                        1e-5,
                        then,
                    )
                    .unwrap();
                    let r = reference_batch_norm(
                        x.as_tensor(),
                        gamma.as_tensor(),
                        beta.as_tensor(),
                        Some((&running_mean, &running_var)),
                    );
                    (y, r)
                };
                let reference = if add {
                    (reference + residual.as_tensor()).unwrap()
                } else {
                    reference
                };
                let reference = if relu {
                    reference.relu().unwrap()
                } else {
                    reference
                };
                assert_close(&ours, &reference, 2e-5, &format!("{what}: output"));
                let probe = random(&mut rng, &[n, c, h, w]);
                let g_ours = gradients(&ours, &probe);
                let g_ref = gradients(&reference, &probe);
                for (var, name) in [(&x, "input"), (&gamma, "weight"), (&beta, "bias")] {
                    assert_close(
                        g_ours.get(var).unwrap(),
                        g_ref.get(var).unwrap(),
                        5e-5,
                        &format!("{what}: {name} gradient"),
                    );
                }
                if add {
                    assert_close(
                        g_ours.get(&residual).unwrap(),
                        g_ref.get(&residual).unwrap(),
                        1e-6,
                        &format!("{what}: residual gradient"),
                    );
                } else {
                    assert!(g_ours.get(&residual).is_none());
                }
            }
        }
    }
}

#[test]
fn max_pool_equals_candles_forward_and_gradient() {
    let mut rng = Rng::new(13);
    let mut cases = vec![
        (16, 4, 112, 112, 2),
        (2, 3, 7, 5, 2),
        (1, 1, 2, 2, 2),
        (2, 2, 9, 9, 3),
    ];
    for _ in 0..10 {
        let size = 2 + rng.below(2);
        cases.push((
            1 + rng.below(3),
            1 + rng.below(4),
            size + rng.below(9),
            size + rng.below(9),
            size,
        ));
    }
    for (n, c, h, w, size) in cases {
        let what = format!("{n}x{c}x{h}x{w}, window {size}");
        let x = Var::from_tensor(&random(&mut rng, &[n, c, h, w])).unwrap();
        let ours = max_pool2d(x.as_tensor(), size).unwrap();
        let reference = x.as_tensor().max_pool2d(size).unwrap();
        assert_close(&ours, &reference, 0.0, &format!("{what}: output"));
        let probe = random(&mut rng, reference.dims());
        let g_ours = gradients(&ours, &probe);
        // candle's own backward hands each maximum a 1 / (size * size) share of its gradient (the window's
        // mean of the equality mask, where a count was meant), and where the window does not divide the input
        // its nearest-neighbour upsampling puts gradients on the wrong rows: compared where it holds, times
        // size².
        if h % size == 0 && w % size == 0 {
            let g_ref = gradients(&reference, &probe);
            let scaled = (g_ref.get(&x).unwrap() * (size * size) as f64).unwrap();
            assert_close(
                g_ours.get(&x).unwrap(),
                &scaled,
                1e-6,
                &format!("{what}: input gradient"),
            );
        }
        // And by the definition: the probe routed to each window's maximum.
        let (xv, pv) = (values(x.as_tensor()), values(&probe));
        let (ho, wo) = (h / size, w / size);
        let mut direct = vec![0f32; xv.len()];
        for plane in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let at = |ky: usize, kx: usize| {
                        plane * h * w + (oy * size + ky) * w + ox * size + kx
                    };
                    let best = (0..size * size)
                        .map(|i| at(i / size, i % size))
                        .max_by(|&a, &b| xv[a].total_cmp(&xv[b]))
                        .unwrap();
                    direct[best] += pv[(plane * ho + oy) * wo + ox];
                }
            }
        }
        let direct = Tensor::from_vec(direct, (n, c, h, w), &Device::Cpu).unwrap();
        assert_close(
            g_ours.get(&x).unwrap(),
            &direct,
            0.0,
            &format!("{what}: routed gradient"),
        );
    }
    let small = Tensor::zeros((1, 1, 1, 3), DType::F32, &Device::Cpu).unwrap();
    let err = max_pool2d(&small, 2).unwrap_err().to_string();
    assert!(err.contains("larger than the input"), "{err}");
}

#[test]
fn fused_adamw_equals_candle_nn_adamw() {
    let mut rng = Rng::new(3);
    let shapes: [&[usize]; 4] = [&[5], &[3, 4, 3, 3], &[1, 70_001], &[1]];
    let init: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s)).collect();
    let ours: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let theirs: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let params = ParamsAdamW {
        lr: 5e-3,
        weight_decay: 1e-2,
        ..Default::default()
    };
    let mut a = FusedAdamW::new(ours.clone(), params.clone()).unwrap();
    let mut b = AdamW::new(theirs.clone(), params).unwrap();
    for step in 0..5 {
        // The same loss on both sets of variables: a random linear function plus a square, so gradients differ
        // from step to step.
        let probes: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s)).collect();
        let loss = |vars: &[Var]| {
            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
            for (v, p) in vars.iter().zip(&probes) {
                let term = ((v.as_tensor() * p).unwrap() + v.as_tensor().sqr().unwrap()).unwrap();
                total = (total + term.sum_all().unwrap()).unwrap();
            }
            total
        };
        let lr = 5e-3 / (step + 1) as f64;
        a.set_learning_rate(lr);
        b.set_learning_rate(lr);
        a.backward_step(&loss(&ours)).unwrap();
        b.backward_step(&loss(&theirs)).unwrap();
        for (i, (x, y)) in ours.iter().zip(&theirs).enumerate() {
            // The same f32 operations in the same order: equal to the bit.
            assert_eq!(
                values(x.as_tensor()),
                values(y.as_tensor()),
                "variable {i} after step {step}"
            );
        }
    }
}

fn samples(n: usize, channels: usize, size: usize, rng: &mut Rng) -> Vec<Sample> {
    (0..n)
        .map(|i| Sample {
            patient_id: format!("P{i}"),
            center: "test".into(),
            image: (0..channels * size * size)
                .map(|_| rng.normal() as f32)
                .collect(),
            channels,
            size,
            clinical: (0..5).map(|_| f32::from(rng.bernoulli(0.4))).collect(),
            label: Some(i % 3 == 0),
        })
        .collect()
}

/// The whole network, trained with our kernels and with candle's from the same weights on the same (augmented)
/// batches. Under SGD the two stay within float rounding; AdamW divides by the root of tiny second moments, so
/// there rounding-level gradient differences grow, and the check is on losses and predictions.
#[test]
fn networks_train_alike_on_either_kernels() {
    use fedslm_model::Optimizer;
    let mut rng = Rng::new(5);
    for (stem_case, config) in [
        ("compact", NetConfig::compact(9, 32, 5)),
        (
            "standard stem",
            NetConfig {
                width: 4,
                ..NetConfig::resnet18(3, 64, 5)
            },
        ),
    ] {
        let data = samples(20, config.in_channels, config.input_size, &mut rng);
        let refs: Vec<&Sample> = data.iter().collect();
        for (optimizer, weight_tol, prediction_tol) in [
            (
                Optimizer::Sgd {
                    momentum: 0.9,
                    weight_decay: 1e-2,
                },
                2e-5,
                1e-5,
            ),
            (Optimizer::AdamW { weight_decay: 1e-2 }, 1e-3, 1e-3),
        ] {
            let what = format!("{stem_case}, {optimizer:?}");
            let cfg = TrainConfig {
                epochs: 2,
                batch_size: 8,
                optimizer,
                learning_rate: 1e-2,
                ..TrainConfig::default()
            };
            let ours = Network::new(ModelKind::Combined, config, 9).unwrap();
            let mut theirs = Network::new(ModelKind::Combined, config, 9).unwrap();
            theirs.set_kernels(Kernels::Candle);
            let la = ours.fit(&refs, &cfg, |_| {}).unwrap();
            let lb = theirs.fit(&refs, &cfg, |_| {}).unwrap();
            for (a, b) in la.iter().zip(&lb) {
                assert!(
                    (a.loss - b.loss).abs() < 1e-4,
                    "{what}: losses {} and {}",
                    a.loss,
                    b.loss
                );
            }
            let (wa, wb) = (ours.to_weights().unwrap(), theirs.to_weights().unwrap());
            for t in wa.tensors() {
                let name = t.name();
                let (a, b) = (t.to_f32_vec(), wb.get(name).unwrap().to_f32_vec());
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst < weight_tol, "{what}: {name} differs by {worst}");
            }
            let (pa, pb) = (ours.predict(&refs).unwrap(), theirs.predict(&refs).unwrap());
            for (a, b) in pa.iter().zip(&pb) {
                assert!(
                    (a - b).abs() < prediction_tol,
                    "{what}: predictions {a} and {b}"
                );
            }
        }
    }
}
