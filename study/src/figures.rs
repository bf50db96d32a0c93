//! Journal-style figures: ROC curves and decision curves, as PNG and SVG.
//!
//! The font is compiled in (DejaVu Sans): servers and CI machines often have no system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use fedslm_metrics as m;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::score::{DcaReport, Predictions, ScoreReport};
use crate::StudyError;

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 760);
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a well-formed TTF compiled into the binary; a failure would show as missing text.
        for style in [FontStyle::Normal, FontStyle::Bold] {
            let bytes = match style {
                FontStyle::Bold => dejavu::sans::bold(),
                _ => dejavu::sans::regular(),
            };
            if plotters::style::register_font(FONT, style, bytes).is_err() {
                tracing::warn!("cannot load the built-in font; figures will lack text");
            }
        }
    });
}

/// What went wrong while drawing (plotters' errors are Debug only).
type Drawn<T> = Result<T, String>;

fn draw_err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A figure's title, axes and their names, in the one style every figure shares.
fn frame<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    x: (&str, std::ops::Range<f64>),
    y: (&str, std::ops::Range<f64>),
) -> Drawn<Chart<'a, DB>>
where
    DB::ErrorType: 'static,
{
    frame_labelled(area, title, x, y, None)
}

/// [`frame`], with the x axis's ticks at 0, 1, ... named by `x_labels` (categories) where given.
fn frame_labelled<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    (x_desc, x_range): (&str, std::ops::Range<f64>),
    (y_desc, y_range): (&str, std::ops::Range<f64>),
    x_labels: Option<&[String]>,
) -> Drawn<Chart<'a, DB>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 30).into_font().style(FontStyle::Bold))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range, y_range)
        .map_err(draw_err)?;
    // A category's name at its integer position, nothing between.
    let category = |x: &f64| {
        let i = x.round();
        let labels = x_labels.unwrap_or_default();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    if let Some(labels) = x_labels {
        mesh.x_labels(labels.len()).x_label_formatter(&category);
    }
    mesh.x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 18))
        .axis_desc_style((FONT, 22))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)?;
    Ok(chart)
}

fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    position: SeriesLabelPosition,
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 20))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(draw_err)
}

/// The dashed line y = x: chance on a ROC curve, perfect calibration.
fn diagonal<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            8,
            6,
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(draw_err)?;
    Ok(())
}

fn roc<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Predictions,
    reports: &[(String, ScoreReport)],
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(draw_err)?;
    let mut chart = frame(
        area,
        "ROC curves",
        ("1 - Specificity (false positive rate)", 0.0..1.0),
        ("Sensitivity (true positive rate)", 0.0..1.0),
    )?;
    diagonal(&mut chart)?;
    for (k, ((name, scores), (_, r))) in p.scores.iter().zip(reports).enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points = m::roc_curve(&p.labels, scores).map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|q| (1.0 - q.specificity, q.sensitivity)),
                color.stroke_width(3),
            ))
            .map_err(draw_err)?
            .label(format!(
                "{name}: AUC {:.3} (95% CI {:.3}-{:.3})",
                r.auc, r.ci95[0], r.ci95[1]
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    area.present().map_err(draw_err)
}

fn dca<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Predictions,
    reports: &[(String, ScoreReport)],
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(draw_err)?;
    let curves: Vec<(&String, &DcaReport)> = reports
        .iter()
        .filter_map(|(n, r)| r.dca.as_ref().map(|d| (n, d)))
        .collect();
    let Some(&(_, first)) = curves.first() else {
        return Ok(());
    };
    let prevalence = p.labels.iter().filter(|&&l| l).count() as f64 / p.labels.len() as f64;
    let top = curves
        .iter()
        .flat_map(|(_, d)| d.net_benefit.iter().copied())
        .fold(prevalence, f64::max);
    let x_max = first.thresholds.last().copied().unwrap_or(1.0).max(0.5);
    let mut chart = frame(
        area,
        "Decision curves",
        ("Threshold probability", 0.0..x_max),
        ("Net benefit", -0.05..(top + 0.05)),
    )?;
    let clip = |v: f64| v.max(-0.05);
    let gray = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(
            first
                .thresholds
                .iter()
                .zip(&first.treat_all)
                .map(|(&t, &v)| (t, clip(v))),
            gray.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("Treat all")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], gray.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (x_max, 0.0)],
            BLACK.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("Treat none")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK.stroke_width(2)));
    for (k, (name, r)) in reports.iter().enumerate() {
        let Some(d) = &r.dca else { continue };
        // The same colour as in the ROC figure.
        let color = PALETTE[k % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                d.thresholds
                    .iter()
                    .zip(&d.net_benefit)
                    .map(|(&t, &v)| (t, clip(v))),
                color.stroke_width(3),
            ))
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    area.present().map_err(draw_err)
}

