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
