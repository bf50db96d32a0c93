//! The privacy-utility trade-off across studies: the AUCs of `fedslm simulate` runs made at several
//! `--dp-epsilon` budgets (and without DP) and several seeds, read back from their results.json, as a table of
//! each budget's median and range over seeds, and the points behind it for a figure
//! (`figures::write_tradeoff`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::results::StudyResults;
use crate::StudyError;

/// One model's AUC on one side in one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// The budget per federation; `None`: no DP.
    pub epsilon: Option<f64>,
    pub seed: u64,
    pub model: String,
    /// `internal` or `external`.
    pub side: &'static str,
    pub auc: f64,
}

/// A budget's AUCs for one model and side over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    pub epsilon: Option<f64>,
    pub model: String,
    pub side: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub seeds: usize,
}

/// Every run's points, read from `<dir>/results.json` of each of `runs`.
pub fn read_points(runs: &[PathBuf]) -> Result<Vec<Point>, StudyError> {
    let mut points = Vec::new();
    for dir in runs {
        let path = dir.join("results.json");
        let bytes = std::fs::read(&path).map_err(|source| StudyError::Read {
            path: path.clone(),
            source,
        })?;
        let r: StudyResults = serde_json::from_slice(&bytes)
            .map_err(|e| StudyError::Failed(format!("{}: {e}", path.display())))?;
        points.extend(points_of(&r));
    }
    Ok(points)
}

fn points_of(r: &StudyResults) -> Vec<Point> {
    let epsilon = r.settings.dp.as_ref().map(|d| d.epsilon_per_federation);
    let mut out = Vec::new();
    for (model, m) in &r.models {
        for (side, result) in [("internal", &m.internal), ("external", &m.external)] {
            if let Some(auc) = result.as_ref().and_then(|s| s.auc.auc) {
                out.push(Point {
                    epsilon,
                    seed: r.settings.training_seed,
                    model: model.clone(),
                    side,
                    auc,
                });
            }
        }
    }
    out
}

/// Budgets in order, no DP last.
pub fn budget_order(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// Each (budget, model, side)'s spread over seeds, budgets in order (no DP last).
pub fn spreads(points: &[Point]) -> Vec<Spread> {
    // By model, side and budget (its bits; no DP last): the budget and the AUCs.
    type Key = (String, &'static str, u64);
    let mut groups: BTreeMap<Key, (Option<f64>, Vec<f64>)> = BTreeMap::new();
    for p in points {
        let key = p.epsilon.map_or(u64::MAX, f64::to_bits);
        groups
            .entry((p.model.clone(), p.side, key))
            .or_insert((p.epsilon, Vec::new()))
            .1
            .push(p.auc);
    }
    let mut out: Vec<Spread> = groups
        .into_iter()
        .map(|((model, side, _), (epsilon, aucs))| {
            let seeds = aucs.len();
            let super::spread::Spread {
                median, min, max, ..
            } = super::spread::Spread::of(aucs).unwrap_or(super::spread::Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            });
            Spread {
                epsilon,
                model,
                side,
                median,
                min,
                max,
                seeds,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.model.as_str(), a.side)
            .cmp(&(b.model.as_str(), b.side))
            .then(budget_order(a.epsilon, b.epsilon))
    });
    out
}

/// A budget as a column header: `ε = 8`, or `no DP`.
pub fn budget_label(epsilon: Option<f64>) -> String {
    epsilon.map_or("no DP".into(), |e| format!("ε = {e}"))
}

/// The table: a row per model and side, a column per budget, `median (min-max)` over seeds.
pub fn table_md(spreads: &[Spread]) -> String {
    let mut budgets: Vec<Option<f64>> = spreads.iter().map(|s| s.epsilon).collect();
    budgets.sort_by(|a, b| budget_order(*a, *b));
    budgets.dedup();
    let mut md = String::from("| model | side |");
    for b in &budgets {
        md.push_str(&format!(" {} |", budget_label(*b)));
    }
    md.push_str("\n| --- | --- |");
    md.push_str(&" --- |".repeat(budgets.len()));
    md.push('\n');
    let mut rows: Vec<(&str, &str)> = spreads.iter().map(|s| (s.model.as_str(), s.side)).collect();
    rows.dedup();
    for (model, side) in rows {
        md.push_str(&format!("| {model} | {side} |"));
        for b in &budgets {
            match spreads
                .iter()
                .find(|s| s.model == model && s.side == side && s.epsilon == *b)
            {
                Some(s) => md.push_str(&format!(
                    " {:.3} ({:.3}-{:.3}, n={}) |",
                    s.median, s.min, s.max, s.seeds
                )),
                None => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }
    md
}

/// The figure's folder beside the table: `dir/privacy-tradeoff.{png,svg}`.
pub fn figure_paths(dir: &Path) -> [PathBuf; 2] {
    [
        dir.join("privacy-tradeoff.png"),
        dir.join("privacy-tradeoff.svg"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(epsilon: Option<f64>, seed: u64, auc: f64) -> Point {
        Point {
            epsilon,
            seed,
            model: "mri".into(),
            side: "external",
            auc,
        }
    }

    #[test]
    fn each_budget_gets_its_median_and_range_over_seeds_in_budget_order() {
        let points = [
            p(None, 1, 0.7),
            p(Some(8.0), 1, 0.6),
            p(Some(8.0), 2, 0.5),
            p(Some(1.0), 1, 0.52),
            p(Some(8.0), 3, 0.58),
            p(None, 2, 0.74),
        ];
        let s = spreads(&points);
        let got: Vec<(Option<f64>, f64, usize)> =
            s.iter().map(|s| (s.epsilon, s.median, s.seeds)).collect();
        assert_eq!(
            got,
            [(Some(1.0), 0.52, 1), (Some(8.0), 0.58, 3), (None, 0.72, 2)]
        );
        assert_eq!((s[1].min, s[1].max), (0.5, 0.6));
        let md = table_md(&s);
        assert!(md.contains("| ε = 1 | ε = 8 | no DP |"), "{md}");
        assert!(md.contains("0.580 (0.500-0.600, n=3)"), "{md}");
    }
}
