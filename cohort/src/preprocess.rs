//! From a patient's files to network input (DESIGN.md §5): DWI and ADC brought onto the T2W grid through the
//! affines, the ROI's largest slice and its neighbours, a square crop around the ROI with a margin, resized,
//! optionally mapped onto a standard intensity scale (Nyúl-Udupa), z-scored per sequence within the crop.

use crate::coding::ClinicalCoding;
use crate::error::ImageError;
use crate::manifest::Patient;
use crate::read_image;
use crate::volume::Volume;

/// How crops are made.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessSettings {
    /// Output height and width in pixels.
    pub size: usize,
    /// Slices taken on each side of the ROI's largest slice.
    pub neighbours: usize,
    /// Added on each side of the ROI's bounding box, as a fraction of its longer side.
    pub margin: f64,
    /// Resolution harmonisation: each sequence smoothed in-plane by a Gaussian of this standard deviation
    /// (mm) before cropping, so that scanners' noise and resolution differ less; 0: none.
    pub smooth_mm: f64,
    /// A crop of this fixed side (mm) around the ROI's centre, or the ROI's box with its margin where that is
    /// larger; 0: the ROI's box with its margin. A fixed field of view keeps the tumour's size and its
    /// surroundings in the image, where a box around the ROI scales every tumour to the same size.
    pub fov_mm: f64,
    /// Intensity standardisation (Nyúl-Udupa): each sequence's crop mapped piecewise-linearly from its own
    /// landmarks onto these, before its z-score; `None`: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intensity_scale: Option<IntensityScale>,
}

impl Default for PreprocessSettings {
    fn default() -> PreprocessSettings {
        PreprocessSettings {
            size: 64,
            neighbours: 1,
            margin: 0.25,
            smooth_mm: 0.0,
            fov_mm: 0.0,
            intensity_scale: None,
        }
    }
}

impl PreprocessSettings {
    pub fn slices(&self) -> usize {
        2 * self.neighbours + 1
    }

    /// Channels of a sample: T2W, DWI and ADC, each over the chosen slices.
    pub fn channels(&self) -> usize {
        3 * self.slices()
    }

    /// A fixed text form, hashed with the clinical coding into the settings hash centres must share.
    pub fn canonical(&self) -> String {
        let mut text = format!(
            "fedslm-preprocess/1\nsize={}\nneighbours={}\nmargin={:?}\n",
            self.size, self.neighbours, self.margin
        );
        // Written only when set, so that the hash of settings without it is what it always was.
        if self.smooth_mm > 0.0 {
            text += &format!("smooth_mm={:?}\n", self.smooth_mm);
        }
        if self.fov_mm > 0.0 {
            text += &format!("fov_mm={:?}\n", self.fov_mm);
        }
        if let Some(scale) = &self.intensity_scale {
            for (name, l) in IntensityScale::SEQUENCES.iter().zip(scale.sequences()) {
                text += &format!("intensity_scale.{name}={l:?}\n");
            }
        }
        text
    }

    /// Why these settings cannot make crops, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("preprocess.size must be at least 1".into());
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(format!(
                "preprocess.margin {} must be 0 or more",
                self.margin
            ));
        }
        for (name, v) in [("smooth_mm", self.smooth_mm), ("fov_mm", self.fov_mm)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("preprocess.{name} {v} must be 0 or more"));
            }
        }
        match &self.intensity_scale {
            Some(scale) => scale.check(),
            None => Ok(()),
        }
    }
}

/// The percentiles that are an image's landmarks in intensity standardisation: Nyúl, Udupa and Zhang (IEEE
/// TMI 2000), with the deciles as landmarks and the 1st and 99th percentiles as the ends of the range.
pub const LANDMARK_PERCENTILES: [f64; 11] = [
    1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0,
];

/// A standard intensity scale: for each sequence, where its landmarks ([`LANDMARK_PERCENTILES`]) go, from 0
/// (the 1st percentile) to 1 (the 99th), strictly increasing. The mean of images' [`landmarks`] is one (the
/// scale learned from training images, in Nyúl-Udupa's method).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensityScale {
    pub t2w: [f64; 11],
    pub dwi: [f64; 11],
    pub adc: [f64; 11],
}

