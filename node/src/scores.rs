//! Each run's per-patient scores, kept at the node for the paired tests' second pass: in memory for the last
//! [`KEPT_RUNS`] runs and, where client.toml names a `scores` folder, on the site's own disk. They never leave it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// Runs whose evaluation scores a node keeps in memory; older ones are forgotten.
pub const KEPT_RUNS: usize = 256;

/// A patient's score in an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub patient: String,
    pub label: bool,
    pub probability: f64,
}

/// Why a run's kept scores cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ScoresError {
    #[error("run id {0:?} is not a plain name (letters, digits, '.', '_', '-')")]
    NotPlain(String),
    #[error("this node has no evaluation of it (no {})", .0.display())]
    NoEvaluation(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a scores file (its header)", .0.display())]
    NotScores(PathBuf),
    #[error("{} line {line}: {text:?}", path.display())]
    BadLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// The scores of the last runs this node evaluated, newest last.
#[derive(Debug, Default)]
pub struct KeptScores {
    runs: VecDeque<(String, Vec<Scored>)>,
}

impl KeptScores {
    /// Keeps a run's scores, replacing an earlier evaluation of the same run and forgetting the oldest run
    /// beyond [`KEPT_RUNS`].
    pub fn keep(&mut self, run_id: &str, scored: Vec<Scored>) {
        self.runs.retain(|(r, _)| r != run_id);
        if self.runs.len() == KEPT_RUNS {
            self.runs.pop_front();
        }
        self.runs.push_back((run_id.to_string(), scored));
    }

    pub fn get(&self, run_id: &str) -> Option<&[Scored]> {
        self.runs
            .iter()
            .find(|(r, _)| r == run_id)
            .map(|(_, s)| s.as_slice())
    }
}

/// The file of a run's kept scores. A run id comes from the server: only plain names become file names.
fn scores_path(dir: &Path, run_id: &str) -> Result<PathBuf, ScoresError> {
    let plain = !run_id.is_empty()
        && run_id.len() <= 128
        && !run_id.starts_with('.')
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(ScoresError::NotPlain(run_id.to_string()));
    }
    Ok(dir.join(format!("{run_id}.csv")))
}

/// Writes a run's scores to `dir/<run id>.csv`, whole or not at all.
pub fn write_scores(dir: &Path, run_id: &str, scored: &[Scored]) -> Result<(), ScoresError> {
    let path = scores_path(dir, run_id)?;
    let mut csv = String::from("patient_id,label,probability\n");
    for s in scored {
        csv += &format!(
            "{},{},{:.17}\n",
            s.patient,
            u8::from(s.label),
            s.probability
        );
    }
    fedslm_files::write_atomic(&path, csv.as_bytes())
        .map_err(|source| ScoresError::Write { path, source })
}

/// Reads a run's scores from `dir/<run id>.csv`, every line checked.
pub fn read_scores(dir: &Path, run_id: &str) -> Result<Vec<Scored>, ScoresError> {
    let path = scores_path(dir, run_id)?;
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Err(ScoresError::NoEvaluation(path));
    };
    let mut lines = text.lines().enumerate();
    if lines.next().map(|(_, h)| h) != Some("patient_id,label,probability") {
        return Err(ScoresError::NotScores(path));
    }
    lines
        .map(|(i, line)| {
            let bad = || ScoresError::BadLine {
                path: path.clone(),
                line: i + 1,
                text: line.to_string(),
            };
            let mut f = line.split(',');
            let (Some(patient), Some(label), Some(p), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(bad());
            };
            let label = match label {
                "0" => false,
                "1" => true,
                _ => return Err(bad()),
            };
            let probability: f64 = p.parse().map_err(|_| bad())?;
            if !(0.0..=1.0).contains(&probability) {
                return Err(bad());
            }
            Ok(Scored {
                patient: patient.to_string(),
                label,
                probability,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_scores_round_trip_and_a_run_id_never_leaves_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let scored = vec![
            Scored {
                patient: "P1".into(),
                label: true,
                probability: 0.123_456_789_012_345_67,
            },
            Scored {
                patient: "P2".into(),
                label: false,
                probability: 1.0,
            },
        ];
        write_scores(tmp.path(), "combined-fold-2", &scored).unwrap();
        assert_eq!(read_scores(tmp.path(), "combined-fold-2").unwrap(), scored);
        for bad in ["../escape", "", ".hidden", "a/b", "a b"] {
            let e = write_scores(tmp.path(), bad, &scored)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a plain name"), "{bad}: {e}");
            assert!(read_scores(tmp.path(), bad).is_err());
        }
        let e = read_scores(tmp.path(), "never-run")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no evaluation"), "{e}");
        std::fs::write(
            tmp.path().join("broken.csv"),
            "patient_id,label,probability\nP1,2,0.5\n",
        )
        .unwrap();
        let e = read_scores(tmp.path(), "broken").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn memory_keeps_the_newest_runs_and_one_evaluation_per_run() {
        let mut kept = KeptScores::default();
        let one = |p: f64| {
            vec![Scored {
                patient: "P".into(),
                label: true,
                probability: p,
            }]
        };
        for i in 0..KEPT_RUNS + 1 {
            kept.keep(&format!("run-{i}"), one(0.5));
        }
        assert!(kept.get("run-0").is_none());
        assert!(kept.get("run-1").is_some());
        kept.keep("run-1", one(0.25));
        assert_eq!(kept.get("run-1").unwrap()[0].probability, 0.25);
        kept.keep("new", one(0.5));
        assert!(
            kept.get("run-2").is_none(),
            "run-1 was renewed: run-2 is the oldest"
        );
    }
}
