//! NIfTI-1 files (.nii, .nii.gz) through the `nifti` crate; values and geometry as nibabel reads them.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use nifti::{NiftiHeader, NiftiObject, NiftiType, ReaderOptions};

use crate::error::ImageError;
use crate::volume::{scaled_identity, Format, Volume};

/// The header size at the start of the file, through gzip where the file is compressed.
fn header_size(path: &Path) -> Result<i32, ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut head = [0u8; 4];
    let n = f.read(&mut head).map_err(io)?;
    if n >= 2 && head[..2] == [0x1f, 0x8b] {
        let mut gz = flate2::read::GzDecoder::new(File::open(path).map_err(io)?);
        gz.read_exact(&mut head).map_err(|e| ImageError::Nifti {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    } else if n < 4 {
        return Err(ImageError::Nifti {
            path: path.to_path_buf(),
            reason: format!("{n} bytes long"),
        });
    }
    let le = i32::from_le_bytes(head);
    let be = i32::from_be_bytes(head);
    Ok(if le == 348 || le == 540 { le } else { be })
}

/// Reads a NIfTI-1 file: values with scl_slope/scl_inter applied where the slope is non-zero, spacing from
/// pixdim, affine from the sform, else the qform, else pixdim alone.
pub fn read_nifti(path: &Path) -> Result<Volume, ImageError> {
    match header_size(path)? {
        348 => {}
        540 => {
            return Err(ImageError::Nifti2 {
                path: path.to_path_buf(),
            })
        }
        size => {
            return Err(ImageError::NotNifti {
                path: path.to_path_buf(),
                size,
            })
        }
    }
    let corrupt = |e: nifti::NiftiError| ImageError::Nifti {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let object = ReaderOptions::new().read_file(path).map_err(corrupt)?;
    let header = object.header().clone();
    let ndim = header.dimensionality().map_err(corrupt)?;
    let dims: Vec<usize> = header.dim[1..=ndim]
        .iter()
        .map(|&d| usize::from(d))
        .collect();
    let spacing: Vec<f64> = header.pixdim[1..=ndim]
        .iter()
        .map(|&p| f64::from(p))
        .collect();
    let datatype = header.data_type().map_err(corrupt)?;
    let volume = object.into_volume();
    let raw: Vec<f64> = match datatype {
        NiftiType::Uint8 => widen(volume.into_nifti_typed_data::<u8>(), corrupt)?,
        NiftiType::Int8 => widen(volume.into_nifti_typed_data::<i8>(), corrupt)?,
        NiftiType::Int16 => widen(volume.into_nifti_typed_data::<i16>(), corrupt)?,
        NiftiType::Uint16 => widen(volume.into_nifti_typed_data::<u16>(), corrupt)?,
        NiftiType::Int32 => widen(volume.into_nifti_typed_data::<i32>(), corrupt)?,
        NiftiType::Uint32 => widen(volume.into_nifti_typed_data::<u32>(), corrupt)?,
        NiftiType::Float32 => widen(volume.into_nifti_typed_data::<f32>(), corrupt)?,
        NiftiType::Float64 => volume.into_nifti_typed_data::<f64>().map_err(corrupt)?,
        NiftiType::Int64 => volume
            .into_nifti_typed_data::<i64>()
            .map_err(corrupt)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        NiftiType::Uint64 => volume
            .into_nifti_typed_data::<u64>()
            .map_err(corrupt)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        other => {
            return Err(ImageError::NiftiType {
                path: path.to_path_buf(),
                datatype: format!("{other:?}"),
            })
        }
    };
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if expected != Some(raw.len()) {
        return Err(ImageError::Nifti {
            path: path.to_path_buf(),
            reason: format!("{} voxels for dims {dims:?}", raw.len()),
        });
    }
    // As nibabel: no scaling when the slope is 0 or not finite.
    let (slope, inter) = (f64::from(header.scl_slope), f64::from(header.scl_inter));
    let data = if slope != 0.0 && slope.is_finite() && !(slope == 1.0 && inter == 0.0) {
        let inter = if inter.is_finite() { inter } else { 0.0 };
        raw.into_iter().map(|v| v * slope + inter).collect()
    } else {
        raw
    };
    Ok(Volume {
        format: Format::Nifti,
        affine: affine(&header, &spacing),
        dtype: dtype_name(datatype).to_string(),
        dims,
        spacing,
        data,
    })
}

fn widen<T: Into<f64>>(
    values: Result<Vec<T>, nifti::NiftiError>,
    corrupt: impl Fn(nifti::NiftiError) -> ImageError,
) -> Result<Vec<f64>, ImageError> {
    Ok(values
        .map_err(corrupt)?
        .into_iter()
        .map(Into::into)
        .collect())
}

fn dtype_name(t: NiftiType) -> &'static str {
    match t {
        NiftiType::Uint8 => "uint8",
        NiftiType::Int8 => "int8",
        NiftiType::Int16 => "int16",
        NiftiType::Uint16 => "uint16",
        NiftiType::Int32 => "int32",
        NiftiType::Uint32 => "uint32",
        NiftiType::Int64 => "int64",
        NiftiType::Uint64 => "uint64",
        NiftiType::Float32 => "float32",
        NiftiType::Float64 => "float64",
        _ => "unsupported",
    }
}

/// The voxel-to-RAS affine as the NIfTI-1 standard defines it: method 3 (sform), 2 (qform), or 1 (pixdim).
fn affine(h: &NiftiHeader, spacing: &[f64]) -> [[f64; 4]; 4] {
    let f = |v: f32| f64::from(v);
    if h.sform_code > 0 {
        let row = |r: &[f32; 4]| [f(r[0]), f(r[1]), f(r[2]), f(r[3])];
        return [
            row(&h.srow_x),
            row(&h.srow_y),
            row(&h.srow_z),
            [0.0, 0.0, 0.0, 1.0],
        ];
    }
    if h.qform_code > 0 {
        let (b, c, d) = (f(h.quatern_b), f(h.quatern_c), f(h.quatern_d));
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let (dx, dy, dz) = (f(h.pixdim[1]), f(h.pixdim[2]), qfac * f(h.pixdim[3]));
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let offset = [f(h.quatern_x), f(h.quatern_y), f(h.quatern_z)];
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            m[i] = [r[i][0] * dx, r[i][1] * dy, r[i][2] * dz, offset[i]];
        }
        m[3] = [0.0, 0.0, 0.0, 1.0];
        return m;
    }
    scaled_identity(spacing)
}

