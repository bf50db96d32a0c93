//! `manifest.csv`, one per centre (DESIGN.md §5), checked in full before anything else happens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::coding::{ClinicalCoding, MissingPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sex {
    Male,
    Female,
}

/// Tumour site by height from the anal verge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    Low,
    Mid,
    High,
}

/// The image columns; each may be empty or absent where only the clinical model is trained.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImagePaths {
    pub t2w: Option<PathBuf>,
    pub dwi: Option<PathBuf>,
    pub adc: Option<PathBuf>,
    pub roi: Option<PathBuf>,
}

impl ImagePaths {
    pub const COLUMNS: [&'static str; 4] = ["t2w", "dwi", "adc", "roi"];

    pub fn get(&self, column: &str) -> Option<&PathBuf> {
        match column {
            "t2w" => self.t2w.as_ref(),
            "dwi" => self.dwi.as_ref(),
            "adc" => self.adc.as_ref(),
            "roi" => self.roi.as_ref(),
            _ => None,
        }
    }

    pub fn complete(&self) -> bool {
        Self::COLUMNS.iter().all(|c| self.get(c).is_some())
    }
}

/// One patient row.
#[derive(Debug, Clone, PartialEq)]
pub struct Patient {
    /// The manifest's pseudonym: the only identifier that appears in logs.
    pub id: String,
    /// Line in the manifest (the header is line 1).
    pub line: u64,
    /// `None` where unknown (patients to predict).
    pub slm: Option<bool>,
    pub sex: Sex,
    pub site: Site,
    /// ng/mL; `None` where missing and the policy allows it.
    pub cea: Option<f64>,
    /// U/mL.
    pub ca199: Option<f64>,
    /// Resolved against the manifest's folder; each exists.
    pub images: ImagePaths,
}

/// A read and checked manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub path: PathBuf,
    pub patients: Vec<Patient>,
    /// Patients left out under [`MissingPolicy::Exclude`], with the reason.
    pub excluded: Vec<(String, String)>,
}

/// What is wrong with a manifest; each error names the file and, for a row, its line, patient and column.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed CSV: {reason}")]
    Csv { path: PathBuf, reason: String },
    #[error("{path}: missing column(s) {missing}; the header has {found}")]
    MissingColumns {
        path: PathBuf,
        missing: String,
        found: String,
    },
    #[error("{path}: column {name:?} appears twice (columns {first} and {second})")]
    DuplicateColumn {
        path: PathBuf,
        name: String,
        first: usize,
        second: usize,
    },
    #[error("{path}: no patients after the header")]
    Empty { path: PathBuf },
    #[error("{path} line {line}: patient {patient} appears again (first on line {first_line})")]
    DuplicatePatient {
        path: PathBuf,
        line: u64,
        patient: String,
        first_line: u64,
    },
    #[error("{path} line {line} (patient {patient}), column {column}: {problem}")]
    Field {
        path: PathBuf,
        line: u64,
        patient: String,
        column: &'static str,
        problem: String,
    },
    #[error("{path} holds no manifest.csv, and no sub-folder does")]
    NoCenters { path: PathBuf },
    #[error("{path} has no centre {center}; it has {known}")]
    UnknownCenter {
        path: PathBuf,
        center: String,
        known: String,
    },
    #[error("{path}: the {model} model needs T2W, DWI, ADC and ROI images; {count} patient(s) lack some: {examples}")]
    NoImages {
        path: PathBuf,
        model: String,
        count: usize,
        examples: String,
    },
}

const REQUIRED: [&str; 6] = ["patient_id", "slm", "sex", "site", "cea", "ca199"];