impl IntensityScale {
    /// The sequences in crop order.
    pub const SEQUENCES: [&'static str; 3] = fedslm_protocol::landmarks::SEQUENCES;

    pub fn sequences(&self) -> [&[f64; 11]; 3] {
        [&self.t2w, &self.dwi, &self.adc]
    }

    /// Each sequence's scale runs from 0 to 1 and strictly increases.
    pub fn check(&self) -> Result<(), String> {
        for (name, l) in Self::SEQUENCES.iter().zip(self.sequences()) {
            let ends = l[0] == 0.0 && l[10] == 1.0;
            let increasing = l.windows(2).all(|w| w[0] < w[1]);
            if !ends || !increasing || l.iter().any(|v| !v.is_finite()) {
                return Err(format!(
                    "preprocess.intensity_scale.{name} {l:?} must run from 0 to 1, strictly increasing"
                ));
            }
        }
        Ok(())
    }
}

/// An image's landmarks ([`LANDMARK_PERCENTILES`], linear interpolation between order statistics, as
/// numpy's default), in raw intensities.
pub fn raw_landmarks(values: &[f32]) -> [f64; 11] {
    let mut v: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(f64::total_cmp);
    let last = v.len().saturating_sub(1);
    LANDMARK_PERCENTILES.map(|q| {
        if v.is_empty() {
            return 0.0;
        }
        let pos = q / 100.0 * last as f64;
        let i = (pos.floor() as usize).min(last);
        let j = (i + 1).min(last);
        v[i] + (v[j] - v[i]) * (pos - i as f64)
    })
}

/// An image's landmarks on its own 0-1 range: the 1st percentile at 0, the 99th at 1 (all 0 where they are
/// equal). Unchanged by any increasing linear map of the values, so a crop's z-scored values give the
/// landmarks of its raw ones.
pub fn landmarks(values: &[f32]) -> [f64; 11] {
    let l = raw_landmarks(values);
    let span = l[10] - l[0];
    if span <= 0.0 {
        return [0.0; 11];
    }
    l.map(|x| (x - l[0]) / span)
}

/// The mean [`landmarks`] of T2W, DWI and ADC over `samples` (their crops' channels in that order, as
/// [`crop_volumes`] makes them), and how many images that mean is over: a sample with a flat sequence (no
/// landmarks) is left out. What a centre contributes to the consortium's standard scale.
pub fn mean_landmarks(samples: &[Sample]) -> (fedslm_protocol::landmarks::SequenceLandmarks, u64) {
    let mut sum = [[0.0; 11]; 3];
    let mut images = 0u64;
    for s in samples {
        let per = s.image.len() / 3;
        if per == 0 || s.channels % 3 != 0 {
            continue;
        }
        let l: Vec<[f64; 11]> = s.image.chunks_exact(per).map(landmarks).collect();
        if l.iter().any(|l| l[10] != 1.0) {
            continue;
        }
        for (acc, l) in sum.iter_mut().zip(&l) {
            for (a, v) in acc.iter_mut().zip(l) {
                *a += v;
            }
        }
        images += 1;
    }
    if images > 0 {
        for v in sum.iter_mut().flatten() {
            *v /= images as f64;
        }
    }
    (sum, images)
}

/// Maps `values` piecewise-linearly from their own landmarks onto `standard`, the end segments extended
/// beyond the 1st and 99th percentiles. A segment of equal landmarks (a flat histogram part) maps to its
/// lower standard landmark.
pub fn standardise(values: &mut [f32], standard: &[f64; 11]) {
    let l = raw_landmarks(values);
    for v in values.iter_mut() {
        let x = f64::from(*v);
        let k = (0..9).find(|&k| x <= l[k + 1]).unwrap_or(9);
        let (a, b) = (l[k], l[k + 1]);
        let y = if b > a {
            standard[k] + (x - a) / (b - a) * (standard[k + 1] - standard[k])
        } else {
            standard[k]
        };
        *v = y as f32;
    }
}

/// One patient as the networks see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub patient_id: String,
    pub center: String,
    /// Channels × size × size, channel-major: T2W slices, then DWI, then ADC.
    pub image: Vec<f32>,
    pub channels: usize,
    pub size: usize,
    /// The coded clinical factors ([`ClinicalCoding::FEATURES`]), before standardisation.
    pub clinical: Vec<f32>,
    pub label: Option<bool>,
}

