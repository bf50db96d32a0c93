//! Preprocessed samples of a centre, loaded in parallel and cached on disk: a second run does not decode
//! again. The cache key hashes the settings and every input file's content, so any change to either misses.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::coding::ClinicalCoding;
use crate::manifest::{ImagePaths, Manifest};
use crate::preprocess::{preprocess_patient, PreprocessError, PreprocessSettings, Sample};

const MAGIC: &[u8; 8] = b"FSLMSMP1";

/// Where the samples came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Decoded,
    Cache(PathBuf),
}

/// Why a centre could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cache key: settings, coding, and each patient's row and files by content.
fn key(
    manifest: &Manifest,
    center: &str,
    coding: &ClinicalCoding,
    settings: &PreprocessSettings,
) -> Result<String, LoadError> {
    let mut h = Sha256::new();
    h.update(settings.canonical());
    h.update(coding.settings_hash());
    h.update(center);
    for p in &manifest.patients {
        h.update(format!(
            "\n{}|{:?}|{:?}|{:?}|{:?}|{:?}",
            p.id, p.slm, p.sex, p.site, p.cea, p.ca199
        ));
        for column in ImagePaths::COLUMNS {
            if let Some(path) = p.images.get(column) {
                hash_path(&mut h, path)?;
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn hash_path(h: &mut Sha256, path: &Path) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            hash_path(h, f)?;
        }
        return Ok(());
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(())
}

/// Preprocesses every patient of a manifest, in parallel, through the cache in `cache_dir` when given.
pub fn load_center(
    manifest: &Manifest,
    center: &str,
    coding: &ClinicalCoding,
    settings: &PreprocessSettings,
    cache_dir: Option<&Path>,
) -> Result<(Vec<Sample>, Source), LoadError> {
    let cache_path = match cache_dir {
        Some(dir) => Some(dir.join(format!(
            "{center}-{}.samples",
            &key(manifest, center, coding, settings)?[..32]
        ))),
        None => None,
    };
    if let Some(path) = &cache_path {
        if let Some(samples) = read_cache(path, manifest.patients.len()) {
            return Ok((samples, Source::Cache(path.clone())));
        }
    }
    let samples: Vec<Sample> = manifest
        .patients
        .par_iter()
        .map(|p| preprocess_patient(p, center, coding, settings))
        .collect::<Result<_, _>>()?;
    if let Some(path) = &cache_path {
        // A cache that cannot be written costs time, not correctness.
        if let Err(e) = write_cache(path, &samples) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the preprocessing cache");
        }
    }
    Ok((samples, Source::Decoded))
}

fn write_cache(path: &Path, samples: &[Sample]) -> std::io::Result<()> {
    fedslm_files::write_atomic_with(path, fedslm_files::Access::Shared, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&(samples.len() as u64).to_le_bytes())?;
        for s in samples {
            for text in [&s.patient_id, &s.center] {
                w.write_all(&(text.len() as u32).to_le_bytes())?;
                w.write_all(text.as_bytes())?;
            }
            w.write_all(&[match s.label {
                Some(false) => 0,
                Some(true) => 1,
                None => 2,
            }])?;
            for n in [s.channels, s.size, s.clinical.len()] {
                w.write_all(&(n as u32).to_le_bytes())?;
            }
            for v in s.clinical.iter().chain(&s.image) {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        Ok(())
    })
}

/// The cached samples, or `None` for a missing, stale or damaged cache (which is then rebuilt).
fn read_cache(path: &Path, expected: usize) -> Option<Vec<Sample>> {
    let bytes = std::fs::read(path).ok()?;
    let mut r = &bytes[..];
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n {
            return None;
        }
        let (head, rest) = r.split_at(n);
        r = rest;
        Some(head)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let count = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    if count != expected {
        return None;
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let mut text = || -> Option<String> {
            let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            String::from_utf8(take(n)?.to_vec()).ok()
        };
        let patient_id = text()?;
        let center = text()?;
        let label = match take(1)?[0] {
            0 => Some(false),
            1 => Some(true),
            2 => None,
            _ => return None,
        };
        let mut dim =
            || -> Option<usize> { Some(u32::from_le_bytes(take(4)?.try_into().ok()?) as usize) };
        let (channels, size, clinical_len) = (dim()?, dim()?, dim()?);
        let image_len = channels.checked_mul(size)?.checked_mul(size)?;
        let raw = take(4 * (clinical_len + image_len))?;
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        samples.push(Sample {
            patient_id,
            center,
            clinical: values[..clinical_len].to_vec(),
            image: values[clinical_len..].to_vec(),
            channels,
            size,
            label,
        });
    }
    r.is_empty().then_some(samples)
}
