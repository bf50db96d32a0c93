//! DICOM through dicom-rs: single files, multi-frame files and series folders, with values as pydicom reads
//! them (sign-extended from BitsStored, RescaleSlope/Intercept applied in f64).
//!
//! Nothing read here reaches a log or an error except file names, tags, UIDs of series and counts: patient
//! names and other identifiers stay in the files.

use std::path::{Path, PathBuf};

use dicom_core::header::HasLength;
use dicom_dictionary_std::tags;
use dicom_object::{open_file, DefaultDicomObject};
use dicom_pixeldata::{DecodedPixelData, PixelDecoder, PixelRepresentation};

use crate::error::ImageError;
use crate::volume::{scaled_identity, Format, Volume};

/// Slices whose spacing differs from the mean by more than this (relative) make an irregular series.
const SPACING_TOLERANCE: f64 = 1e-3;

fn open(path: &Path) -> Result<DefaultDicomObject, ImageError> {
    open_file(path).map_err(|e| ImageError::Dicom {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A numeric attribute; absent and empty are the same (many files carry empty type-2 attributes).
fn floats(
    obj: &DefaultDicomObject,
    tag: dicom_core::Tag,
    name: &'static str,
    path: &Path,
) -> Result<Option<Vec<f64>>, ImageError> {
    match obj.element_opt(tag) {
        Ok(Some(e))
            if e.value().is_empty()
                || e.to_str()
                    .is_ok_and(|s| s.trim_matches(['\0', ' ']).is_empty()) =>
        {
            Ok(None)
        }
        Ok(Some(e)) => e
            .to_multi_float64()
            .map(Some)
            .map_err(|err| ImageError::DicomAttribute {
                path: path.to_path_buf(),
                attribute: name,
                problem: format!("not numeric: {err}"),
            }),
        _ => Ok(None),
    }
}

fn text(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

/// Decoded samples of one file, before rescaling, with their layout.
struct Pixels {
    columns: usize,
    rows: usize,
    frames: usize,
    dtype: &'static str,
    /// Stored values, frame by frame, row by row.
    values: Vec<f64>,
    /// (slope, intercept) per frame.
    rescale: Vec<(f64, f64)>,
}

/// A transfer syntax's name, for errors.
fn transfer_syntax_name(uid: &str) -> String {
    let name = match uid {
        "1.2.840.10008.1.2" => "Implicit VR Little Endian",
        "1.2.840.10008.1.2.1" => "Explicit VR Little Endian",
        "1.2.840.10008.1.2.1.99" => "Deflated Explicit VR Little Endian",
        "1.2.840.10008.1.2.2" => "Explicit VR Big Endian",
        "1.2.840.10008.1.2.5" => "RLE Lossless",
        "1.2.840.10008.1.2.4.50" => "JPEG Baseline",
        "1.2.840.10008.1.2.4.51" => "JPEG Extended (12-bit)",
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => "JPEG Lossless",
        "1.2.840.10008.1.2.4.80" => "JPEG-LS Lossless",
        "1.2.840.10008.1.2.4.81" => "JPEG-LS Near-Lossless",
        "1.2.840.10008.1.2.4.90" => "JPEG 2000 Lossless",
        "1.2.840.10008.1.2.4.91" => "JPEG 2000",
        _ => return uid.to_string(),
    };
    format!("{name}, {uid}")
}

fn decode(obj: &DefaultDicomObject, path: &Path) -> Result<Pixels, ImageError> {
    let uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    let pixel_error = |reason: String| ImageError::PixelData {
        path: path.to_path_buf(),
        transfer_syntax: transfer_syntax_name(&uid),
        reason,
    };
    let decoded: DecodedPixelData = obj.decode_pixel_data().map_err(|e| {
        let jpeg_ls = uid.starts_with("1.2.840.10008.1.2.4.8");
        pixel_error(if jpeg_ls && !cfg!(feature = "jpeg-ls") {
            "JPEG-LS needs fedslm built with the jpeg-ls feature (CharLS, built with cmake)".into()
        } else {
            e.to_string()
        })
    })?;
    if decoded.samples_per_pixel() != 1 {
        return Err(ImageError::DicomAttribute {
            path: path.to_path_buf(),
            attribute: "SamplesPerPixel",
            problem: format!(
                "{}; only greyscale images are supported",
                decoded.samples_per_pixel()
            ),
        });
    }
    let (columns, rows, frames) = (
        decoded.columns() as usize,
        decoded.rows() as usize,
        decoded.number_of_frames() as usize,
    );
    let allocated = decoded.bits_allocated();
    let stored = u32::from(decoded.bits_stored()).clamp(1, u32::from(allocated.max(1)));
    let signed = decoded.pixel_representation() == PixelRepresentation::Signed;
    let count = columns * rows * frames;
    let unpacked;
    let (bytes, width) = if allocated == 1 {
        // Binary images (segmentations): one byte per sample, or packed eight to a byte, least significant first.
        let data = decoded.data();
        if data.len() >= count {
            (data, 1)
        } else {
            unpacked = (0..count)
                .map(|i| data.get(i / 8).map_or(0, |b| (b >> (i % 8)) & 1))
                .collect::<Vec<u8>>();
            (&unpacked[..], 1)
        }
    } else {
        (decoded.data(), usize::from(allocated / 8))
    };
    if !matches!(allocated, 1 | 8 | 16 | 32) || bytes.len() < count * width {
        return Err(pixel_error(format!(
            "{} bytes for {count} samples of {allocated} bits",
            bytes.len()
        )));
    }
    let big_endian = uid == "1.2.840.10008.1.2.2";
    // dicom-rs's to_vec refuses 32-bit samples, so the decoded bytes are converted here for every width.
    let mask: u64 = (1u64 << stored) - 1;
    let values = bytes[..count * width]
        .chunks_exact(width)
        .map(|c| {
            let raw = match width {
                1 => u64::from(c[0]),
                2 => u64::from(u16::from_le_bytes([c[0], c[1]])),
                // From big-endian files dicom-rs hands over pixel data swapped as 16-bit words: a 32-bit
                // sample arrives as its high word, then its low word, each little-endian.
                _ if big_endian => u64::from(u32::from_be_bytes([c[1], c[0], c[3], c[2]])),
                _ => u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            } & mask;
            if signed && raw >> (stored - 1) & 1 == 1 {
                (raw as i64 - (1i64 << stored)) as f64
            } else {
                raw as f64
            }
        })
        .collect();
    let rescale: Vec<(f64, f64)> = decoded
        .rescale()
        .map(|r| r.iter().map(|r| (r.slope, r.intercept)).collect())
        .unwrap_or_default();
    let rescale = if rescale.is_empty() {
        vec![(1.0, 0.0)]
    } else {
        rescale
    };
    let dtype = match (allocated, signed) {
        (1, _) => "bool",
        (8, false) => "uint8",
        (8, true) => "int8",
        (16, false) => "uint16",
        (16, true) => "int16",
        (_, false) => "uint32",
        (_, true) => "int32",
    };
    Ok(Pixels {
        columns,
        rows,
        frames,
        dtype,
        values,
        rescale,
    })
}

fn rescaled(p: &Pixels) -> Vec<f64> {
    let per_frame = p.columns * p.rows;
    p.values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (slope, intercept) = p.rescale[(i / per_frame).min(p.rescale.len() - 1)];
            v * slope + intercept
        })
        .collect()
}

/// Voxel (column, row, slice) to LPS from orientation, position and spacings, converted to RAS.
fn affine(
    orientation: &[f64],
    position: &[f64],
    col_spacing: f64,
    row_spacing: f64,
    slice: [f64; 3],
) -> [[f64; 4]; 4] {
    let (r, c) = (&orientation[0..3], &orientation[3..6]);
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        // LPS to RAS flips x and y.
        let sign = if i < 2 { -1.0 } else { 1.0 };
        m[i] = [
            sign * r[i] * col_spacing,
            sign * c[i] * row_spacing,
            sign * slice[i],
            sign * position[i],
        ];
    }
    m[3] = [0.0, 0.0, 0.0, 1.0];
    m
}

fn cross(a: &[f64], b: &[f64]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// A single DICOM file, single- or multi-frame: dims [Columns, Rows, frames].
pub fn read_dicom_file(path: &Path) -> Result<Volume, ImageError> {
    let obj = open(path)?;
    let pixels = decode(&obj, path)?;
    // PixelSpacing is (row spacing, column spacing); spacing here is (x = column, y = row).
    let in_plane =
        floats(&obj, tags::PIXEL_SPACING, "PixelSpacing", path)?.filter(|v| v.len() == 2);
    let thickness = floats(&obj, tags::SLICE_THICKNESS, "SliceThickness", path)?
        .and_then(|v| v.first().copied());
    let spacing: Vec<f64> = match &in_plane {
        Some(ps) => std::iter::once(ps[1])
            .chain(std::iter::once(ps[0]))
            .chain(thickness)
            .collect(),
        None => Vec::new(),
    };
    let orientation = floats(
        &obj,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        path,
    )?
    .filter(|v| v.len() == 6);
    let position = floats(
        &obj,
        tags::IMAGE_POSITION_PATIENT,
        "ImagePositionPatient",
        path,
    )?
    .filter(|v| v.len() == 3);
    let affine = match (&orientation, &position, &in_plane) {
        (Some(o), Some(p), Some(ps)) => {
            let n = cross(&o[0..3], &o[3..6]);
            let t = thickness.unwrap_or(1.0);
            affine(o, p, ps[1], ps[0], [n[0] * t, n[1] * t, n[2] * t])
        }
        _ => scaled_identity(&spacing),
    };
    Ok(Volume {
        format: Format::Dicom,
        dims: vec![pixels.columns, pixels.rows, pixels.frames],
        spacing,
        affine,
        dtype: pixels.dtype.to_string(),
        data: rescaled(&pixels),
    })
}

struct Slice {
    path: PathBuf,
    obj: DefaultDicomObject,
    position: [f64; 3],
    along_normal: f64,
}

/// A folder holding one series, one slice per file: slices ordered by ImagePositionPatient projected on the
/// normal of ImageOrientationPatient (instance numbers and file names are not trusted), z spacing from the
/// positions; an irregular spacing, a second series or a multi-frame file is an error.
pub fn read_dicom_series(folder: &Path) -> Result<Volume, ImageError> {
    let series_err = |reason: String| ImageError::Series {
        folder: folder.to_path_buf(),
        reason,
    };
    let entries = std::fs::read_dir(folder).map_err(|source| ImageError::Io {
        path: folder.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ImageError::Io {
            path: folder.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.path().is_file() && !name.starts_with('.') && name != "DICOMDIR" {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ImageError::EmptySeries {
            folder: folder.to_path_buf(),
        });
    }
    let mut series_uid: Option<(String, PathBuf)> = None;
    let mut orientation: Option<Vec<f64>> = None;
    let mut slices = Vec::with_capacity(files.len());
    for path in files {
        let obj = open(&path)?;
        let uid = text(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default();
        match &series_uid {
            None => series_uid = Some((uid, path.clone())),
            Some((first, _)) if *first != uid => {
                return Err(ImageError::MixedSeries {
                    folder: folder.to_path_buf(),
                    first: first.clone(),
                    second: uid,
                })
            }
            Some(_) => {}
        }
        let o = floats(
            &obj,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
            &path,
        )?
        .filter(|v| v.len() == 6)
        .ok_or_else(|| ImageError::DicomAttribute {
            path: path.clone(),
            attribute: "ImageOrientationPatient",
            problem: "missing; a series needs it to order its slices".into(),
        })?;
        match &orientation {
            None => orientation = Some(o),
            Some(first) if first.iter().zip(&o).any(|(a, b)| (a - b).abs() > 1e-4) => {
                return Err(series_err(format!(
                    "{} is oriented {o:?}, other slices {first:?}",
                    path.display()
                )))
            }
            Some(_) => {}
        }
        let p = floats(
            &obj,
            tags::IMAGE_POSITION_PATIENT,
            "ImagePositionPatient",
            &path,
        )?
        .filter(|v| v.len() == 3)
        .ok_or_else(|| ImageError::DicomAttribute {
            path: path.clone(),
            attribute: "ImagePositionPatient",
            problem: "missing; a series needs it to order its slices".into(),
        })?;
        slices.push(Slice {
            path,
            obj,
            position: [p[0], p[1], p[2]],
            along_normal: 0.0,
        });
    }
    let orientation = orientation.unwrap_or_default();
    let normal = cross(&orientation[0..3], &orientation[3..6]);
    for s in &mut slices {
        s.along_normal = s.position.iter().zip(&normal).map(|(a, b)| a * b).sum();
    }
    slices.sort_by(|a, b| a.along_normal.total_cmp(&b.along_normal));
    let gaps: Vec<f64> = slices
        .windows(2)
        .map(|w| w[1].along_normal - w[0].along_normal)
        .collect();
    if let Some(k) = gaps.iter().position(|g| g.abs() < 1e-6) {
        return Err(series_err(format!(
            "{} and {} lie at the same position",
            slices[k].path.display(),
            slices[k + 1].path.display()
        )));
    }
    let z = if gaps.is_empty() {
        floats(
            &slices[0].obj,
            tags::SLICE_THICKNESS,
            "SliceThickness",
            &slices[0].path,
        )?
        .and_then(|v| v.first().copied())
        .unwrap_or(1.0)
    } else {
        // The median gap: positions are decimal strings rounded to a few digits, and the median keeps the
        // spacing the scanner set where the mean would average in the rounding.
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    if let Some(g) = gaps
        .iter()
        .find(|g| (**g - z).abs() > SPACING_TOLERANCE * z.abs())
    {
        return Err(series_err(format!(
            "irregular slice spacing: a gap of {g} mm where the others are {z} mm along the slice normal"
        )));
    }
    let first = &slices[0];
    let in_plane = floats(&first.obj, tags::PIXEL_SPACING, "PixelSpacing", &first.path)?
        .filter(|v| v.len() == 2)
        .ok_or_else(|| ImageError::DicomAttribute {
            path: first.path.clone(),
            attribute: "PixelSpacing",
            problem: "missing".into(),
        })?;
    let mut data = Vec::new();
    let (mut columns, mut rows, mut dtype) = (0, 0, "");
    for (k, s) in slices.iter().enumerate() {
        let p = decode(&s.obj, &s.path)?;
        if p.frames != 1 {
            return Err(series_err(format!(
                "{} has {} frames; a series holds one slice per file",
                s.path.display(),
                p.frames
            )));
        }
        if k == 0 {
            (columns, rows, dtype) = (p.columns, p.rows, p.dtype);
        } else if (p.columns, p.rows) != (columns, rows) {
            return Err(series_err(format!(
                "{} is {}x{}, other slices {columns}x{rows}",
                s.path.display(),
                p.columns,
                p.rows
            )));
        }
        data.extend(rescaled(&p));
    }
    let n = [normal[0] * z, normal[1] * z, normal[2] * z];
    Ok(Volume {
        format: Format::DicomSeries,
        dims: vec![columns, rows, slices.len()],
        spacing: vec![in_plane[1], in_plane[0], z],
        affine: affine(&orientation, &first.position, in_plane[1], in_plane[0], n),
        dtype: dtype.to_string(),
        data,
    })
}
