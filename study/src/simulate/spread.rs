//! `fedslm simulate --repeats N` (or `--seeds`, `--cohort-seeds`): the whole study again with other training
//! seeds (and synthetic cohorts), each repeat a complete run in its own folder, and every figure a reader
//! compares reported as its median and range over the repeats, with each repeat's figures kept beside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::results::{ComparisonResult, SideResult, StudyResults};
use super::{prepare_out, run, write_study_cohort, Observer, Settings, StudyEvent};
use crate::StudyError;

/// The most repeats one command runs.
pub const MAX_REPEATS: usize = 100;

/// Which repeats to run: every training seed on every cohort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeats {
    /// Synthetic cohort seeds; ignored (and must be one) with a cohort on disk.
    pub cohort_seeds: Vec<u64>,
    pub training_seeds: Vec<u64>,
}

impl Repeats {
    /// `n` training seeds from `seed` on, on the cohort of `seed`.
    pub fn consecutive(seed: u64, n: usize) -> Repeats {
        Repeats {
            cohort_seeds: vec![seed],
            training_seeds: (0..n as u64).map(|i| seed.wrapping_add(i)).collect(),
        }
    }

    /// Refuses, by flag, repeats that cannot be run.
    pub fn check(&self, settings: &Settings) -> Result<(), StudyError> {
        let n = self.cohort_seeds.len() * self.training_seeds.len();
        if n == 0 || n > MAX_REPEATS {
            return Err(StudyError::Refused(format!(
                "--repeats/--seeds/--cohort-seeds give {n} repeats: 1 to {MAX_REPEATS}"
            )));
        }
        if settings.cohort.is_some() && self.cohort_seeds.len() > 1 {
            return Err(StudyError::Refused(
                "--cohort-seeds: only for the synthetic cohort, not with --cohort".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.training_seeds.iter().find(|s| !seen.insert(**s)) {
            return Err(StudyError::Refused(format!(
                "--seeds names seed {dup} twice"
            )));
        }
        Ok(())
    }
}

/// A figure's median, minimum and maximum over the repeats that have it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Repeats with the figure.
    pub n: usize,
}

impl Spread {
    /// The spread of `values` (the median of an even count is the mean of the middle two); `None` if empty.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `0.772 (0.701-0.803)`.
    pub fn text(&self) -> String {
        format!("{:.3} ({:.3}-{:.3})", self.median, self.min, self.max)
    }
}

/// One model's figures in one repeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RepeatFigures {
    pub internal_auc: Option<f64>,
    pub external_auc: Option<f64>,
    /// At the internal Youden cut-off, on each side.
    pub internal_sensitivity: Option<f64>,
    pub internal_specificity: Option<f64>,
    pub external_sensitivity: Option<f64>,
    pub external_specificity: Option<f64>,
    /// The external calibration (intercept: calibration-in-the-large; slope).
    pub external_calibration_intercept: Option<f64>,
    pub external_calibration_slope: Option<f64>,
}

impl RepeatFigures {
    fn of(r: &super::results::ModelResults) -> RepeatFigures {
        let at = |s: &Option<SideResult>| s.and_then(|s| s.at_internal_youden);
        let calibration = r
            .external_report
            .as_ref()
            .and_then(|x| x.calibration.as_ref());
        RepeatFigures {
            internal_auc: r.internal.and_then(|s| s.auc.auc),
            external_auc: r.external.and_then(|s| s.auc.auc),
            internal_sensitivity: at(&r.internal).and_then(|a| a.sensitivity),
            internal_specificity: at(&r.internal).and_then(|a| a.specificity),
            external_sensitivity: at(&r.external).and_then(|a| a.sensitivity),
            external_specificity: at(&r.external).and_then(|a| a.specificity),
            external_calibration_intercept: calibration.map(|c| c.intercept),
            external_calibration_slope: calibration.map(|c| c.slope),
        }
    }
}

/// One repeat: its seeds, folder and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Repeat {
    pub cohort_seed: u64,
    pub training_seed: u64,
    /// The repeat's own folder (results.json, report.md, figures, models).
    pub folder: String,
    pub models: BTreeMap<String, RepeatFigures>,
    /// Its paired DeLong tests against the combined network.
    pub comparisons: Vec<ComparisonResult>,
    pub wall_seconds: f64,
}