/// The calibration curve's points: mean predicted risk and observed rate in the groups of predicted risk that
/// Hosmer-Lemeshow uses (`fedslm_metrics::risk_groups`, deciles where ties allow).
pub fn calibration_points(
    labels: &[bool],
    scores: &[f64],
    groups: usize,
) -> Result<Vec<(f64, f64)>, m::MetricsError> {
    Ok(m::risk_groups(labels, scores, groups)?
        .iter()
        .filter_map(m::RiskGroup::point)
        .collect())
}

fn calibration<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Predictions,
    reports: &[(String, ScoreReport)],
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(draw_err)?;
    let mut chart = frame(
        area,
        "Calibration (deciles of predicted risk)",
        ("Predicted probability", 0.0..1.0),
        ("Observed proportion with SLM", 0.0..1.0),
    )?;
    diagonal(&mut chart)?;
    for (k, ((name, scores), (_, r))) in p.scores.iter().zip(reports).enumerate() {
        if r.dca.is_none() {
            continue;
        }
        let color = PALETTE[k % PALETTE.len()];
        let points = calibration_points(&p.labels, scores, 10).map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?;
        let label = match (r.brier, &r.calibration) {
            (Some(b), Some(c)) => format!(
                "{name}: Brier {b:.3}, slope {:.2}, intercept {:.2}",
                c.slope, c.intercept
            ),
            _ => name.clone(),
        };
        chart
            .draw_series(points.iter().map(|&xy| Circle::new(xy, 5, color.filled())))
            .map_err(draw_err)?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 12, y), 5, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    area.present().map_err(draw_err)
}

