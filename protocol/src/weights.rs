//! Named tensors as they travel: raw little-endian bytes plus the metadata to read them back.
//!
//! Tensors are not serde sequences of numbers: a 45 MB model would cost one call per element. The bytes are
//! kept as they arrive ([`Bytes`], a view into the received frame), and converted to `f32`/`f64` on demand.

use bytes::Bytes;
use half::{bf16, f16};

/// Element type of a tensor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }
}

/// What a tensor is to the federation: strategies treat each role differently (FedBN keeps batch-norm local),
/// and the server checks them without relying on a naming convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// A trainable weight or bias.
    Parameter,
    /// A trainable batch-norm scale or shift.
    BatchNormParameter,
    /// A batch-norm running mean or variance: estimated, not trained.
    BatchNormStatistic,
}

impl TensorRole {
    pub const ALL: [TensorRole; 3] = [
        TensorRole::Parameter,
        TensorRole::BatchNormParameter,
        TensorRole::BatchNormStatistic,
    ];

    pub fn code(self) -> u8 {
        match self {
            TensorRole::Parameter => 0,
            TensorRole::BatchNormParameter => 1,
            TensorRole::BatchNormStatistic => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<TensorRole> {
        TensorRole::ALL.into_iter().find(|r| r.code() == code)
    }
}

/// Why a tensor or a set of weights is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("tensor name is empty")]
    EmptyName,
    #[error("tensor {name:?}: shape {shape:?} of {dtype:?} needs {expected} bytes, but {actual} were given")]
    SizeMismatch {
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        expected: usize,
        actual: usize,
    },
    #[error("tensor {name:?}: shape {shape:?} has more elements than this machine can address")]
    ShapeOverflow { name: String, shape: Vec<usize> },
    #[error("tensor {name:?} appears more than once")]
    DuplicateName { name: String },
    #[error("no tensor named {name:?}")]
    Missing { name: String },
    #[error("tensor {name:?}: shape {shape:?}, where {expected:?} was expected")]
    Shape {
        name: String,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// One named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    role: TensorRole,
    data: Bytes,
}

/// Values as consecutive little-endian encodings of `N` bytes each.
fn le_bytes<T, const N: usize>(values: &[T], encode: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * N];
    for (chunk, v) in out.chunks_exact_mut(N).zip(values) {
        chunk.copy_from_slice(&encode(v));
    }
    out
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// A tensor from raw little-endian bytes; the byte length must be the shape's element count times the
    /// dtype's size.
    pub fn from_raw(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: DType,
        role: TensorRole,
        data: Bytes,
    ) -> Result<Tensor, WeightsError> {
        let name = name.into();
        if name.is_empty() {
            return Err(WeightsError::EmptyName);
        }
        let Some(expected) = element_count(&shape).and_then(|n| n.checked_mul(dtype.size())) else {
            return Err(WeightsError::ShapeOverflow { name, shape });
        };
        if expected != data.len() {
            return Err(WeightsError::SizeMismatch {
                name,
                shape,
                dtype,
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor {
            name,
            shape,
            dtype,
            role,
            data,
        })
    }

    /// An `f32` tensor holding `values` exactly.
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        role: TensorRole,
        values: &[f32],
    ) -> Result<Tensor, WeightsError> {
        Tensor::from_f32_as(name, shape, role, values, DType::F32)
    }

    /// An `f64` tensor holding `values` exactly (the clinical model's gradients and Hessians).
    pub fn from_f64(
        name: impl Into<String>,
        shape: Vec<usize>,
        role: TensorRole,
        values: &[f64],
    ) -> Result<Tensor, WeightsError> {
        let out = le_bytes(values, |v| v.to_le_bytes());
        Tensor::from_raw(name, shape, DType::F64, role, Bytes::from(out))
    }

    /// `f32` values stored as `dtype` (`F16`/`BF16` round to nearest, halving what travels; `F64` widens).
    pub fn from_f32_as(
        name: impl Into<String>,
        shape: Vec<usize>,
        role: TensorRole,
        values: &[f32],
        dtype: DType,
    ) -> Result<Tensor, WeightsError> {
        let out = match dtype {
            DType::F32 => le_bytes(values, |v| v.to_le_bytes()),
            DType::F64 => le_bytes(values, |v| f64::from(*v).to_le_bytes()),
            DType::F16 => le_bytes(values, |v| f16::from_f32(*v).to_le_bytes()),
            DType::BF16 => le_bytes(values, |v| bf16::from_f32(*v).to_le_bytes()),
        };
        Tensor::from_raw(name, shape, dtype, role, Bytes::from(out))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn role(&self) -> TensorRole {
        self.role
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    pub fn element_count(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The values as `f32`; `F64` is narrowed, `F16`/`BF16` widened.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F64 => self.to_f64_vec().into_iter().map(|v| v as f32).collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    /// The values as `f64`, exactly for every dtype (server-side accumulators are f64).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.element_count());
        self.for_each_f64(|v| out.push(v));
        out
    }

    /// The squared L2 distance between this tensor's values and `other`'s, element by element (over the
    /// shorter of the two): the measure of a norm bound, which the server checks in the clear and a centre
    /// checks itself before masking. Two `F32` tensors are compared without a copy, in eight fixed lanes (the
    /// same sum on every machine); other dtypes through `f64` values in order.
    pub fn squared_distance(&self, other: &Tensor) -> f64 {
        if self.dtype == DType::F32 && other.dtype == DType::F32 {
            return squared_distance_f32(&self.data, &other.data);
        }
        let theirs = other.to_f64_vec();
        let mut squared = 0.0;
        let mut i = 0;
        self.for_each_f64(|a| {
            if let Some(b) = theirs.get(i) {
                let d = a - b;
                squared += d * d;
            }
            i += 1;
        });
        squared
    }

    /// The index of the first value that is not finite (NaN or infinite), if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => first_set(d, 4, |c| {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
            }),
            DType::F64 => first_set(d, 8, |c| {
                let bits = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                bits & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
            }),
            DType::F16 => first_set(d, 2, |c| {
                u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00
            }),
            DType::BF16 => first_set(d, 2, |c| {
                u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80
            }),
        }
    }

