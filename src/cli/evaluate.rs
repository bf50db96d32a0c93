//! `fedslm evaluate`: the study's statistics on any predictions file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use fedslm_metrics as m;
use fedslm_study::score::{evaluate, DcaReport, Predictions};

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// CSV with a 0/1 label column and one or more score columns (higher = more likely positive).
    #[arg(long)]
    predictions: PathBuf,
    /// The label column.
    #[arg(long, default_value = "label")]
    label: String,
    /// A score column (repeatable). Default: every other column whose first value is a number.
    #[arg(long = "score")]
    scores: Vec<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Write ROC and decision-curve figures (PNG and SVG) to this folder.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Decision-curve thresholds, comma-separated, each strictly between 0 and 1 (default 0.05, 0.10, ..., 0.95).
    #[arg(long, value_delimiter = ',')]
    thresholds: Option<Vec<f64>>,
}

/// Reads and checks a predictions file; every error names the file and, where it applies, the line and column.
pub fn read_predictions(
    path: &Path,
    label: &str,
    wanted: &[String],
) -> anyhow::Result<Predictions> {
    let file = path.display();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("cannot read {file}"))?;
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{file}: cannot read the header line"))?
        .iter()
        .map(String::from)
        .collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        if let Some(first) = seen.insert(name.as_str(), i) {
            bail!(
                "{file}: column {name:?} appears twice (columns {} and {})",
                first + 1,
                i + 1
            );
        }
    }
    let column = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            anyhow!(
                "{file}: no column {name:?}; the columns are {}",
                header.join(", ")
            )
        })
    };
    let label_col = column(label)?;
    let records: Vec<csv::StringRecord> = reader
        .records()
        .collect::<Result<_, _>>()
        .with_context(|| format!("{file}: malformed CSV"))?;
    if records.is_empty() {
        bail!("{file}: no patients after the header");
    }
    let score_cols: Vec<usize> = if wanted.is_empty() {
        (0..header.len())
            .filter(|&c| {
                c != label_col && records[0].get(c).is_some_and(|v| v.parse::<f64>().is_ok())
            })
            .collect()
    } else {
        wanted
            .iter()
            .map(|w| column(w))
            .collect::<anyhow::Result<_>>()?
    };
    if score_cols.is_empty() {
        bail!(
            "{file}: no score column: no column besides {label:?} has a number in its first row (columns: {})",
            header.join(", ")
        );
    }
    if let Some(&c) = score_cols.iter().find(|&&c| c == label_col) {
        bail!("{file}: column {:?} is the label, not a score", header[c]);
    }
    let line = |r: &csv::StringRecord| r.position().map_or(0, |p| p.line());
    let mut labels = Vec::with_capacity(records.len());
    for r in &records {
        labels.push(match r.get(label_col).unwrap_or("") {
            "0" => false,
            "1" => true,
            other => bail!(
                "{file}: line {}, column {label:?}: label {other:?} is not 0 or 1",
                line(r)
            ),
        });
    }
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        bail!(
            "{file}: all {} patients have label {}; ROC analysis needs both classes",
            labels.len(),
            u8::from(positives > 0)
        );
    }
    let mut scores = Vec::new();
    for &c in &score_cols {
        let name = &header[c];
        let mut values = Vec::with_capacity(records.len());
        for r in &records {
            let raw = r.get(c).unwrap_or("");
            let where_ = || format!("{file}: line {}, column {name:?}", line(r));
            if raw.is_empty() {
                bail!("{}: empty score", where_());
            }
            let v: f64 = raw
                .parse()
                .map_err(|_| anyhow!("{}: {raw:?} is not a number", where_()))?;
            if !v.is_finite() {
                bail!("{}: {raw} is not a finite score", where_());
            }
            values.push(v);
        }
        scores.push((name.clone(), values));
    }
    Ok(Predictions { labels, scores })
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

fn p_value(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

pub fn run(args: EvaluateArgs) -> anyhow::Result<()> {
    let thresholds = args
        .thresholds
        .clone()
        .unwrap_or_else(m::default_thresholds);
    if let Some(t) = thresholds.iter().find(|t| !(**t > 0.0 && **t < 1.0)) {
        bail!("--thresholds: {t} is not strictly between 0 and 1");
    }
    let predictions = read_predictions(&args.predictions, &args.label, &args.scores)?;
    let (report, per_score) = evaluate(&predictions, &thresholds)?;
    if let Some(dir) = &args.plot {
        let written = fedslm_study::figures::write_figures(dir, &predictions, &per_score)?;
        for f in written {
            eprintln!("wrote {}", f.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} patients, {} positive ({:.1}%)\n",
        args.predictions.display(),
        report.n,
        report.n_positive,
        100.0 * report.n_positive as f64 / report.n as f64
    );
    let width = per_score
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$}  {:>5}  {:<13}  {:>7}  {:>5}  {:>5}  {:>5}  {:>5}  {:>5}  {:>6}  {:>6}",
        "score",
        "AUC",
        "95% CI",
        "cut-off",
        "sens",
        "spec",
        "PPV",
        "NPV",
        "Brier",
        "cal a",
        "cal b"
    );
    for (name, r) in &per_score {
        let cal = r.calibration.as_ref();
        println!(
            "{name:<width$}  {:>5.3}  {:.3}-{:.3}    {:>7.4}  {:>5}  {:>5}  {:>5}  {:>5}  {:>5}  {:>6}  {:>6}",
            r.auc,
            r.ci95[0],
            r.ci95[1],
            r.youden.threshold,
            opt(r.youden.sensitivity),
            opt(r.youden.specificity),
            opt(r.youden.ppv),
            opt(r.youden.npv),
            opt(r.brier),
            opt(cal.map(|c| c.intercept)),
            opt(cal.map(|c| c.slope)),
        );
    }
    println!("\nAUC: DeLong 95% CI. Cut-off: Youden, positive when score >= cut-off. cal a/b: calibration intercept/slope.");
    if !report.comparisons.is_empty() {
        println!("\nPaired DeLong tests");
        for c in &report.comparisons {
            println!("  {} vs {}: z = {:.3}, p = {}", c.a, c.b, c.z, p_value(c.p));
        }
    }
    let curves: Vec<(&String, &DcaReport)> = per_score
        .iter()
        .filter_map(|(n, r)| r.dca.as_ref().map(|d| (n, d)))
        .collect();
    let Some((_, first)) = curves.first() else {
        println!("\nNo decision curve: no score is a probability in [0, 1].");
        return Ok(());
    };
    println!("\nNet benefit (decision curve)");
    print!("  {:>9}", "threshold");
    for (name, _) in &curves {
        print!("  {name:>width$}");
    }
    println!("  {:>9}  {:>10}", "treat all", "treat none");
    for (k, t) in thresholds.iter().enumerate() {
        print!("  {t:>9.2}");
        for (_, d) in &curves {
            print!("  {:>width$.4}", d.net_benefit[k]);
        }
        println!(
            "  {:>9.4}  {:>10.4}",
            first.treat_all[k], first.treat_none[k]
        );
    }
    Ok(())
}