/// Why a patient cannot be preprocessed; every variant names the patient.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("patient {patient}: {source}")]
    Image { patient: String, source: ImageError },
    #[error("patient {patient} has no {column} image; image models need T2W, DWI, ADC and ROI")]
    MissingImage {
        patient: String,
        column: &'static str,
    },
    #[error("patient {patient}: the ROI ({roi}) is empty")]
    EmptyRoi { patient: String, roi: String },
    #[error("patient {patient}: {what}")]
    Geometry { patient: String, what: String },
}

/// The inverse of an affine's 3×3 part and translation.
fn invert(a: &[[f64; 4]; 4]) -> Option<[[f64; 4]; 4]> {
    let m = |r: usize, c: usize| a[r][c];
    let det = m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1))
        - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0));
    if det.abs() < 1e-12 {
        return None;
    }
    let mut inv = [[0.0; 4]; 4];
    for (r, row) in inv.iter_mut().take(3).enumerate() {
        for (c, cell) in row.iter_mut().take(3).enumerate() {
            // The adjugate: the cofactor of (c, r), signed by the cyclic index order.
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            *cell = (m(r1, c1) * m(r2, c2) - m(r1, c2) * m(r2, c1)) / det;
        }
        row[3] = -(0..3).map(|c| row[c] * a[c][3]).sum::<f64>();
    }
    inv[3][3] = 1.0;
    Some(inv)
}

fn apply(a: &[[f64; 4]; 4], p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (r, o) in out.iter_mut().enumerate() {
        *o = a[r][0] * p[0] + a[r][1] * p[1] + a[r][2] * p[2] + a[r][3];
    }
    out
}

fn same_geometry(a: &Volume, b: &Volume) -> bool {
    a.dims[..3] == b.dims[..3]
        && a.affine
            .iter()
            .flatten()
            .zip(b.affine.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= 1e-3 * x.abs().max(y.abs()).max(1.0))
}

/// Trilinear interpolation at voxel coordinates, clamped to the volume (edges are extended).
fn trilinear(v: &Volume, p: [f64; 3]) -> f64 {
    let (nx, ny, nz) = (v.dims[0], v.dims[1], v.dims[2]);
    let at = |x: usize, y: usize, z: usize| v.data[x + nx * (y + ny * z)];
    let axis = |c: f64, n: usize| {
        let c = c.clamp(0.0, (n - 1) as f64);
        let i = (c.floor() as usize).min(n.saturating_sub(2));
        let f = if n > 1 { c - i as f64 } else { 0.0 };
        (i, (i + 1).min(n - 1), f)
    };
    let (x0, x1, fx) = axis(p[0], nx);
    let (y0, y1, fy) = axis(p[1], ny);
    let (z0, z1, fz) = axis(p[2], nz);
    let lerp = |a: f64, b: f64, t: f64| a + (b - a) * t;
    let plane = |z| {
        lerp(
            lerp(at(x0, y0, z), at(x1, y0, z), fx),
            lerp(at(x0, y1, z), at(x1, y1, z), fx),
            fy,
        )
    };
    lerp(plane(z0), plane(z1), fz)
}

