//! A centre's data as it lies on disk: the manifest, clinical coding, NIfTI and DICOM reading, ROI
//! preprocessing, training-side augmentation of crops, synthetic multi-centre cohorts, partitions and
//! cross-validation folds.
//!
//! Knows nothing of candle: the `model` crate turns cohort samples into tensors.

pub mod augment;
mod cache;
pub mod coding;
mod dicom_file;
mod error;
pub mod manifest;
mod nifti_file;
pub mod partition;
pub mod preprocess;
pub mod summary;
pub mod synth;
mod volume;

pub use augment::{Augmentation, ScannerStyle};
pub use cache::{load_center, LoadError, Source};
pub use coding::{ClinicalCoding, MissingPolicy};
pub use dicom_file::{read_dicom_file, read_dicom_series};
pub use error::{ImageError, UnknownName};
pub use fedslm_protocol::folds::stratified_folds;
pub use fedslm_protocol::rng::{self, Rng};
pub use manifest::{open_cohort, ImagePaths, Manifest, ManifestError, Patient, Sex, Site};
pub use nifti_file::{read_nifti, write_nifti, StoreAs};
pub use partition::{partition, Partitioner};
pub use preprocess::{
    crop_volumes, landmarks, mean_landmarks, preprocess_patient, standardise, IntensityScale,
    PreprocessError, PreprocessSettings, Sample, LANDMARK_PERCENTILES,
};
pub use summary::CohortSummary;
pub use volume::{Format, Stats, Volume};

use std::path::Path;

/// Reads an image whatever its format: a folder is a DICOM series, `.nii`/`.nii.gz` is NIfTI, anything else
/// is tried as a DICOM file.
pub fn read_image(path: &Path) -> Result<Volume, ImageError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if path.is_dir() {
        read_dicom_series(path)
    } else if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        read_nifti(path)
    } else {
        read_dicom_file(path)
    }
}

/// The hash a centre sends in its Hello: its clinical coding and preprocessing settings. Centres whose hashes
/// differ would feed the model different inputs, so the server refuses them.
pub fn settings_hash(coding: &ClinicalCoding, preprocess: &PreprocessSettings) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(coding.settings_hash());
    h.update(preprocess.canonical());
    h.finalize().into()
}
