//! The cohort crate's integration tests, as one test binary: manifests, real and broken image files against
//! pydicom and nibabel, preprocessing, the synthetic cohort's files and calibration.

mod bad_images;
mod manifest;
mod preprocess;
mod reference_images;
mod synth_calibration;
mod synth_files;

/// `shared/reference/imaging`: real DICOM and NIfTI files with what pydicom and nibabel read from them.
fn imaging() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("FEDSLM_REFERENCE")).join("imaging")
}