/// Preprocesses one patient of `center`.
pub fn preprocess_patient(
    patient: &Patient,
    center: &str,
    coding: &ClinicalCoding,
    settings: &PreprocessSettings,
) -> Result<Sample, PreprocessError> {
    let id = || patient.id.clone();
    let load = |column: &'static str| -> Result<Volume, PreprocessError> {
        let path = patient
            .images
            .get(column)
            .ok_or_else(|| PreprocessError::MissingImage {
                patient: id(),
                column,
            })?;
        let v = read_image(path).map_err(|source| PreprocessError::Image {
            patient: id(),
            source,
        })?;
        if v.dims.len() != 3 && !(v.dims.len() == 4 && v.dims[3] == 1) {
            return Err(PreprocessError::Geometry {
                patient: id(),
                what: format!(
                    "{column} image {} has dims {:?}; a 3-D volume is needed",
                    path.display(),
                    v.dims
                ),
            });
        }
        Ok(v)
    };
    let (t2w, dwi, adc, roi) = (load("t2w")?, load("dwi")?, load("adc")?, load("roi")?);
    let roi_path = patient
        .images
        .roi
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let image = crop_volumes(&patient.id, &roi_path, [&t2w, &dwi, &adc], &roi, settings)?;
    Ok(Sample {
        patient_id: patient.id.clone(),
        center: center.to_string(),
        image,
        channels: settings.channels(),
        size: settings.size,
        clinical: coding.encode(patient).iter().map(|&v| v as f32).collect(),
        label: patient.slm,
    })
}

/// The network input from volumes already in memory: `sequences` are T2W, DWI and ADC; `roi` lies on the T2W
/// grid. `patient` and `roi_name` only name things in errors.
pub fn crop_volumes(
    patient: &str,
    roi_name: &str,
    sequences: [&Volume; 3],
    roi: &Volume,
    settings: &PreprocessSettings,
) -> Result<Vec<f32>, PreprocessError> {
    let id = || patient.to_string();
    let [t2w, dwi, adc] = sequences;
    for (name, v) in [("T2W", t2w), ("DWI", dwi), ("ADC", adc), ("ROI", roi)] {
        let voxels = v
            .dims
            .get(..3)
            .and_then(|d| d.iter().try_fold(1usize, |n, &x| n.checked_mul(x)));
        if voxels.is_none_or(|n| n == 0 || v.data.len() < n) {
            return Err(PreprocessError::Geometry {
                patient: id(),
                what: format!(
                    "the {name} image has dims {:?}; a non-empty 3-D volume is needed",
                    v.dims
                ),
            });
        }
    }
    if !same_geometry(t2w, roi) {
        return Err(PreprocessError::Geometry {
            patient: id(),
            what: format!(
                "the ROI must lie on the T2W grid: ROI dims {:?}, T2W dims {:?}, or their affines differ",
                roi.dims, t2w.dims
            ),
        });
    }
    let smoothed: Option<[Volume; 3]> = (settings.smooth_mm > 0.0).then(|| {
        [t2w, dwi, adc].map(|v| {
            let mut v = v.clone();
            v.blur_in_plane(settings.smooth_mm);
            v
        })
    });
    let [t2w, dwi, adc] = match &smoothed {
        Some([a, b, c]) => [a, b, c],
        None => [t2w, dwi, adc],
    };
    let (nx, ny, nz) = (t2w.dims[0], t2w.dims[1], t2w.dims[2]);
    let in_roi = |x: usize, y: usize, z: usize| roi.data[x + nx * (y + ny * z)] > 0.5;
    let per_slice: Vec<usize> = (0..nz)
        .map(|z| {
            (0..ny)
                .flat_map(|y| (0..nx).map(move |x| (x, y)))
                .filter(|&(x, y)| in_roi(x, y, z))
                .count()
        })
        .collect();
    let largest = (0..nz)
        .max_by_key(|&z| (per_slice[z], std::cmp::Reverse(z)))
        .unwrap_or(0);
    if per_slice[largest] == 0 {
        return Err(PreprocessError::EmptyRoi {
            patient: id(),
            roi: roi_name.to_string(),
        });
    }
    let n = settings.neighbours as isize;
    let slices: Vec<usize> = (-n..=n)
        .map(|d| (largest as isize + d).clamp(0, nz as isize - 1) as usize)
        .collect();
    // Bounding box of the ROI over the chosen slices.
    let (mut x0, mut x1, mut y0, mut y1) = (nx, 0, ny, 0);
    for &z in &slices {
        for y in 0..ny {
            for x in 0..nx {
                if in_roi(x, y, z) {
                    (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
                }
            }
        }
    }
    let (sx, sy) = (
        t2w.spacing[0].abs().max(1e-6),
        t2w.spacing[1].abs().max(1e-6),
    );
    let side_mm = (((x1 - x0 + 1) as f64 * sx).max((y1 - y0 + 1) as f64 * sy)
        * (1.0 + 2.0 * settings.margin))
        .max(settings.fov_mm);
    let (cx, cy) = ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0);
    let size = settings.size;
    let grid = |u: usize| ((u as f64 + 0.5) / size as f64 - 0.5) * side_mm;
    let to_world = t2w.affine;
    let mut image = Vec::with_capacity(settings.channels() * size * size);
    for (sequence, seq) in [t2w, dwi, adc].into_iter().enumerate() {
        let to_voxel = if same_geometry(seq, t2w) {
            None
        } else {
            Some(
                invert(&seq.affine).ok_or_else(|| PreprocessError::Geometry {
                    patient: id(),
                    what: "an image's affine is singular".into(),
                })?,
            )
        };
        let start = image.len();
        for &z in &slices {
            for v in 0..size {
                for u in 0..size {
                    let p = [cx + grid(u) / sx, cy + grid(v) / sy, z as f64];
                    let q = match &to_voxel {
                        None => p,
                        Some(inv) => apply(inv, apply(&to_world, p)),
                    };
                    image.push(trilinear(seq, q) as f32);
                }
            }
        }
        if let Some(scale) = &settings.intensity_scale {
            standardise(&mut image[start..], scale.sequences()[sequence]);
        }
        z_score(&mut image[start..]);
    }
    Ok(image)
}