/// Writes `roc.png`, `roc.svg`, and, where some score is a probability, `dca.*` and `calibration.*` to `dir`;
/// returns their paths.
pub fn write_figures(
    dir: &Path,
    p: &Predictions,
    reports: &[(String, ScoreReport)],
) -> Result<Vec<PathBuf>, StudyError> {
    register_font();
    crate::error::create_dir(dir)?;
    let mut written = Vec::new();
    let any_curve = reports.iter().any(|(_, r)| r.dca.is_some());
    for name in ["roc", "dca", "calibration"]
        .into_iter()
        .filter(|n| *n == "roc" || any_curve)
    {
        let draw = |png: bool, path: &Path| -> Drawn<()> {
            match (png, name) {
                (true, "roc") => roc(
                    &BitMapBackend::new(path, SIZE).into_drawing_area(),
                    p,
                    reports,
                ),
                (true, "dca") => dca(
                    &BitMapBackend::new(path, SIZE).into_drawing_area(),
                    p,
                    reports,
                ),
                (true, _) => calibration(
                    &BitMapBackend::new(path, SIZE).into_drawing_area(),
                    p,
                    reports,
                ),
                (false, "roc") => roc(&SVGBackend::new(path, SIZE).into_drawing_area(), p, reports),
                (false, "dca") => dca(&SVGBackend::new(path, SIZE).into_drawing_area(), p, reports),
                (false, _) => {
                    calibration(&SVGBackend::new(path, SIZE).into_drawing_area(), p, reports)
                }
            }
        };
        for (png, ext) in [(true, "png"), (false, "svg")] {
            let path = dir.join(format!("{name}.{ext}"));
            draw(png, &path).map_err(|reason| StudyError::Figure {
                path: path.clone(),
                reason,
            })?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The dashed line of AUC 0.5 across `k` categories.
fn chance_line<DB: DrawingBackend>(chart: &mut Chart<'_, DB>, k: f64) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    chart
        .draw_series(DashedLineSeries::new(
            [(-0.5, 0.5), (k - 0.5, 0.5)],
            8,
            6,
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(draw_err)?;
    Ok(())
}

/// One side's panel of the privacy trade-off: a model's AUC per seed (points) and its median (a line) at each
/// budget, budgets left to right and no DP last.
fn tradeoff_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    side: &str,
    budgets: &[Option<f64>],
    points: &[crate::simulate::tradeoff::Point],
    spreads: &[crate::simulate::tradeoff::Spread],
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    use crate::simulate::tradeoff::budget_label;
    let index = |e: Option<f64>| budgets.iter().position(|b| *b == e).unwrap_or(0) as f64;
    let k = budgets.len().max(1) as f64;
    // From 0.3, or lower where a point is: every run shows.
    let lowest = points.iter().map(|p| p.auc).fold(0.3, f64::min);
    let bottom = ((lowest - 0.05) * 10.0).floor() / 10.0;
    let labels: Vec<String> = budgets.iter().map(|b| budget_label(*b)).collect();
    let mut chart = frame_labelled(
        area,
        &format!("{side} AUC"),
        ("privacy budget per federation (δ = 1e-5)", -0.5..k - 0.5),
        ("AUC", bottom.max(0.0)..1.0),
        Some(&labels),
    )?;
    chance_line(&mut chart, k)?;
    let mut models: Vec<&str> = spreads.iter().map(|s| s.model.as_str()).collect();
    models.sort();
    models.dedup();
    for (m, model) in models.iter().enumerate() {
        let color = PALETTE[m % PALETTE.len()];
        // Models side by side within a budget, so that their points do not hide each other.
        let shift = (m as f64 - (models.len() as f64 - 1.0) / 2.0) * 0.08;
        let line: Vec<(f64, f64)> = spreads
            .iter()
            .filter(|s| s.model == *model && s.side == side)
            .map(|s| (index(s.epsilon) + shift, s.median))
            .collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(3)))
            .map_err(draw_err)?
            .label(format!("{model} (median)"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.model == *model && p.side == side)
                    .map(|p| {
                        Circle::new(
                            (index(p.epsilon) + shift, p.auc),
                            4,
                            color.mix(0.6).filled(),
                        )
                    }),
            )
            .map_err(draw_err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// A figure of two panels side by side, internal and external, drawable on any backend.
trait TwoSides {
    fn panel<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, side: &str) -> Drawn<()>
    where
        DB::ErrorType: 'static;
}

fn draw_two_sides<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    figure: &impl TwoSides,
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(draw_err)?;
    for (panel, side) in area
        .split_evenly((1, 2))
        .iter()
        .zip(["internal", "external"])
    {
        figure.panel(panel, side)?;
    }
    area.present().map_err(draw_err)
}

/// Writes a two-sided figure as `png` and `svg` (1500 x 650); returns their paths.
fn write_two_sides(
    png: PathBuf,
    svg: PathBuf,
    figure: &impl TwoSides,
) -> Result<Vec<PathBuf>, StudyError> {
    register_font();
    let size = (1500, 650);
    let failed = |path: &PathBuf| {
        let path = path.clone();
        move |reason| StudyError::Figure { path, reason }
    };
    draw_two_sides(&BitMapBackend::new(&png, size).into_drawing_area(), figure)
        .map_err(failed(&png))?;
    draw_two_sides(&SVGBackend::new(&svg, size).into_drawing_area(), figure)
        .map_err(failed(&svg))?;
    Ok(vec![png, svg])
}

/// The privacy trade-off's figure: budgets in order, every run's points and each budget's spread.
struct Tradeoff<'a> {
    budgets: Vec<Option<f64>>,
    points: &'a [crate::simulate::tradeoff::Point],
    spreads: Vec<crate::simulate::tradeoff::Spread>,
}

impl TwoSides for Tradeoff<'_> {
    fn panel<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, side: &str) -> Drawn<()>
    where
        DB::ErrorType: 'static,
    {
        tradeoff_panel(area, side, &self.budgets, self.points, &self.spreads)
    }
}

/// Writes `privacy-tradeoff.png` and `.svg` to `dir`: internal and external AUC against the privacy budget,
/// each seed's run a point and the median a line, per model; returns their paths.
pub fn write_tradeoff(
    dir: &Path,
    points: &[crate::simulate::tradeoff::Point],
) -> Result<Vec<PathBuf>, StudyError> {
    use crate::simulate::tradeoff::{budget_order, figure_paths, spreads};
    crate::error::create_dir(dir)?;
    let mut budgets: Vec<Option<f64>> = points.iter().map(|p| p.epsilon).collect();
    budgets.sort_by(|a, b| budget_order(*a, *b));
    budgets.dedup();
    let [png, svg] = figure_paths(dir);
    let figure = Tradeoff {
        budgets,
        points,
        spreads: spreads(points),
    };
    write_two_sides(png, svg, &figure)
}

impl TwoSides for crate::simulate::spread::SpreadResults {
    fn panel<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, side: &str) -> Drawn<()>
    where
        DB::ErrorType: 'static,
    {
        spread_panel(area, side, self)
    }
}

