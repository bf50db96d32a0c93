//! AdamW (decoupled weight decay, as PyTorch's and candle-nn's) that updates each variable and its two moments
//! in place in one pass. candle-nn's computes the same formula in twelve tensor ops per variable, each
//! allocating a tensor of the variable's size; the arithmetic here is theirs, operation for operation, in f32.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

use super::{parallel, values};

const NAME: &str = "fedslm-adamw";

/// Large variables are updated in parallel chunks of this many values.
const CHUNK: usize = 1 << 15;

pub struct FusedAdamW {
    vars: Vec<(Var, Vec<f32>, Vec<f32>)>,
    params: ParamsAdamW,
    step: i32,
}

impl FusedAdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<FusedAdamW> {
        let vars = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|v| {
                let n = v.elem_count();
                (v, vec![0f32; n], vec![0f32; n])
            })
            .collect();
        Ok(FusedAdamW {
            vars,
            params,
            step: 0,
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        let c = Coefficients {
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(self.step))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(self.step))) as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            eps: p.eps as f32,
            lr: p.lr as f32,
        };
        for (var, m, v) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            let update = Update {
                c,
                moments: RefCell::new((m.as_mut_slice(), v.as_mut_slice())),
            };
            var.as_tensor().inplace_op2(g, &update)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Coefficients {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

impl Coefficients {
    /// candle-nn's AdamW step on one value: returns the new (theta, m, v).
    #[inline]
    fn apply(&self, theta: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let next_m = m * self.beta1 + g * self.one_minus_beta1;
        let next_v = v * self.beta2 + (g * g) * self.one_minus_beta2;
        let m_hat = next_m * self.scale_m;
        let v_hat = next_v * self.scale_v;
        let adjusted = m_hat / (v_hat.sqrt() + self.eps);
        (theta * self.decay - adjusted * self.lr, next_m, next_v)
    }
}

/// A slice of a variable and its gradient; the same slice of its two moments.
type Chunk<'a> = (&'a mut [f32], &'a [f32]);
type Moments<'a> = (&'a mut [f32], &'a mut [f32]);

struct Update<'a> {
    c: Coefficients,
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let grad = values(s2, l2, NAME)?;
        let CpuStorage::F32(data) = s1 else {
            candle_core::bail!("{NAME}: only f32 variables are supported")
        };
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("{NAME}: the variable is not contiguous")
        };
        let theta = &mut data[start..end];
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if theta.len() != grad.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!(
                "{NAME}: variable of {} values, gradient of {}",
                theta.len(),
                grad.len()
            );
        }
        let c = self.c;
        let update = |((t, g), (m, v)): (Chunk, Moments)| {
            for (((t, &g), m), v) in t.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                (*t, *m, *v) = c.apply(*t, g, *m, *v);
            }
        };
        if parallel(theta.len()) {
            theta
                .par_chunks_mut(CHUNK)
                .zip(grad.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(update);
        } else {
            update(((theta, &grad), (m, v)));
        }
        Ok(())
    }
}