/// Mean 0 and standard deviation 1 over `values` (a sequence's crop; augmentation leaves it so again), in
/// f64.
pub(crate) fn z_score(values: &mut [f32]) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let sd = var.sqrt().max(1e-6);
    for v in values.iter_mut() {
        *v = ((f64::from(*v) - mean) / sd) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landmarks_are_numpy_s_linear_percentiles_and_ignore_a_linear_rescaling() {
        // 0..=100 shuffled: each percentile is its own value.
        let values: Vec<f32> = (0..=100).map(|i| ((i * 37) % 101) as f32).collect();
        assert_eq!(raw_landmarks(&values), LANDMARK_PERCENTILES);
        // Between two values the percentiles interpolate (numpy.percentile's default).
        let two = raw_landmarks(&[10.0, 0.0]);
        for (got, q) in two.iter().zip(LANDMARK_PERCENTILES) {
            assert!((got - q / 10.0).abs() < 1e-12, "{two:?}");
        }
        let rescaled: Vec<f32> = values.iter().map(|v| 3.0 * v - 40.0).collect();
        let (a, b) = (landmarks(&values), landmarks(&rescaled));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} {b:?}");
        }
        assert_eq!((a[0], a[10]), (0.0, 1.0));
        // A flat image has no range: every landmark 0, nothing divided by zero.
        assert_eq!(landmarks(&[4.0; 9]), [0.0; 11]);
    }

    #[test]
    fn standardising_puts_the_image_s_landmarks_on_the_scale_and_keeps_the_order() {
        let mut values: Vec<f32> = (0..1000).map(|i| (i as f32 / 100.0).exp()).collect();
        let scale = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8, 0.9, 1.0];
        standardise(&mut values, &scale);
        let l = raw_landmarks(&values);
        for (got, want) in l.iter().zip(scale) {
            // f32 values, and percentiles that fall between two of them on either side of a landmark.
            assert!((got - want).abs() < 1e-3, "{l:?}");
        }
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "order kept");
        // Beyond the 1st and 99th percentiles the end segments go on.
        assert!(values[0] < 0.0 && values[999] > 1.0);
        // A flat image maps to the scale's first landmark.
        let mut flat = [7.0f32; 5];
        standardise(&mut flat, &scale);
        assert_eq!(flat, [0.0; 5]);
        let bad = IntensityScale {
            t2w: scale,
            dwi: [0.0, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
            adc: scale,
        };
        assert!(bad.check().unwrap_err().contains("intensity_scale.dwi"));
    }
}