/// How [`write_nifti`] stores voxel values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAs {
    /// Rounded to the nearest integer, saturating.
    Int16,
    Uint8,
    Float32,
}

/// Writes a NIfTI-1 single file (`.nii`, or gzip-compressed when the name ends in `.gz`) with the volume's
/// dims, pixdim and affine (as both sform and, where it is a rotation, qform codes "scanner").
pub fn write_nifti(path: &Path, volume: &Volume, store: StoreAs) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (datatype, bitpix): (i16, i16) = match store {
        StoreAs::Int16 => (4, 16),
        StoreAs::Uint8 => (2, 8),
        StoreAs::Float32 => (16, 32),
    };
    let mut h = vec![0u8; 352];
    let put_i16 = |h: &mut [u8], at: usize, v: i16| h[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut [u8], at: usize, v: f32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    put_i16(&mut h, 40, volume.dims.len() as i16);
    for (i, &d) in volume.dims.iter().enumerate().take(7) {
        let d = i16::try_from(d).map_err(|_| ImageError::Nifti {
            path: path.to_path_buf(),
            reason: format!("dimension {d} is too large for NIfTI-1"),
        })?;
        put_i16(&mut h, 42 + 2 * i, d);
    }
    for i in volume.dims.len()..7 {
        put_i16(&mut h, 42 + 2 * i, 1);
    }
    put_i16(&mut h, 70, datatype);
    put_i16(&mut h, 72, bitpix);
    put_f32(&mut h, 76, 1.0); // pixdim[0]: qfac
    for (i, &s) in volume.spacing.iter().enumerate().take(7) {
        put_f32(&mut h, 80 + 4 * i, s as f32);
    }
    put_f32(&mut h, 108, 352.0); // vox_offset
    put_f32(&mut h, 112, 1.0); // scl_slope
    h[123] = 2 | 8; // xyzt_units: mm, s
    put_i16(&mut h, 254, 1); // sform_code: scanner
    for r in 0..3 {
        for c in 0..4 {
            put_f32(&mut h, 280 + 16 * r + 4 * c, volume.affine[r][c] as f32);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    let mut bytes = h;
    bytes.reserve(volume.data.len() * usize::from(bitpix as u16 / 8));
    for &v in &volume.data {
        match store {
            StoreAs::Int16 => {
                bytes.extend_from_slice(&(v.round().clamp(-32768.0, 32767.0) as i16).to_le_bytes())
            }
            StoreAs::Uint8 => bytes.push(v.round().clamp(0.0, 255.0) as u8),
            StoreAs::Float32 => bytes.extend_from_slice(&(v as f32).to_le_bytes()),
        }
    }
    let compressed = path.extension().is_some_and(|e| e == "gz");
    fedslm_files::write_atomic_with(path, fedslm_files::Access::Shared, |w| {
        if compressed {
            let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &bytes)?;
            gz.finish()?;
            Ok(())
        } else {
            std::io::Write::write_all(w, &bytes)
        }
    })
    .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path();
        let mut affine = scaled_identity(&[0.7, 0.8, 3.0]);
        affine[0][3] = -90.0;
        let v = Volume {
            format: Format::Nifti,
            dims: vec![4, 3, 2],
            spacing: vec![0.7, 0.8, 3.0],
            affine,
            dtype: "int16".into(),
            data: (0..24).map(|i| f64::from(i * 100 - 1000)).collect(),
        };
        for (name, store) in [("a.nii.gz", StoreAs::Int16), ("b.nii", StoreAs::Float32)] {
            let path = tmp.join(name);
            write_nifti(&path, &v, store).unwrap();
            let back = read_nifti(&path).unwrap();
            assert_eq!(back.dims, v.dims);
            assert_eq!(back.data, v.data);
            for (a, b) in back.spacing.iter().zip(&v.spacing) {
                assert!((a - b).abs() < 1e-6);
            }
            assert!((back.affine[0][3] + 90.0).abs() < 1e-6);
        }
    }
}