/// One model's figures over the repeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSpread {
    pub internal_auc: Option<Spread>,
    pub external_auc: Option<Spread>,
    pub internal_sensitivity: Option<Spread>,
    pub internal_specificity: Option<Spread>,
    pub external_sensitivity: Option<Spread>,
    pub external_specificity: Option<Spread>,
    pub external_calibration_intercept: Option<Spread>,
    pub external_calibration_slope: Option<Spread>,
}

/// `results.json` of a command with repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpreadResults {
    pub software: String,
    /// The machine (results of one seed are reproducible on one CPU and thread count, not across them).
    pub cpu: String,
    pub threads: usize,
    /// The methods against scanner shift, as every repeat ran them.
    pub shift: Vec<String>,
    pub repeats: Vec<Repeat>,
    /// By model: every figure's median and range over the repeats.
    pub models: BTreeMap<String, ModelSpread>,
    pub wall_seconds: f64,
}

impl SpreadResults {
    /// The spread of every model's figures over `repeats`.
    pub fn of(repeats: Vec<Repeat>, shift: Vec<String>, wall_seconds: f64) -> SpreadResults {
        let mut names: Vec<String> = repeats
            .iter()
            .flat_map(|r| r.models.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        let models = names
            .into_iter()
            .map(|name| {
                let figures: Vec<RepeatFigures> = repeats
                    .iter()
                    .filter_map(|r| r.models.get(&name).copied())
                    .collect();
                let over = |pick: fn(&RepeatFigures) -> Option<f64>| {
                    Spread::of(figures.iter().filter_map(pick))
                };
                let spread = ModelSpread {
                    internal_auc: over(|f| f.internal_auc),
                    external_auc: over(|f| f.external_auc),
                    internal_sensitivity: over(|f| f.internal_sensitivity),
                    internal_specificity: over(|f| f.internal_specificity),
                    external_sensitivity: over(|f| f.external_sensitivity),
                    external_specificity: over(|f| f.external_specificity),
                    external_calibration_intercept: over(|f| f.external_calibration_intercept),
                    external_calibration_slope: over(|f| f.external_calibration_slope),
                };
                (name, spread)
            })
            .collect();
        SpreadResults {
            software: concat!("fedslm ", env!("CARGO_PKG_VERSION")).into(),
            cpu: cpu_model(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shift,
            repeats,
            models,
            wall_seconds,
        }
    }
}

/// The CPU's model name, from /proc/cpuinfo where there is one.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs every repeat into its own folder of `settings.out` (the synthetic cohort of each cohort seed written
/// once and shared by its repeats), then writes the spread's results.json, report.md and
/// figures/spread.{png,svg}.
pub fn run_repeats(
    settings: Settings,
    repeats: &Repeats,
    observer: Observer<'_>,
) -> Result<SpreadResults, StudyError> {
    let started = Instant::now();
    settings.check()?;
    repeats.check(&settings)?;
    let out = prepare_out(&settings.out)?;
    let total = repeats.cohort_seeds.len() * repeats.training_seeds.len();
    let mut done = Vec::new();
    for &cohort_seed in &repeats.cohort_seeds {
        let cohort = match &settings.cohort {
            Some(c) => c.clone(),
            None => {
                let dir = out.join(format!("cohort-{cohort_seed}"));
                write_study_cohort(&dir, cohort_seed, observer)?;
                dir
            }
        };
        for &training_seed in &repeats.training_seeds {
            let folder = format!("cohort-{cohort_seed}-training-{training_seed}");
            observer(StudyEvent::Milestone(format!(
                "repeat {} of {total}: cohort seed {cohort_seed}, training seed {training_seed}, in {folder}",
                done.len() + 1
            )));
            let r = run(
                Settings {
                    cohort: Some(cohort.clone()),
                    out: out.join(&folder),
                    seed: cohort_seed,
                    training_seed: Some(training_seed),
                    ..settings.clone()
                },
                observer,
            )?;
            done.push(repeat_of(&r, cohort_seed, training_seed, &folder));
        }
    }
    let results = SpreadResults::of(
        done,
        settings.shift.names(),
        started.elapsed().as_secs_f64(),
    );
    write(&out, &results)?;
    Ok(results)
}

fn repeat_of(r: &StudyResults, cohort_seed: u64, training_seed: u64, folder: &str) -> Repeat {
    Repeat {
        cohort_seed,
        training_seed,
        folder: folder.to_string(),
        models: r
            .models
            .iter()
            .map(|(m, x)| (m.clone(), RepeatFigures::of(x)))
            .collect(),
        comparisons: r.comparisons.clone(),
        wall_seconds: r.wall_seconds,
    }
}

/// The spread results of a run with repeats, from `<dir>/results.json`.
pub fn read(dir: &Path) -> Result<SpreadResults, StudyError> {
    let path = dir.join("results.json");
    let bytes = std::fs::read(&path).map_err(|source| StudyError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StudyError::Failed(format!("{}: {e}", path.display())))
}

/// results.json, report.md and the spread figure.
fn write(out: &Path, results: &SpreadResults) -> Result<(), StudyError> {
    let json = serde_json::to_vec_pretty(results)
        .map_err(|e| StudyError::Failed(format!("results.json: {e}")))?;
    crate::error::write_file(&out.join("results.json"), &json)?;
    crate::error::write_file(
        &out.join("report.md"),
        super::report::spread_md(results).as_bytes(),
    )?;
    crate::figures::write_spread(&out.join("figures"), results)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_the_median_and_range_of_the_finite_values() {
        let s = Spread::of([0.75, 0.5, f64::NAN, 0.9, 0.25]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (0.625, 0.25, 0.9, 4));
        assert_eq!(Spread::of([0.3, 0.1, 0.2]).unwrap().median, 0.2);
        assert_eq!(Spread::of(std::iter::empty()), None);
        assert_eq!(s.text(), "0.625 (0.250-0.900)");
    }

    #[test]
    fn repeats_that_cannot_run_are_refused_by_flag() {
        let s = Settings::default();
        assert!(Repeats::consecutive(42, 5).check(&s).is_ok());
        assert_eq!(Repeats::consecutive(42, 3).training_seeds, vec![42, 43, 44]);
        for (bad, flag) in [
            (Repeats::consecutive(1, 0), "1 to 100"),
            (Repeats::consecutive(1, 101), "1 to 100"),
            (
                Repeats {
                    cohort_seeds: vec![1],
                    training_seeds: vec![3, 4, 3],
                },
                "seed 3 twice",
            ),
        ] {
            let e = bad.check(&s).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
        let on_disk = Settings {
            cohort: Some("/data".into()),
            ..Settings::default()
        };
        let e = Repeats {
            cohort_seeds: vec![1, 2],
            training_seeds: vec![1],
        }
        .check(&on_disk)
        .unwrap_err()
        .to_string();
        assert!(e.contains("--cohort-seeds"), "{e}");
    }

    #[test]
    fn each_model_gets_the_spread_of_each_figure_over_the_repeats() {
        let repeat = |seed: u64, auc: f64| Repeat {
            cohort_seed: 42,
            training_seed: seed,
            folder: format!("r{seed}"),
            models: [(
                "mri".to_string(),
                RepeatFigures {
                    external_auc: Some(auc),
                    external_sensitivity: Some(auc - 0.1),
                    ..RepeatFigures::default()
                },
            )]
            .into(),
            comparisons: vec![],
            wall_seconds: 1.0,
        };
        let r = SpreadResults::of(
            vec![repeat(1, 0.6), repeat(2, 0.7), repeat(3, 0.65)],
            vec!["none".into()],
            3.0,
        );
        let mri = r.models["mri"];
        assert_eq!(mri.external_auc.unwrap().median, 0.65);
        assert_eq!(mri.external_auc.unwrap().n, 3);
        assert!((mri.external_sensitivity.unwrap().max - 0.6).abs() < 1e-12);
        assert_eq!(mri.internal_auc, None);
        let table = super::super::report::spread_table(&r);
        assert!(
            table.contains("0.650 (0.600-0.700)") && table.contains("0.662"),
            "the spread beside the study's value: {table}"
        );
        assert!(table.contains("over 3 repeats"), "{table}");
        let md = super::super::report::spread_md(&r);
        assert!(md.contains("| 42 | 2 | mri | - | 0.700 |"), "{md}");
        assert!(md.contains("figures/spread.png"), "{md}");
    }
}
