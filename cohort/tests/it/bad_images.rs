//! Broken and unsupported images get errors that name the file and say what is wrong.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use fedslm_cohort::{read_image, ImageError};

use crate::imaging;

fn copy_series(to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(imaging().join("series_s0")).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        std::fs::copy(&p, &dst).unwrap();
        files.push(dst);
    }
    files.sort();
    files
}

fn edit(path: &Path, element: DataElement<dicom_object::InMemDicomObject>) {
    let mut obj = dicom_object::open_file(path).unwrap();
    obj.put(element);
    obj.write_to_file(path).unwrap();
}

#[test]
fn a_truncated_nii_gz_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = std::fs::read(imaging().join("example4d.nii.gz")).unwrap();
    let cut = tmp.path().join("cut.nii.gz");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let e = read_image(&cut).unwrap_err();
    assert!(matches!(e, ImageError::Nifti { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("cut.nii.gz: truncated or corrupt NIfTI"),
        "{e}"
    );
    // Positive control: the whole file reads.
    std::fs::write(&cut, &whole).unwrap();
    assert_eq!(read_image(&cut).unwrap().dims, [128, 96, 24, 2]);
}

#[test]
fn a_nifti2_file_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("scan.nii");
    let mut header = vec![0u8; 544];
    header[..4].copy_from_slice(&540i32.to_le_bytes());
    header[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
    std::fs::write(&path, &header).unwrap();
    let e = read_image(&path).unwrap_err();
    assert!(matches!(e, ImageError::Nifti2 { .. }), "{e}");
    assert!(e.to_string().contains("scan.nii is a NIfTI-2 file"), "{e}");
    std::fs::write(&path, b"not an image at all").unwrap();
    assert!(matches!(
        read_image(&path).unwrap_err(),
        ImageError::NotNifti { .. }
    ));
}

#[test]
fn a_folder_with_two_series_names_both() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t2w");
    let files = copy_series(&dir);
    assert_eq!(
        read_image(&dir).unwrap().dims,
        [128, 128, 10],
        "positive control"
    );
    edit(
        &files[3],
        DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.99.2"),
        ),
    );
    let e = read_image(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ImageError::MixedSeries { .. }), "{msg}");
    assert!(
        msg.contains("holds more than one series") && msg.contains("1.2.826.0.1.99.2"),
        "{msg}"
    );
}

#[test]
fn shuffled_names_do_not_change_the_order_and_irregular_spacing_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t2w");
    let files = copy_series(&dir);
    let before = read_image(&dir).unwrap();
    // Renaming files reverses their name order; the volume is the same.
    for (k, f) in files.iter().enumerate() {
        std::fs::rename(f, dir.join(format!("z{:02}", 99 - k))).unwrap();
    }
    assert_eq!(read_image(&dir).unwrap().data, before.data);
    // One slice moved by 10 mm along the normal.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let obj = dicom_object::open_file(&files[0]).unwrap();
    let mut pos = obj
        .element(tags::IMAGE_POSITION_PATIENT)
        .unwrap()
        .to_multi_float64()
        .unwrap();
    pos[2] += 10.0;
    let ds: Vec<String> = pos.iter().map(|v| format!("{v}")).collect();
    edit(
        &files[0],
        DataElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            PrimitiveValue::Strs(ds.into()),
        ),
    );
    let e = read_image(&dir).unwrap_err().to_string();
    assert!(e.contains("irregular slice spacing"), "{e}");
}

#[test]
fn a_file_that_is_not_dicom_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notes.txt");
    std::fs::write(&path, "patient seemed fine").unwrap();
    let e = read_image(&path).unwrap_err().to_string();
    assert!(e.contains("notes.txt: not a readable DICOM file"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(read_image(&empty)
        .unwrap_err()
        .to_string()
        .contains("contains no DICOM file"));
}
