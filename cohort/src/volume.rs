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
        let v = self;
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
                            let j =
                                (i as isize + k as isize - half).clamp(0, n as isize - 1) as usize;
                            acc += w * src[base + j * stride];
                        }
                        v.data[base + i * stride] = acc / total;
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
