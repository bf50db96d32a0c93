use std::path::PathBuf;

/// Why an image could not be read. Errors name the file (or folder) and never carry a DICOM identifier such as
/// a patient name: only file names, tags and counts.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is a NIfTI-2 file; fedslm reads NIfTI-1 (.nii, .nii.gz): convert it, e.g. nibabel.Nifti1Image(img.dataobj, img.affine)")]
    Nifti2 { path: PathBuf },
    #[error("{path} is not a NIfTI-1 file: header size {size}, expected 348")]
    NotNifti { path: PathBuf, size: i32 },
    #[error("{path}: truncated or corrupt NIfTI: {reason}")]
    Nifti { path: PathBuf, reason: String },
    #[error("{path}: NIfTI data type {datatype} is not supported (complex and RGB volumes are not images fedslm can use)")]
    NiftiType { path: PathBuf, datatype: String },
    #[error("{path}: not a readable DICOM file: {reason}")]
    Dicom { path: PathBuf, reason: String },
    #[error("{path}: DICOM attribute {attribute} is {problem}")]
    DicomAttribute {
        path: PathBuf,
        attribute: &'static str,
        problem: String,
    },
    #[error("{path}: cannot decode the pixel data ({transfer_syntax}): {reason}")]
    PixelData {
        path: PathBuf,
        transfer_syntax: String,
        reason: String,
    },
    #[error("{folder} holds more than one series: {first} and {second}; put each series in its own folder")]
    MixedSeries {
        folder: PathBuf,
        first: String,
        second: String,
    },
    #[error("{folder}: {reason}")]
    Series { folder: PathBuf, reason: String },
    #[error("{folder} contains no DICOM file")]
    EmptySeries { folder: PathBuf },
}

/// A name on the command line that is none of the ones allowed (a preset, a partition), with the allowed
/// ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnknownName(pub String);