    /// Adds `weight` times each value to `sums`, element by element (over the shorter of the two): FedAvg's
    /// fold, the same arithmetic as `sums[i] += weight * value as f64`, in a loop the compiler vectorises.
    pub fn add_scaled_to(&self, weight: f64, sums: &mut [f64]) {
        let d = &self.data;
        match self.dtype {
            DType::F32 => {
                for (s, c) in sums.iter_mut().zip(d.chunks_exact(4)) {
                    *s += weight * f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
            _ => {
                let mut values = sums.iter_mut();
                self.for_each_f64(|v| {
                    if let Some(s) = values.next() {
                        *s += weight * v;
                    }
                });
            }
        }
    }

    /// [`Tensor::add_scaled_to`] into sums not made yet: appends `0.0 + weight * value` for each value to
    /// `sums`, the same bits as adding to zeros. A buffer of zeros from the allocator is the system's shared
    /// zero page until written, and an addition reads before it writes: each page then faults twice, the
    /// second time flushing every core's TLB (ResNet-18's first fold of a round: three times the fold's own
    /// time). Written once here, each page faults once.
    pub fn scaled_into(&self, weight: f64, sums: &mut Vec<f64>) {
        sums.reserve_exact(self.element_count());
        match self.dtype {
            DType::F32 => {
                sums.extend(self.data.chunks_exact(4).map(|c| {
                    0.0 + weight * f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                }))
            }
            _ => self.for_each_f64(|v| sums.push(0.0 + weight * v)),
        }
    }

    /// Calls `f` with each value as `f64`, in order, without allocating: the server folds updates of
    /// tens of megabytes this way.
    pub fn for_each_f64(&self, mut f: impl FnMut(f64)) {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .for_each(|c| f(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
            DType::F64 => d.chunks_exact(8).for_each(|c| {
                f(f64::from_le_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]))
            }),
            DType::F16 => d
                .chunks_exact(2)
                .for_each(|c| f(f64::from(f16::from_le_bytes([c[0], c[1]]).to_f32()))),
            DType::BF16 => d
                .chunks_exact(2)
                .for_each(|c| f(f64::from(bf16::from_le_bytes([c[0], c[1]]).to_f32()))),
        }
    }
}

/// Lanes of [`squared_distance_f32`]'s sum: independent additions the processor overlaps.
const LANES: usize = 8;

/// The squared L2 distance between two runs of little-endian `f32`, over the shorter, in `f64`, summed in
/// [`LANES`] fixed lanes and then across them.
fn squared_distance_f32(a: &[u8], b: &[u8]) -> f64 {
    let value = |c: &[u8]| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let n = a.len().min(b.len()) / 4 * 4;
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0.0f64; LANES];
    let block = 4 * LANES;
    let mut a_blocks = a.chunks_exact(block);
    let mut b_blocks = b.chunks_exact(block);
    for (x, y) in (&mut a_blocks).zip(&mut b_blocks) {
        for (lane, (p, q)) in lanes
            .iter_mut()
            .zip(x.chunks_exact(4).zip(y.chunks_exact(4)))
        {
            let d = value(p) - value(q);
            *lane += d * d;
        }
    }
    let mut squared: f64 = lanes.iter().sum();
    for (p, q) in a_blocks
        .remainder()
        .chunks_exact(4)
        .zip(b_blocks.remainder().chunks_exact(4))
    {
        let d = value(p) - value(q);
        squared += d * d;
    }
    squared
}

