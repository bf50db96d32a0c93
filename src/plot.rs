//! Journal-style figures: ROC curves and decision curves, as PNG and SVG.
//!
//! The font is compiled in (DejaVu Sans): servers and CI machines often have no system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Context};
use fedslm_metrics as m;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::cli::evaluate::{DcaReport, Predictions, ScoreReport};

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

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A figure's title, axes and their names, in the one style every figure shares.
fn frame<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    (x_desc, x_range): (&str, std::ops::Range<f64>),
    (y_desc, y_range): (&str, std::ops::Range<f64>),
) -> anyhow::Result<Chart<'a, DB>>
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
    chart
        .configure_mesh()
        .x_desc(x_desc)
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
) -> anyhow::Result<()>
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

fn roc<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Predictions,
    reports: &[(String, ScoreReport)],
) -> anyhow::Result<()>
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
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            8,
            6,
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(draw_err)?;
    for (k, ((name, scores), (_, r))) in p.scores.iter().zip(reports).enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points = m::roc_curve(&p.labels, scores)?;
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
) -> anyhow::Result<()>
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

/// Writes `roc.png`, `roc.svg`, `dca.png` and `dca.svg` to `dir` (the decision curves only where some score
/// is a probability); returns their paths.
pub fn write_figures(
    dir: &Path,
    p: &Predictions,
    reports: &[(String, ScoreReport)],
) -> anyhow::Result<Vec<PathBuf>> {
    register_font();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let any_curve = reports.iter().any(|(_, r)| r.dca.is_some());
    for name in ["roc", "dca"]
        .into_iter()
        .filter(|n| *n == "roc" || any_curve)
    {
        let draw = |png: bool, path: &Path| -> anyhow::Result<()> {
            match (png, name) {
                (true, "roc") => roc(
                    &BitMapBackend::new(path, SIZE).into_drawing_area(),
                    p,
                    reports,
                ),
                (true, _) => dca(
                    &BitMapBackend::new(path, SIZE).into_drawing_area(),
                    p,
                    reports,
                ),
                (false, "roc") => roc(&SVGBackend::new(path, SIZE).into_drawing_area(), p, reports),
                (false, _) => dca(&SVGBackend::new(path, SIZE).into_drawing_area(), p, reports),
            }
            .with_context(|| format!("writing {}", path.display()))
        };
        for (png, ext) in [(true, "png"), (false, "svg")] {
            let path = dir.join(format!("{name}.{ext}"));
            draw(png, &path)?;
            written.push(path);
        }
    }
    Ok(written)
}