impl Manifest {
    /// Reads and checks `path` under `coding`'s missing-value policy.
    pub fn read(path: &Path, coding: &ClinicalCoding) -> Result<Manifest, ManifestError> {
        let csv_err = |e: csv::Error| ManifestError::Csv {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(file);
        let header: Vec<String> = reader
            .headers()
            .map_err(csv_err)?
            .iter()
            .map(String::from)
            .collect();
        let mut columns: HashMap<&str, usize> = HashMap::new();
        for (i, name) in header.iter().enumerate() {
            if let Some(first) = columns.insert(name.as_str(), i) {
                return Err(ManifestError::DuplicateColumn {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    first: first + 1,
                    second: i + 1,
                });
            }
        }
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|c| !columns.contains_key(c))
            .collect();
        if !missing.is_empty() {
            return Err(ManifestError::MissingColumns {
                path: path.to_path_buf(),
                missing: missing.join(", "),
                found: header.join(", "),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut patients: Vec<Patient> = Vec::new();
        let mut excluded = Vec::new();
        let mut seen: HashMap<String, u64> = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(csv_err)?;
            let line = record.position().map_or(0, |p| p.line());
            let get = |c: &str| columns.get(c).and_then(|&i| record.get(i)).unwrap_or("");
            let id = get("patient_id").to_string();
            let field = |column: &'static str, problem: String| ManifestError::Field {
                path: path.to_path_buf(),
                line,
                patient: if id.is_empty() {
                    "?".into()
                } else {
                    id.clone()
                },
                column,
                problem,
            };
            if id.is_empty() {
                return Err(field("patient_id", "empty".into()));
            }
            if let Some(&first_line) = seen.get(&id) {
                return Err(ManifestError::DuplicatePatient {
                    path: path.to_path_buf(),
                    line,
                    patient: id,
                    first_line,
                });
            }
            seen.insert(id.clone(), line);
            let slm = match get("slm") {
                "" => None,
                "0" => Some(false),
                "1" => Some(true),
                other => return Err(field("slm", format!("{other:?} is not 0, 1 or empty"))),
            };
            let sex = match get("sex") {
                "M" => Sex::Male,
                "F" => Sex::Female,
                other => return Err(field("sex", format!("{other:?} is not M or F"))),
            };
            let site = match get("site") {
                "low" => Site::Low,
                "mid" => Site::Mid,
                "high" => Site::High,
                other => return Err(field("site", format!("{other:?} is not low, mid or high"))),
            };
            let marker = |column: &'static str, unit: &str| -> Result<Option<f64>, ManifestError> {
                let raw = get(column);
                if raw.is_empty() {
                    return Ok(None);
                }
                let v: f64 = raw
                    .parse()
                    .map_err(|_| field(column, format!("{raw:?} is not a number ({unit})")))?;
                if !v.is_finite() || v < 0.0 {
                    return Err(field(
                        column,
                        format!("{raw} is not a concentration: it must be finite and not negative"),
                    ));
                }
                Ok(Some(v))
            };
            let cea = marker("cea", "ng/mL")?;
            let ca199 = marker("ca199", "U/mL")?;
            let absent: Vec<&str> = [("cea", cea), ("ca199", ca199)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(c, _)| *c)
                .collect();
            if !absent.is_empty() {
                match coding.missing {
                    MissingPolicy::Error => return Err(field(
                        if absent[0] == "cea" { "cea" } else { "ca199" },
                        "missing; fill it in, or choose a missing-value policy (exclude or normal)"
                            .into(),
                    )),
                    MissingPolicy::Exclude => {
                        tracing::warn!(patient = %id, missing = %absent.join(", "), "patient left out: missing tumour marker");
                        excluded.push((id, format!("missing {}", absent.join(", "))));
                        continue;
                    }
                    MissingPolicy::Normal => {}
                }
            }
            let mut images = ImagePaths::default();
            for column in ImagePaths::COLUMNS {
                let raw = get(column);
                if raw.is_empty() {
                    continue;
                }
                let resolved = base.join(raw);
                if !resolved.exists() {
                    return Err(field(
                        column,
                        format!("{} does not exist", resolved.display()),
                    ));
                }
                let slot = match column {
                    "t2w" => &mut images.t2w,
                    "dwi" => &mut images.dwi,
                    "adc" => &mut images.adc,
                    _ => &mut images.roi,
                };
                *slot = Some(resolved);
            }
            patients.push(Patient {
                id,
                line,
                slm,
                sex,
                site,
                cea,
                ca199,
                images,
            });
        }
        if patients.is_empty() && excluded.is_empty() {
            return Err(ManifestError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            patients,
            excluded,
        })
    }

    /// Refuses the cohort for an image model (`mri`, `combined`) unless every patient has all four images.
    pub fn require_images(&self, model: &str) -> Result<(), ManifestError> {
        let lacking: Vec<&str> = self
            .patients
            .iter()
            .filter(|p| !p.images.complete())
            .map(|p| p.id.as_str())
            .collect();
        if lacking.is_empty() {
            return Ok(());
        }
        let mut examples = lacking
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if lacking.len() > 5 {
            examples += ", ...";
        }
        Err(ManifestError::NoImages {
            path: self.path.clone(),
            model: model.to_string(),
            count: lacking.len(),
            examples,
        })
    }
}

/// The centres of a cohort folder: the folder itself if it holds a `manifest.csv`, else each sub-folder that
/// does, by name. `only` keeps the named centres (every name must exist).
pub fn open_cohort(
    dir: &Path,
    coding: &ClinicalCoding,
    only: &[String],
) -> Result<Vec<(String, Manifest)>, ManifestError> {
    let io = |source| ManifestError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let name_of = |p: &Path| {
        p.file_name().map_or_else(
            || "cohort".to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    if dir.join("manifest.csv").is_file() {
        found.push((name_of(dir), dir.join("manifest.csv")));
    } else {
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.join("manifest.csv").is_file() {
                found.push((name_of(&path), path.join("manifest.csv")));
            }
        }
        found.sort();
    }
    if found.is_empty() {
        return Err(ManifestError::NoCenters {
            path: dir.to_path_buf(),
        });
    }
    for wanted in only {
        if !found.iter().any(|(n, _)| n == wanted) {
            return Err(ManifestError::UnknownCenter {
                path: dir.to_path_buf(),
                center: wanted.clone(),
                known: found
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    found
        .into_iter()
        .filter(|(n, _)| only.is_empty() || only.contains(n))
        .map(|(n, p)| Ok((n, Manifest::read(&p, coding)?)))
        .collect()
}