/// The index of the first element of `size` bytes in `data` for which `set` holds: blocks are scanned
/// without an early exit, so that the common case (none) runs at memory speed.
fn first_set(data: &[u8], size: usize, set: impl Fn(&[u8]) -> bool) -> Option<usize> {
    const BLOCK: usize = 1024;
    for (b, block) in data.chunks(BLOCK * size).enumerate() {
        let any = block.chunks_exact(size).fold(false, |any, c| any | set(c));
        if any {
            let at = block.chunks_exact(size).position(set)?;
            return Some(b * BLOCK + at);
        }
    }
    None
}

/// A model's tensors, in order, with unique names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights {
    tensors: Vec<Tensor>,
}

impl Weights {
    pub fn new() -> Weights {
        Weights::default()
    }

    /// Weights from tensors whose names must be unique.
    pub fn from_tensors(tensors: Vec<Tensor>) -> Result<Weights, WeightsError> {
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(WeightsError::DuplicateName {
                name: w[0].to_string(),
            });
        }
        Ok(Weights { tensors })
    }

    pub fn push(&mut self, tensor: Tensor) -> Result<(), WeightsError> {
        if self.get(tensor.name()).is_some() {
            return Err(WeightsError::DuplicateName {
                name: tensor.name().to_string(),
            });
        }
        self.tensors.push(tensor);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name() == name)
    }

    /// The named tensor, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor, WeightsError> {
        self.get(name).ok_or_else(|| WeightsError::Missing {
            name: name.to_string(),
        })
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Bytes of tensor data, without names and shapes.
    pub fn data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly_and_is_little_endian() {
        let v = [1.0f32, -2.5, f32::MIN_POSITIVE, 3.25e10];
        let t = Tensor::from_f32("w", vec![2, 2], TensorRole::Parameter, &v).unwrap();
        assert_eq!(&t.bytes()[..4], &1.0f32.to_le_bytes());
        assert_eq!(t.to_f32_vec(), v);
        assert_eq!(t.to_f64_vec()[1], -2.5);
    }

    #[test]
    fn the_first_non_finite_value_is_found_in_every_dtype_and_none_in_finite_tensors() {
        for dtype in DType::ALL {
            for n in [1usize, 7, 1023, 1024, 1025, 3000] {
                let finite: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 100.0).collect();
                let t = Tensor::from_f32_as("w", vec![n], TensorRole::Parameter, &finite, dtype);
                assert_eq!(t.unwrap().first_non_finite(), None, "{dtype:?} {n}");
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    for at in [0, n / 2, n - 1] {
                        let mut v = finite.clone();
                        v[at] = bad;
                        if at > 0 {
                            v[at - 1] = f32::MAX.min(6e4);
                        }
                        let t = Tensor::from_f32_as("w", vec![n], TensorRole::Parameter, &v, dtype);
                        assert_eq!(
                            t.unwrap().first_non_finite(),
                            Some(at),
                            "{dtype:?} {n} {at}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_f32_distance_is_the_sequential_sum_to_rounding_and_covers_the_tail() {
        for n in [0usize, 1, 7, 8, 9, 31, 33, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let ta = Tensor::from_f32("a", vec![n], TensorRole::Parameter, &a).unwrap();
            let tb = Tensor::from_f32("b", vec![n], TensorRole::Parameter, &b).unwrap();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
                .sum();
            let got = ta.squared_distance(&tb);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "{n}: {got} {want}"
            );
            // Against an f64 tensor the values go through the general path: the same distance.
            let wide = Tensor::from_f32_as("b", vec![n], TensorRole::Parameter, &b, DType::F64);
            let general = ta.squared_distance(&wide.unwrap());
            assert!((general - want).abs() <= 1e-12 * want.max(1.0), "{n}");
        }
    }

    #[test]
    fn adding_scaled_values_is_the_element_by_element_arithmetic() {
        let v = [1.5f32, -2.25, 3.0e-8, 7.0];
        for dtype in DType::ALL {
            let t = Tensor::from_f32_as("w", vec![4], TensorRole::Parameter, &v, dtype).unwrap();
            let mut sums = vec![0.25f64; 4];
            t.add_scaled_to(3.0, &mut sums);
            let mut want = vec![0.25f64; 4];
            let mut i = 0;
            t.for_each_f64(|x| {
                want[i] += 3.0 * x;
                i += 1;
            });
            assert_eq!(sums, want, "{dtype:?}");
        }
    }

    #[test]
    fn the_first_fold_has_the_bits_of_adding_to_zeros_negative_zero_included() {
        let v = [-0.0f32, 1.5, -2.25, 3.0e-30, f32::MIN_POSITIVE];
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let t = Tensor::from_f32_as("w", vec![5], TensorRole::Parameter, &v, dtype).unwrap();
            let mut zeros = vec![0.0f64; 5];
            t.add_scaled_to(3.0, &mut zeros);
            let mut made = Vec::new();
            t.scaled_into(3.0, &mut made);
            let bits = |s: &[f64]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&made), bits(&zeros), "{dtype:?}");
            // 0.0 + -0.0 is +0.0: a first fold that copied the product would keep the sign.
            assert!(made[0].is_sign_positive(), "{dtype:?}");
        }
    }

    #[test]
    fn f64_round_trips_exactly() {
        let v = [1.0 / 3.0, -1e-300, 7.0];
        let t = Tensor::from_f64("h", vec![3], TensorRole::Parameter, &v).unwrap();
        assert_eq!(t.to_f64_vec(), v);
    }

    #[test]
    fn half_precision_rounds_to_nearest() {
        let v = [1.0f32, 0.333_333, -65504.0];
        let h = Tensor::from_f32_as("a", vec![3], TensorRole::Parameter, &v, DType::F16).unwrap();
        let b = Tensor::from_f32_as("b", vec![3], TensorRole::Parameter, &v, DType::BF16).unwrap();
        assert_eq!(h.bytes().len(), 6);
        assert_eq!(h.to_f32_vec()[0], 1.0);
        assert!((h.to_f32_vec()[1] - 0.333_333).abs() < 1e-3);
        assert_eq!(h.to_f32_vec()[2], -65504.0);
        assert!((b.to_f32_vec()[1] - 0.333_333).abs() < 2e-3);
    }

    #[test]
    fn shape_must_match_bytes() {
        let e = Tensor::from_f32("w", vec![3, 2], TensorRole::Parameter, &[0.0; 5]).unwrap_err();
        assert!(matches!(
            e,
            WeightsError::SizeMismatch {
                expected: 24,
                actual: 20,
                ..
            }
        ));
        let e = Tensor::from_raw(
            "w",
            vec![usize::MAX, 2],
            DType::F32,
            TensorRole::Parameter,
            Bytes::new(),
        )
        .unwrap_err();
        assert!(matches!(e, WeightsError::ShapeOverflow { .. }));
        assert_eq!(
            Tensor::from_f32("", vec![0], TensorRole::Parameter, &[]).unwrap_err(),
            WeightsError::EmptyName
        );
    }

    #[test]
    fn names_are_unique() {
        let t = Tensor::from_f32("w", vec![1], TensorRole::Parameter, &[1.0]).unwrap();
        let e = Weights::from_tensors(vec![t.clone(), t.clone()]).unwrap_err();
        assert_eq!(e, WeightsError::DuplicateName { name: "w".into() });
        let mut w = Weights::new();
        w.push(t.clone()).unwrap();
        assert!(w.push(t).is_err());
        assert!(w.require("nope").is_err());
    }
}
