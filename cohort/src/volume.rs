//! An image volume after reading: voxel values after rescaling, in one layout whatever the format.

/// Where a volume came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Nifti,
    Dicom,
    DicomSeries,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Nifti => "nifti",
            Format::Dicom => "dicom",
            Format::DicomSeries => "dicom-series",
        }
    }
}

/// A 3-D (or 4-D) image: `x` varies fastest, then `y`, `z`, `t`.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub format: Format,
    /// [x, y, z] or [x, y, z, t]; for DICOM [Columns, Rows, frames or slices].
    pub dims: Vec<usize>,
    /// Voxel size along each of `dims` (mm; seconds for NIfTI's t). For a single DICOM file: the in-plane
    /// spacing where PixelSpacing is present, then the slice thickness if any.
    pub spacing: Vec<f64>,
    /// Voxel index (i, j, k) to patient coordinates in mm, RAS+ (NIfTI's convention; DICOM's LPS is converted).
    pub affine: [[f64; 4]; 4],
    /// The stored data type, e.g. `int16`, `float32`.
    pub dtype: String,
    /// Values after rescaling (NIfTI scl_slope/scl_inter, DICOM RescaleSlope/Intercept), in f64 so that
    /// rescaled values are exact.
    pub data: Vec<f64>,
}

/// Summary statistics of voxel values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub sum: f64,
}

impl Volume {
    /// Separable in-plane Gaussian blur of standard deviation `sigma_mm` (nothing below a fifth of a voxel),
    /// edges clamped.
    pub fn blur_in_plane(&mut self, sigma_mm: f64) {
        let (nx, ny, nz) = (self.dims[0], self.dims[1], self.dims[2]);
        let plane = nx * ny;
        for (axis, n) in [(0usize, nx), (1, ny)] {
            let sigma = sigma_mm / self.spacing[axis];
            if sigma < 0.2 || n == 0 {
                continue;
            }
            let half = (3.0 * sigma).ceil() as usize;
            let kernel: Vec<f64> = (-(half as isize)..=half as isize)
                .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
                .collect();
            let total: f64 = kernel.iter().sum();
            // Each output sums its taps in kernel order, from 0.0, as a plain loop over the taps would; the
            // taps run over whole rows so that the sums vectorise across the row.
            let clamped = |i: usize, k: usize| (i + k).saturating_sub(half).min(n - 1);
            let mut acc = vec![0.0; nx];
            let mut padded = vec![0.0; nx + 2 * half];
            for z in 0..nz {
                let slab = &mut self.data[z * plane..(z + 1) * plane];
                let src = slab.to_vec();
                for y in 0..ny {
                    acc.fill(0.0);
                    if axis == 0 {
                        let row = &src[y * nx..(y + 1) * nx];
                        for (p, v) in padded.iter_mut().enumerate() {
                            *v = row[clamped(p, 0)];
                        }
                        for (k, w) in kernel.iter().enumerate() {
                            for (a, &x) in acc.iter_mut().zip(&padded[k..k + nx]) {
                                *a += w * x;
                            }
                        }
                    } else {
                        for (k, w) in kernel.iter().enumerate() {
                            let j = clamped(y, k);
                            for (a, &x) in acc.iter_mut().zip(&src[j * nx..(j + 1) * nx]) {
                                *a += w * x;
                            }
                        }
                    }
                    for (out, a) in slab[y * nx..(y + 1) * nx].iter_mut().zip(&acc) {
                        *out = a / total;
                    }
                }
            }
        }
    }

    pub fn voxels(&self) -> usize {
        self.data.len()
    }

    pub fn stats(&self) -> Stats {
        let (mut min, mut max, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
        for &v in &self.data {
            min = min.min(v);
            max = max.max(v);
            sum += v;
        }
        Stats {
            min,
            max,
            mean: sum / self.data.len() as f64,
            sum,
        }
    }
}

/// The identity affine scaled by `spacing` (used where a file gives no orientation).
pub(crate) fn scaled_identity(spacing: &[f64]) -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = if i < 3 {
            spacing.get(i).copied().unwrap_or(1.0)
        } else {
            1.0
        };
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blur as its definition reads: every output its taps summed one by one, edges clamped.
    fn blur_by_definition(v: &mut Volume, sigma_mm: f64) {
        let (nx, ny, nz) = (v.dims[0], v.dims[1], v.dims[2]);
        for (axis, n, stride) in [(0usize, nx, 1usize), (1, ny, nx)] {
            let sigma = sigma_mm / v.spacing[axis];
            if sigma < 0.2 {
                continue;
            }
            let half = (3.0 * sigma).ceil() as isize;
            let kernel: Vec<f64> = (-half..=half)
                .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
                .collect();
            let total: f64 = kernel.iter().sum();
            let src = v.data.clone();
            for z in 0..nz {
                for line in 0..(if axis == 0 { ny } else { nx }) {
                    let base = z * nx * ny + if axis == 0 { line * nx } else { line };
                    for i in 0..n {
                        let mut acc = 0.0;
                        for (k, w) in kernel.iter().enumerate() {
                            let j = (i as isize + k as isize - half).clamp(0, n as isize - 1);
                            acc += w * src[base + j as usize * stride];
                        }
                        v.data[base + i * stride] = acc / total;
                    }
                }
            }
        }
    }

    #[test]
    fn the_row_wise_blur_is_the_definition_bit_for_bit() {
        let mut rng = fedslm_protocol::rng::Rng::new(5);
        for (dims, spacing, sigma) in [
            (vec![13, 9, 3], vec![0.7, 1.3, 4.0], 3.0),
            (vec![5, 4, 2], vec![0.5, 0.5, 3.0], 6.0),
            (vec![8, 8, 1], vec![1.0, 10.0, 1.0], 1.0),
            (vec![1, 6, 2], vec![1.0, 1.0, 1.0], 2.0),
        ] {
            let len = dims.iter().product();
            let volume = Volume {
                format: Format::Nifti,
                dims,
                spacing,
                affine: [[0.0; 4]; 4],
                dtype: "float64".into(),
                data: (0..len).map(|_| rng.normal() * 100.0).collect(),
            };
            let (mut fast, mut reference) = (volume.clone(), volume);
            fast.blur_in_plane(sigma);
            blur_by_definition(&mut reference, sigma);
            let bits = |v: &Volume| v.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&reference), "{:?}", fast.dims);
        }
    }
}