/// One side's panel of the spread over repeats: each repeat's AUC a point, the median a bar, the study's
/// figure a black diamond, per model.
fn spread_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    side: &str,
    results: &crate::simulate::spread::SpreadResults,
) -> Drawn<()>
where
    DB::ErrorType: 'static,
{
    use crate::simulate::report::PAPER;
    let models: Vec<fedslm_model::ModelKind> = fedslm_model::ModelKind::ALL
        .into_iter()
        .filter(|m| results.models.contains_key(m.name()))
        .collect();
    let auc = |f: &crate::simulate::spread::RepeatFigures| match side {
        "internal" => f.internal_auc,
        _ => f.external_auc,
    };
    let lowest = results
        .repeats
        .iter()
        .flat_map(|r| r.models.values().filter_map(auc))
        .fold(0.4, f64::min);
    // Room below the lowest point for the legend, so that it hides none.
    let bottom = ((lowest - 0.25) * 10.0).floor() / 10.0;
    let labels: Vec<String> = models.iter().map(|m| m.name().to_string()).collect();
    let k = models.len().max(1) as f64;
    let mut chart = frame_labelled(
        area,
        &format!("{side} AUC over {} repeats", results.repeats.len()),
        ("model", -0.5..k - 0.5),
        ("AUC", bottom.max(0.0)..1.0),
        Some(&labels),
    )?;
    chance_line(&mut chart, k)?;
    let n = results.repeats.len().max(1) as f64;
    for (i, m) in models.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let x = i as f64;
        // Repeats spread across the category in their order, so that equal AUCs stay visible.
        let points: Vec<(f64, f64)> = results
            .repeats
            .iter()
            .enumerate()
            .filter_map(|(j, r)| {
                let a = r.models.get(m.name()).and_then(auc)?;
                Some((x - 0.2 + 0.4 * (j as f64 + 0.5) / n, a))
            })
            .collect();
        let label = if i == 0 { "a repeat" } else { "" };
        let series = chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 5, color.mix(0.7).filled())),
            )
            .map_err(draw_err)?;
        if !label.is_empty() {
            series
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 12, y), 5, color.mix(0.7).filled()));
        }
        let spread = results.models.get(m.name()).and_then(|s| match side {
            "internal" => s.internal_auc,
            _ => s.external_auc,
        });
        if let Some(s) = spread {
            let bar = chart
                .draw_series(LineSeries::new(
                    [(x - 0.3, s.median), (x + 0.3, s.median)],
                    color.stroke_width(4),
                ))
                .map_err(draw_err)?;
            if i == 0 {
                bar.label("median").legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(4))
                });
            }
        }
        if let Some(p) = PAPER.iter().find(|p| p.0 == *m) {
            let v = if side == "internal" { p.1 } else { p.2 };
            let d = chart
                .draw_series(std::iter::once(Cross::new(
                    (x + 0.33, v),
                    8,
                    BLACK.stroke_width(3),
                )))
                .map_err(draw_err)?;
            if i == 0 {
                d.label("the study (BMC Med Imaging 2025)")
                    .legend(|(x, y)| Cross::new((x + 12, y), 6, BLACK.stroke_width(3)));
            }
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Writes `spread.png` and `.svg` to `dir`: internal and external AUC of each model over the repeats, beside
/// the study's figures; returns their paths.
pub fn write_spread(
    dir: &Path,
    results: &crate::simulate::spread::SpreadResults,
) -> Result<Vec<PathBuf>, StudyError> {
    crate::error::create_dir(dir)?;
    write_two_sides(dir.join("spread.png"), dir.join("spread.svg"), results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_points_are_group_means_of_predicted_and_observed() {
        let scores = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9];
        let labels = [false, false, true, false, true, false, true, true];
        let points = calibration_points(&labels, &scores, 4).unwrap();
        let want = [(0.15, 0.0), (0.35, 0.5), (0.65, 0.5), (0.85, 1.0)];
        assert_eq!(points.len(), 4);
        for ((x, y), (wx, wy)) in points.iter().zip(want) {
            assert!(
                (x - wx).abs() < 1e-12 && (y - wy).abs() < 1e-12,
                "{points:?}"
            );
        }
        // More groups than patients: one group each.
        assert_eq!(
            calibration_points(&labels[..3], &scores[..3], 10)
                .unwrap()
                .len(),
            3
        );
    }
}
