//! The accuracy-vs-joules frontier of one family as a PNG (plotters' bitmap backend, with the
//! DejaVu Sans font compiled in, so no system font is looked up).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::{ConfigResult, Configuration, EvalError};
use crate::ttc::tasks::TaskFamily;

const FONT: &str = "sans-serif";

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the bundled DejaVu Sans font did not load".to_owned())
        })
        .clone()
}

fn colour(configuration: &Configuration) -> RGBColor {
    match configuration {
        Configuration::Greedy => BLACK,
        Configuration::Vote { .. } => BLUE,
        Configuration::EarlyStop { .. } => RGBColor(0, 140, 0),
        Configuration::Adaptive { .. } => RGBColor(200, 100, 0),
        Configuration::BestOfN { .. } => RED,
    }
}

/// Draws `rows` (one family's configurations) as accuracy (with 95% Wilson intervals) against
/// mean joules per request, with the Pareto `frontier` as a line, into `path`.
pub fn frontier_png(
    path: &Path,
    family: TaskFamily,
    rows: &[&ConfigResult],
    frontier: &[&ConfigResult],
    model: &str,
) -> Result<(), EvalError> {
    let fail = |message: String| EvalError::Plot {
        path: path.to_owned(),
        message,
    };
    register_font().map_err(fail)?;
    let source = rows
        .first()
        .map_or("estimate", |r| r.energy_source.as_str());
    let x_max = rows
        .iter()
        .map(|r| r.mean_joules)
        .fold(0.0_f64, f64::max)
        .max(1e-6)
        * 1.15;
    let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} — {model}: accuracy vs joules ({source})", family.name()),
            (FONT, 20),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..1.05)
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(format!("mean joules per request ({source})"))
        .y_desc("accuracy (95% Wilson interval)")
        .label_style((FONT, 14))
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            frontier
                .iter()
                .map(|r| (r.mean_joules, r.accuracy.estimate)),
            ShapeStyle::from(&RGBColor(150, 150, 150)).stroke_width(2),
        ))
        .map_err(|e| fail(e.to_string()))?
        .label("Pareto frontier")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
    for r in rows {
        let c = colour(&r.configuration);
        let (x, y) = (r.mean_joules, r.accuracy.estimate);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, r.accuracy.low), (x, r.accuracy.high)],
                c.stroke_width(1),
            )))
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Circle::new((x, y), 5, c.filled())))
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                r.label.clone(),
                (x, y),
                (FONT, 14).into_font().color(&c),
            )))
            .map_err(|e| fail(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}
