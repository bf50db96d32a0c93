//! The printed table and report.md, rendered from the typed results.

use fedslm_metrics::LogisticFit;
use fedslm_model::ModelKind;

use super::results::{ComparisonOutcome, ModelResults, SideResult, StudyResults};
use crate::score::ScoreReport;

/// The study's figures (BMC Med Imaging 2025;25:173): internal (5-fold CV) and external AUC.
pub const PAPER: [(ModelKind, f64, f64); 3] = [
    (ModelKind::Clinical, 0.816, 0.824),
    (ModelKind::Mri, 0.788, 0.662),
    (ModelKind::Combined, 0.887, 0.876),
];

/// The models of `results` in the study's order.
fn models(results: &StudyResults) -> impl Iterator<Item = (ModelKind, &ModelResults)> {
    ModelKind::ALL
        .into_iter()
        .filter_map(|m| results.models.get(m.name()).map(|r| (m, r)))
}

fn fmt_auc(r: Option<&ScoreReport>) -> String {
    r.map_or("-".into(), |r| {
        format!("{:.3} ({:.3}-{:.3})", r.auc, r.ci95[0], r.ci95[1])
    })
}

fn fmt_p(p: f64) -> String {
    if p < 0.001 {
        "<0.001".to_string()
    } else {
        format!("{p:.3}")
    }
}

/// The study's table beside the paper's figures.
pub fn table(results: &StudyResults) -> String {
    let mut t = format!(
        "{:<10} {:>24} {:>24} {:>12} {:>12} {:>16} {:>16} {:>11} {:>11} {:>15}\n",
        "model",
        "internal AUC (95% CI)",
        "external AUC (95% CI)",
        "paper int.",
        "paper ext.",
        "sens/spec int.",
        "sens/spec ext.",
        "central int",
        "central ext",
        "p vs comb. i/e"
    );
    for (model, r) in models(results) {
        let paper = PAPER.iter().find(|p| p.0 == model);
        let ss = |side: &Option<SideResult>| match side
            .and_then(|s| s.at_internal_youden)
            .and_then(|a| a.sensitivity.zip(a.specificity))
        {
            Some((s, p)) => format!("{s:.2}/{p:.2}"),
            None => "-".into(),
        };
        let central = |external: bool| {
            r.centralised
                .as_ref()
                .and_then(|c| if external { c.external } else { c.internal })
                .and_then(|a| a.auc)
                .map_or("-".into(), |a| format!("{a:.3}"))
        };
        let p = |side: &str| {
            results
                .comparisons
                .iter()
                .find(|c| c.a == model.name() && c.side == side)
                .and_then(|c| c.p())
                .map_or("-".into(), fmt_p)
        };
        t.push_str(&format!(
            "{:<10} {:>24} {:>24} {:>12} {:>12} {:>16} {:>16} {:>11} {:>11} {:>15}\n",
            model.name(),
            fmt_auc(r.internal_report.as_ref()),
            fmt_auc(r.external_report.as_ref()),
            paper.map_or("-".into(), |p| format!("{:.3}", p.1)),
            paper.map_or("-".into(), |p| format!("{:.3}", p.2)),
            ss(&r.internal),
            ss(&r.external),
            central(false),
            central(true),
            format!("{}/{}", p("internal"), p("external")),
        ));
    }
    t
}

/// report.md: the table, the clinical model's odds ratios, per-centre AUCs, the paired tests, audit heads.
pub fn report_md(results: &StudyResults, fits: &[(ModelKind, &LogisticFit)]) -> String {
    let s = &results.settings;
    let mut md = String::from("# fedslm simulate: the study, federated\n\n");
    md.push_str(&format!(
        "Cohort `{}`; external validation at `{}`. Federated {}-fold cross-validation (internal: each patient scored \
         once, by the federation that held its fold out); then one federation on all training data, validated \
         externally. Networks: {} rounds of {} local epochs, {}; the clinical model: federated Newton to \
         convergence. Histograms of {} bins; seed {}. Wall time {:.0} s, peak memory {:.0} MiB.\n\n",
        results.cohort,
        results.holdout.as_deref().unwrap_or("none"),
        s.folds,
        s.rounds,
        s.local_epochs,
        s.network,
        s.bins,
        s.seed,
        results.wall_seconds,
        results.peak_memory_mib,
    ));
    md.push_str("## AUC, internal and external, beside the study's\n\n```\n");
    md.push_str(&table(results));
    md.push_str("```\n\nSensitivity and specificity at the Youden cut-off chosen on the internal (out-of-fold) scores, applied unchanged externally. \
                 Central: centralised training on the training centres pooled (same folds count, epochs = rounds x local epochs, seed, and \
                 the combined network's head started at the clinical fit of the same training patients), out of fold and at the \
                 held-out centre.\n\n");
    for (model, fit) in fits {
        md.push_str(&format!(
            "## The {model} model, federated Newton on all training data\n\n"
        ));
        md.push_str("| covariate | beta | SE | OR | OR 95% CI | p |\n| --- | --- | --- | --- | --- | --- |\n");
        for (i, name) in fit.names.iter().enumerate() {
            let (lo, hi) = fit.odds_ratio_ci95(i);
            md.push_str(&format!(
                "| {name} | {:.3} | {:.3} | {:.3} | {lo:.3}-{hi:.3} | {:.4} |\n",
                fit.coefficients[i],
                fit.std_errors[i],
                fit.odds_ratio(i),
                fit.p[i]
            ));
        }
        md.push('\n');
    }
    md.push_str("## Per-centre internal AUC (out of fold)\n\n| model | centre | AUC | 95% CI | positives/negatives |\n| --- | --- | --- | --- | --- |\n");
    for (model, r) in models(results) {
        for (c, a) in &r.per_centre_internal {
            md.push_str(&format!(
                "| {model} | {c} | {} | {} | {}/{} |\n",
                a.auc.map_or("-".into(), |a| format!("{a:.3}")),
                a.ci95
                    .map_or("-".into(), |[lo, hi]| format!("{lo:.3}-{hi:.3}")),
                a.n.positives,
                a.n.negatives,
            ));
        }
    }
    if !results.comparisons.is_empty() {
        md.push_str("\n## Paired DeLong tests against the combined network (second pass)\n\n\
                     | model | side | AUC | combined AUC | z | p |\n| --- | --- | --- | --- | --- | --- |\n");
        for c in &results.comparisons {
            let row = match &c.outcome {
                ComparisonOutcome::Tested { auc_a, auc_b, z, p } => {
                    format!("{auc_a:.3} | {auc_b:.3} | {z:.2} | {p:.4}")
                }
                ComparisonOutcome::NotComputed { error } => {
                    format!("- | - | - | not computed: {error}")
                }
            };
            md.push_str(&format!("| {} | {} | {row} |\n", c.a, c.side));
        }
    }
    md.push_str("\n## Audit\n\n| model | final federation's audit head |\n| --- | --- |\n");
    for (model, r) in models(results) {
        md.push_str(&format!("| {model} | `{}` |\n", r.audit_head));
    }
    md.push_str("\nFigures: `figures/internal/{roc,dca,calibration}.png` and `figures/external/...` (PNG and SVG).\n\
                 Paired DeLong p against the combined network: from the second pass (each centre's placement sums \
                 of its patients' kept scores against the pooled histograms; no score leaves a centre).\n");
    md
}
