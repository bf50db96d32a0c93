//! CPU kernels of our own for the operations that dominate training, as candle custom ops: candle 0.11's CPU
//! convolution runs at a fraction of the machine's speed (its input gradient is a naive transposed convolution)
//! and its batch norm, built from a dozen elementwise ops, copies every activation several times.
//!
//! - `conv`: 2-D convolution as direct convolution over zero-padded phase planes, with both backward passes,
//!   on one register-blocked micro-kernel (AVX-512, AVX2 or portable, chosen at run time).
//! - `norm`: batch normalisation with the ReLU that follows it fused in, forward and backward in one pass each.
//! - `pool`: max pooling (window = stride) whose backward routes each gradient in one pass.
//! - `adamw`: AdamW updating each variable in place in one pass, as candle-nn's twelve tensor ops do.
//!
//! Work is split over the batch into one contiguous chunk per thread (`threads()`): the result does not depend
//! on scheduling, only on the thread count. Each op is tested against candle's own (`model/tests/kernels.rs`).

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

pub mod adamw;
pub mod conv;
pub mod norm;
pub mod pool;

pub use adamw::FusedAdamW;
pub use conv::{conv2d, conv2d_on, Isa};
pub use norm::{batch_norm_eval, batch_norm_train, BatchStats, Then};
pub use pool::max_pool2d;

/// Which implementation the networks use: ours, or candle's own ops (the reference, kept for the tests and for
/// the benchmark's before/after in one run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    #[default]
    Fedslm,
    Candle,
}

/// Threads the kernels split work over: candle's own setting (`RAYON_NUM_THREADS`, else the physical cores),
/// read at the first call. candle derives it anew at every call, from `/proc/cpuinfo` when the variable is
/// unset: that was 5 % of a simulation's CPU, every kernel asking (see `settle_threads`).
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Fixes the process's thread settings for training before any thread starts, where the environment leaves
/// them open:
/// - `RAYON_NUM_THREADS` to candle's default (the physical cores), which candle's matrix product otherwise
///   derives from `/proc/cpuinfo` at every call;
/// - `CANDLE_NUM_THREADS` to 1: the candle ops our kernels leave (autograd's gradient sums, the loss) run in
///   the calling thread. Spread over candle's own pool, the caller spins until the pool's threads finish, and
///   where several trainings share the cores (a simulation's federations beside its baselines) a pool thread
///   waits for a core while the caller spins: 12 % of a default simulation's CPU (BENCHMARKS.md);
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 1,000 rounds (candle's pool spins 25,000 after each op before it
///   sleeps), for a pool a user asks for with `CANDLE_NUM_THREADS`.
///
/// # Safety
/// Sets environment variables: call it before any other thread starts.
pub unsafe fn settle_threads() {
    let unset = |name: &str| std::env::var_os(name).is_none();
    if unset("RAYON_NUM_THREADS") {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().max(1).to_string(),
        );
    }
    if unset("CANDLE_NUM_THREADS") {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if unset("CANDLE_BARRIER_POOL_SPIN_LIMIT") {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
}

/// Whether work over `len` values is worth handing to the thread pool: waking its threads costs more than a
/// small elementwise pass.
pub(crate) fn parallel(len: usize) -> bool {
    len >= 1 << 15 && threads() > 1
}

/// Runs `f(index, chunk)` over the `per`-long chunks of `out` (an activation's planes), in parallel when it is
/// large.
pub(crate) fn per_plane<T: Send>(out: &mut [T], per: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    use rayon::prelude::*;
    if per == 0 {
        return;
    }
    if parallel(out.len()) {
        out.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, p)| f(i, p));
    } else {
        out.chunks_mut(per).enumerate().for_each(|(i, p)| f(i, p));
    }
}

/// A new activation of `len` values made plane by plane as `per_plane` does, without zeroing it first (the
/// zeroing of fresh activations was a third of the default network's inference on the calling thread).
///
/// # Safety
/// `f(index, plane)` must write every value of the `per`-long (the last one: shorter) `plane` it is given.
pub(crate) unsafe fn new_per_plane(
    len: usize,
    per: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    per_plane(&mut out.spare_capacity_mut()[..len], per, f);
    // SAFETY: the planes cover `len` values, and the caller's `f` wrote each.
    unsafe { out.set_len(len) };
    out
}

/// The f32 values of a CPU storage in the layout's logical order, borrowed where they are contiguous.
pub(crate) fn values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<Cow<'a, [f32]>> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!(
            "{op}: only f32 tensors are supported, got {:?}",
            storage.dtype()
        )
    };
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok(Cow::Borrowed(&data[start..end]));
    }
    // A strided view (a transpose, a narrowed slice): gather it in row-major order.
    let dims = layout.dims();
    let stride = layout.stride();
    let mut out = Vec::with_capacity(layout.shape().elem_count());
    let mut index = vec![0usize; dims.len()];
    if dims.iter().all(|&d| d > 0) {
        loop {
            let offset: usize =
                layout.start_offset() + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
            out.push(data[offset]);
            let mut axis = dims.len();
            loop {
                if axis == 0 {
                    return Ok(Cow::Owned(out));
                }
                axis -= 1;
                index[axis] += 1;
                if index[axis] < dims[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }
    Ok(Cow::Owned(out))
}

/// The f32 values of a tensor (on the CPU) in row-major order.
pub(crate) fn tensor_values(t: &Tensor, op: &str) -> Result<Vec<f32>> {
    with_values(t, op, |v| Ok(v.to_vec()))
}

/// Runs `f` on the tensor's f32 values without copying contiguous ones.
pub(crate) fn with_values<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(&values(cpu, layout, op)?),
        _ => candle_core::bail!("{op}: only CPU tensors are supported"),
    }
}

/// Splits `items` (samples of a batch) into at most `threads()` contiguous runs: (first, count) each.
pub(crate) fn chunks(items: usize) -> Vec<(usize, usize)> {
    let parts = threads().min(items).max(1);
    let per = items.div_ceil(parts);
    (0..parts)
        .map(|p| (p * per, per.min(items.saturating_sub(p * per))))
        .filter(|&(_, n)| n > 0)
        .collect()
}
