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

/// The internal Youden cut-off applied unchanged externally, beside each side's calibration (intercept:
/// calibration-in-the-large, 0 when the average risk is right; slope: 1 when the spread is right), so that a
/// reader sees why a cut-off travels or fails: an external intercept far from 0 moves every probability
/// across it alike. Nothing here is chosen on external labels.
pub fn cutoff_md(results: &StudyResults) -> String {
    let mut md = String::from(
        "## The internal cut-off at the external centre, and calibration\n\n\
         | model | Youden cut-off (internal) | sens/spec internal | sens/spec external | calibration intercept \
         int / ext | calibration slope int / ext |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    let ss = |side: &Option<SideResult>| match side
        .as_ref()
        .and_then(|s| s.at_internal_youden)
        .and_then(|a| a.sensitivity.zip(a.specificity))
    {
        Some((s, p)) => format!("{s:.2}/{p:.2}"),
        None => "-".into(),
    };
    let cal = |r: &Option<ScoreReport>, f: fn(&crate::score::CalibrationReport) -> f64| {
        r.as_ref()
            .and_then(|r| r.calibration.as_ref())
            .map_or("-".into(), |c| format!("{:.2}", f(c)))
    };
    for (model, r) in models(results) {
        md.push_str(&format!(
            "| {model} | {} | {} | {} | {} / {} | {} / {} |\n",
            r.youden_cutoff.map_or("-".into(), |c| format!("{c:.3}")),
            ss(&r.internal),
            ss(&r.external),
            cal(&r.internal_report, |c| c.intercept),
            cal(&r.external_report, |c| c.intercept),
            cal(&r.internal_report, |c| c.slope),
            cal(&r.external_report, |c| c.slope),
        ));
    }
    md.push('\n');
    md
}

/// report.md: the table, the clinical model's odds ratios, per-centre AUCs, the paired tests, audit heads.
/// The paragraph of a study run under differential privacy.
pub fn privacy_md(dp: &super::privacy::DpRecord) -> String {
    let noise: Vec<String> = dp
        .noise_multipliers
        .iter()
        .map(|(m, s)| format!("{m} {s:.3}"))
        .collect();
    let study: Vec<String> = dp
        .study_epsilon_by_center
        .iter()
        .map(|(c, e)| format!("{c} {e:.1}"))
        .collect();
    format!(
        "**Differential privacy.** Every site required it, with a budget of ε = {} per federation at δ = {:e}: \
         DP-SGD (per-patient clipping to norm 1, Poisson sampling at 0.25, Gaussian noise), Newton statistics \
         clipped per patient and noised, histogram counts noised. Noise multipliers: {}. Each site's ε over the \
         whole study (every federation composed, from its ledger): {}. Placement sums carry no noise, so the \
         paired tests were refused by the sites.\n\n",
        dp.epsilon_per_federation,
        dp.delta,
        noise.join(", "),
        study.join(", ")
    )
}

/// The intensity scale the landmarks round agreed, as client.toml takes it.
fn scale_md(scale: &fedslm_cohort::IntensityScale) -> String {
    format!(
        "## Intensity standardisation\n\nThe training centres agreed this scale in a landmarks round (each sent \
         its images' mean Nyúl-Udupa landmarks; the server averaged them by images) before any model was trained; \
         every centre, the held-out one included, mapped its crops onto it. A site joins the consortium's models \
         with it in client.toml:\n\n```toml\n{}```\n\n",
        crate::scale::client_toml(scale)
    )
}

pub fn report_md(results: &StudyResults, fits: &[(ModelKind, &LogisticFit)]) -> String {
    let s = &results.settings;
    let mut md = String::from("# fedslm simulate: the study, federated\n\n");
    md.push_str(&format!(
        "Cohort `{}`; external validation at `{}`. Federated {}-fold cross-validation (internal: each patient scored \
         once, by the federation that held its fold out); then one federation on all training data, validated \
         externally. Networks: {} rounds of {} local epochs, {}; the clinical model: federated Newton to \
         convergence. Histograms of {} bins; cohort seed {}, training seed {}; methods against scanner shift: {}. Wall time {:.0} s, peak memory {:.0} MiB.\n\n",
        results.cohort,
        results.holdout.as_deref().unwrap_or("none"),
        s.folds,
        s.rounds,
        s.local_epochs,
        s.network,
        s.bins,
        s.seed,
        s.training_seed,
        s.shift.join(", "),
        results.wall_seconds,
        results.peak_memory_mib,
    ));
    if let Some(scale) = &s.intensity_scale {
        md.push_str(&scale_md(scale));
    }
    if let Some(dp) = &s.dp {
        md.push_str(&privacy_md(dp));
    }
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
    md.push_str(&cutoff_md(results));
    md.push_str("## Per-centre internal AUC (out of fold)\n\n| model | centre | AUC | 95% CI | positives/negatives |\n| --- | --- | --- | --- | --- |\n");
    for (model, r) in models(results) {
        for (c, a) in &r.per_center_internal {
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

/// The table of a command with repeats: each model's median (range) over them beside the study's figures.
pub fn spread_table(results: &super::spread::SpreadResults) -> String {
    use super::spread::Spread;
    let s = |x: Option<Spread>| x.map_or("-".into(), |x| x.text());
    let pair = |a: Option<Spread>, b: Option<Spread>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}/{:.2}", a.median, b.median),
        _ => "-".into(),
    };
    let mut t = format!(
        "{:<10} {:>22} {:>22} {:>11} {:>11} {:>15} {:>15}\n",
        "model",
        "internal AUC",
        "external AUC",
        "paper int.",
        "paper ext.",
        "sens/spec int.",
        "sens/spec ext."
    );
    for m in ModelKind::ALL {
        let Some(r) = results.models.get(m.name()) else {
            continue;
        };
        let paper = PAPER.iter().find(|p| p.0 == m);
        t.push_str(&format!(
            "{:<10} {:>22} {:>22} {:>11} {:>11} {:>15} {:>15}\n",
            m.name(),
            s(r.internal_auc),
            s(r.external_auc),
            paper.map_or("-".into(), |p| format!("{:.3}", p.1)),
            paper.map_or("-".into(), |p| format!("{:.3}", p.2)),
            pair(r.internal_sensitivity, r.internal_specificity),
            pair(r.external_sensitivity, r.external_specificity),
        ));
    }
    let n = results.repeats.len();
    t.push_str(&format!(
        "\nmedian (range) over {n} repeat{}; sensitivity/specificity: medians at each repeat's internal Youden \
         cut-off; {} ({} threads); methods against scanner shift: {}\n",
        if n == 1 { "" } else { "s" },
        results.cpu,
        results.threads,
        results.shift.join(", ")
    ));
    t
}

/// report.md of a command with repeats: the spread table, the external calibration's spread, and every
/// repeat's figures and paired tests.
pub fn spread_md(results: &super::spread::SpreadResults) -> String {
    let mut md = String::from("# fedslm simulate: the study over repeats\n\n");
    md.push_str(&format!(
        "{} repeats, {} on {} ({} threads), wall time {:.0} s. Each repeat is a complete run in its own folder \
         (its results.json, report.md, figures and models). Methods against scanner shift: {}.\n\n",
        results.repeats.len(),
        results.software,
        results.cpu,
        results.threads,
        results.wall_seconds,
        results.shift.join(", ")
    ));
    md.push_str("## AUC over the repeats, beside the study's\n\n```\n");
    md.push_str(&spread_table(results));
    md.push_str("```\n\n![spread](figures/spread.png)\n\n");
    md.push_str(
        "## External calibration at the internal cut-off\n\nIntercept (calibration-in-the-large, 0 when the \
         average risk is right) and slope (1 when the spread is right), median (range):\n\n| model | \
         intercept | slope |\n| --- | --- | --- |\n",
    );
    let s = |x: Option<super::spread::Spread>| x.map_or("-".into(), |x| x.text());
    for (m, r) in &results.models {
        md.push_str(&format!(
            "| {m} | {} | {} |\n",
            s(r.external_calibration_intercept),
            s(r.external_calibration_slope)
        ));
    }
    md.push_str("\n## Each repeat\n\n| cohort seed | training seed | model | internal AUC | external AUC | sens/spec ext. | p vs combined (int./ext.) |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
    for r in &results.repeats {
        for (m, x) in &r.models {
            let p = |side: &str| {
                r.comparisons
                    .iter()
                    .find(|c| &c.a == m && c.side == side)
                    .and_then(|c| c.p())
                    .map_or("-".into(), fmt_p)
            };
            let ss = match (x.external_sensitivity, x.external_specificity) {
                (Some(a), Some(b)) => format!("{a:.2}/{b:.2}"),
                _ => "-".into(),
            };
            md.push_str(&format!(
                "| {} | {} | {m} | {} | {} | {ss} | {}/{} |\n",
                r.cohort_seed,
                r.training_seed,
                f(x.internal_auc),
                f(x.external_auc),
                p("internal"),
                p("external"),
            ));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedslm_server::evaluation::{AucSummary, ClassCounts};

    use super::*;
    use crate::simulate::results::{
        AtCutoff, CentralisedResult, ComparisonResult, RoundsRecord, SettingsRecord,
    };

    fn side(auc: f64) -> SideResult {
        SideResult {
            auc: AucSummary {
                auc: Some(auc),
                ci95: Some([auc - 0.1, auc + 0.1]),
                n: ClassCounts {
                    positives: 10,
                    negatives: 20,
                },
            },
            at_internal_youden: Some(AtCutoff {
                threshold: 0.4,
                sensitivity: Some(0.8),
                specificity: Some(0.6),
            }),
        }
    }

    fn model(internal: f64) -> ModelResults {
        ModelResults {
            head_start: None,
            centralised: Some(CentralisedResult {
                internal: Some(side(0.801).auc),
                external: None,
                model: "m".into(),
                seconds: 1.0,
            }),
            internal: Some(side(internal)),
            external: None,
            per_center_internal: BTreeMap::from([("center-a".to_string(), side(0.7).auc)]),
            rounds: RoundsRecord {
                folds: vec![3],
                all: 3,
            },
            final_model: "m.safetensors".into(),
            audit_head: "abc".into(),
            youden_cutoff: Some(0.4),
            internal_report: None,
            external_report: None,
        }
    }

    #[test]
    fn the_table_and_the_report_are_rendered_from_the_typed_results_in_the_studys_order() {
        let results = StudyResults {
            software: "fedslm".into(),
            cohort: "c".into(),
            holdout: None,
            settings: SettingsRecord {
                folds: 5,
                rounds: 10,
                local_epochs: 3,
                bins: 1000,
                seed: 42,
                training_seed: 42,
                shift: vec!["none".into()],
                intensity_scale: None,
                network: "compact".into(),
                dp: None,
                secure_aggregation: false,
            },
            models: BTreeMap::from([
                ("mri".to_string(), model(0.75)),
                ("clinical".to_string(), model(0.8)),
            ]),
            comparisons: vec![
                ComparisonResult {
                    a: "mri".into(),
                    b: "combined".into(),
                    side: "internal".into(),
                    outcome: ComparisonOutcome::Tested {
                        auc_a: 0.75,
                        auc_b: 0.8,
                        z: -2.0,
                        p: 0.0004,
                    },
                },
                ComparisonResult {
                    a: "clinical".into(),
                    b: "combined".into(),
                    side: "external".into(),
                    outcome: ComparisonOutcome::NotComputed {
                        error: "center-x: no answer".into(),
                    },
                },
            ],
            wall_seconds: 1.0,
            phases: Vec::new(),
            peak_memory_mib: 2.0,
        };
        let mut results = results;
        let calibrated = |intercept: f64, slope: f64| crate::score::ScoreReport {
            auc: 0.8,
            ci95: [0.7, 0.9],
            delong_var: 0.001,
            youden: crate::score::YoudenReport {
                threshold: 0.4,
                sensitivity: None,
                specificity: None,
                accuracy: None,
                ppv: None,
                npv: None,
                true_positive: 0,
                false_positive: 0,
                true_negative: 0,
                false_negative: 0,
            },
            brier: None,
            calibration: Some(crate::score::CalibrationReport {
                intercept,
                slope,
                hosmer_lemeshow_p: None,
            }),
            dca: None,
        };
        if let Some(c) = results.models.get_mut("clinical") {
            c.internal_report = Some(calibrated(0.01, 1.02));
            c.external_report = Some(calibrated(-1.5, 0.8));
        }
        let t = table(&results);
        let rows: Vec<&str> = t.lines().skip(1).collect();
        assert!(
            rows[0].starts_with("clinical") && rows[1].starts_with("mri"),
            "{t}"
        );
        assert!(
            rows[0].contains("0.80/0.60") && rows[0].contains("0.801"),
            "{t}"
        );
        assert!(rows[1].contains("<0.001/-"), "{t}");
        let md = report_md(&results, &[]);
        assert!(
            md.contains("| mri | center-a | 0.700 | 0.600-0.800 | 10/20 |"),
            "{md}"
        );
        assert!(md.contains("not computed: center-x: no answer"), "{md}");
        assert!(
            md.contains("| mri | 0.400 | 0.80/0.60 | - | - / - | - / - |"),
            "{md}"
        );
        assert!(
            md.contains("| clinical | 0.400 | 0.80/0.60 | - | 0.01 / -1.50 | 1.02 / 0.80 |"),
            "{md}"
        );
        // results.json keeps each test's outcome under its own keys.
        let json = serde_json::to_value(&results).unwrap();
        assert_eq!(json["comparisons"][0]["p"], 0.0004);
        assert_eq!(json["comparisons"][1]["error"], "center-x: no answer");
        assert_eq!(json["models"]["mri"]["internal"]["n"]["positives"], 10);
        assert_eq!(json["models"]["mri"]["rounds"]["final"], 3);
    }
}
