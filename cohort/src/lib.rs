//! A centre's data as it lies on disk: the manifest, clinical coding, NIfTI and DICOM reading, ROI
//! preprocessing, synthetic multi-centre cohorts, partitions and cross-validation folds.
//!
//! Knows nothing of candle: the `model` crate turns cohort samples into tensors. Built by the cohort issues.
