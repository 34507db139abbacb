//! The accuracy-vs-joules frontier of one family as a PNG (plotters' bitmap backend, with the
//! DejaVu Sans font compiled in, so no system font is looked up).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::{ConfigResult, Configuration, EvalError};
use crate::tasks::TaskFamily;

/// The family name the bundled font is registered under.
pub const FONT: &str = "sans-serif";

/// Registers the bundled DejaVu Sans as [`FONT`] (once per process); plots by other tools of
/// the project use it too.
pub fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the bundled DejaVu Sans font did not load".to_owned())
        })
        .clone()
}

/// Greedy in black; TTC configurations in distinct colours.
fn colour(configuration: &Configuration, index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    match configuration {
        Configuration::Greedy => BLACK,
        Configuration::OtherModel => RGBColor(90, 90, 90),
        _ => PALETTE[index % PALETTE.len()],
    }
}

/// Greedy is a square (the baseline), single-sample votes a triangle, other models (model-size
/// points) a cross, TTC points circles.
fn point<DB: DrawingBackend>(
    configuration: &Configuration,
    colour: RGBColor,
) -> DynElement<'static, DB, (i32, i32)> {
    match configuration {
        Configuration::Greedy => Rectangle::new([(-5, -5), (5, 5)], colour.filled()).into_dyn(),
        Configuration::Vote { k: 1 } => TriangleMarker::new((0, 0), 6, colour.filled()).into_dyn(),
        Configuration::OtherModel => Cross::new((0, 0), 6, colour.stroke_width(2)).into_dyn(),
        _ => Circle::new((0, 0), 5, colour.filled()).into_dyn(),
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
    for (i, r) in rows.iter().enumerate() {
        let c = colour(&r.configuration, i);
        let (x, y) = (r.mean_joules, r.accuracy.estimate);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, r.accuracy.low), (x, r.accuracy.high)],
                c.stroke_width(1),
            )))
            .map_err(|e| fail(e.to_string()))?;
        // Labels are staggered so that configurations at about the same point stay readable.
        let offset = -18 + 14 * (i as i32 % 4);
        let label = r.label.clone();
        let marker = r.configuration;
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((x, y))
                    + point(&marker, c)
                    + Text::new(label.clone(), (9, offset), (FONT, 13).into_font().color(&c)),
            ))
            .map_err(|e| fail(e.to_string()))?
            .label(format!(
                "{label}: {:.0}% at {:.3} J",
                r.accuracy.estimate * 100.0,
                r.mean_joules
            ))
            .legend(move |(lx, ly)| EmptyElement::at((lx + 8, ly)) + point(&marker, c));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}
