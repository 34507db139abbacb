//! What the demo shows at the end: a summary per policy and phase (budget against observed
//! joules per request, depth, accuracy, where the joules come from), the records as CSV, and a
//! plot of joules, depth and accuracy over time, a series per policy.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use ttc_eval::plot::{FONT, register_font};
use ttc_eval::stats::mean;

use super::workload::Record;

/// One phase of one policy in figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhaseSummary {
    /// The policy whose pods answered.
    pub policy: String,
    /// Phase number.
    pub phase: usize,
    /// The policy's joules-per-request budget.
    pub budget_joules_per_request: f64,
    /// Questions answered.
    pub requests: usize,
    /// Mean joules per request as the sidecars attributed them.
    pub mean_joules_per_request: f64,
    /// Mean joules per request over the phase's second half, after the sidecars adapted.
    pub settled_joules_per_request: f64,
    /// Mean samples per request.
    pub mean_depth: f64,
    /// Share of right answers.
    pub accuracy: f64,
    /// The energy sources seen, with "measured" or "estimated".
    pub energy: String,
}

/// How the energy of `records` was obtained, e.g. `estimate (estimated)`.
pub fn energy_label(records: &[&Record]) -> String {
    let mut labels: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} ({})",
                r.energy_source,
                if r.measured { "measured" } else { "estimated" }
            )
        })
        .collect();
    labels.sort();
    labels.dedup();
    if labels.is_empty() {
        "none".into()
    } else {
        labels.join(", ")
    }
}

/// The policies of `records`, by name (the order of summaries and of the plot's colours).
pub fn policies(records: &[Record]) -> Vec<String> {
    let mut names: Vec<String> = records.iter().map(|r| r.policy.clone()).collect();
    names.sort();
    names.dedup();
    names
}

/// The summary of each policy's phases present in `records`: by policy name, then in phase
/// order.
pub fn summarise(records: &[Record]) -> Vec<PhaseSummary> {
    let mut phases: Vec<usize> = records.iter().map(|r| r.phase).collect();
    phases.sort_unstable();
    phases.dedup();
    let mut out = Vec::new();
    for policy in policies(records) {
        for &phase in &phases {
            let rows: Vec<&Record> = records
                .iter()
                .filter(|r| r.phase == phase && r.policy == policy)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let settled = &rows[rows.len() / 2..];
            out.push(PhaseSummary {
                policy: policy.clone(),
                phase,
                budget_joules_per_request: rows[0].budget_joules_per_request,
                requests: rows.len(),
                mean_joules_per_request: mean(rows.iter().map(|r| r.joules)),
                settled_joules_per_request: mean(settled.iter().map(|r| r.joules)),
                mean_depth: mean(rows.iter().map(|r| r.samples as f64)),
                accuracy: mean(rows.iter().map(|r| f64::from(u8::from(r.correct)))),
                energy: energy_label(&rows),
            });
        }
    }
    out
}

/// What changed from phase `a` to phase `b` (of one policy), in one line.
pub fn change(a: &PhaseSummary, b: &PhaseSummary) -> String {
    format!(
        "{}: budget {:.1} -> {:.1} J/request: depth {:.2} -> {:.2} samples, settled {:.2} -> {:.2} J/request, accuracy {:.0}% -> {:.0}%",
        a.policy,
        a.budget_joules_per_request,
        b.budget_joules_per_request,
        a.mean_depth,
        b.mean_depth,
        a.settled_joules_per_request,
        b.settled_joules_per_request,
        a.accuracy * 100.0,
        b.accuracy * 100.0
    )
}

/// The changes between consecutive phases of each policy, one line each.
pub fn changes(summaries: &[PhaseSummary]) -> Vec<String> {
    summaries
        .windows(2)
        .filter(|pair| pair[0].policy == pair[1].policy)
        .map(|pair| change(&pair[0], &pair[1]))
        .collect()
}

/// The summary as a text table.
pub fn table(summaries: &[PhaseSummary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<6} {:>12} {:>9} {:>12} {:>14} {:>7} {:>9}  energy",
        "policy",
        "phase",
        "budget J/req",
        "requests",
        "mean J/req",
        "settled J/req",
        "depth",
        "accuracy"
    );
    for s in summaries {
        let _ = writeln!(
            out,
            "{:<8} {:<6} {:>12.2} {:>9} {:>12.2} {:>14.2} {:>7.2} {:>8.0}%  {}",
            s.policy,
            s.phase + 1,
            s.budget_joules_per_request,
            s.requests,
            s.mean_joules_per_request,
            s.settled_joules_per_request,
            s.mean_depth,
            s.accuracy * 100.0,
            s.energy
        );
    }
    out
}

/// The records as CSV.
pub fn csv(records: &[Record]) -> String {
    let mut out = String::from(
        "policy,phase,budget_joules_per_request,item,pod,correct,joules,energy_source,measured,samples,at_seconds,latency_seconds\n",
    );
    for r in records {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{:.6},{},{},{},{:.3},{:.3}",
            r.policy,
            r.phase + 1,
            r.budget_joules_per_request,
            r.item,
            r.pod,
            r.correct,
            r.joules,
            r.energy_source,
            r.measured,
            r.samples,
            r.at_seconds,
            r.latency_seconds
        );
    }
    out
}

/// A trailing mean over `window` points.
fn rolling(values: &[f64], window: usize) -> Vec<f64> {
    (0..values.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            mean(values[from..=i].iter().copied())
        })
        .collect()
}

/// A colour per policy, in the order of [`policies`].
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const RED_LINE: RGBColor = RGBColor(214, 39, 40);

type Panel<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One policy's values over time.
struct Series<'r> {
    policy: &'r str,
    colour: RGBColor,
    times: Vec<f64>,
    values: Vec<f64>,
}

/// A panel of every series up to `(t_max, y_max)`: each point (unless `points` is false), and
/// the trailing mean over `window` points as a line.
fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    (t_max, y_max): (f64, f64),
    y_desc: &str,
    series: &[Series<'_>],
    window: usize,
    points: bool,
) -> Result<Panel<'a, 'b>, String> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .label_style((FONT, 13))
        .draw()
        .map_err(|e| e.to_string())?;
    for s in series {
        let colour = s.colour;
        if points {
            chart
                .draw_series(
                    s.times
                        .iter()
                        .zip(&s.values)
                        .map(|(t, v)| Circle::new((*t, *v), 2, colour.mix(0.35).filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(
                s.times.iter().copied().zip(rolling(&s.values, window)),
                colour.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("{} (mean of the last {window})", s.policy))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    Ok(chart)
}

fn legend<'a, 'b: 'a>(chart: &mut Panel<'a, 'b>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Three panels over time, a series per policy: joules per request (with the budget), TTC
/// depth, and accuracy (the share of right answers over the last requests).
pub fn plot_png(path: &Path, records: &[Record], model: &str) -> anyhow::Result<()> {
    let fail = |e: String| anyhow!("plotting {}: {e}", path.display());
    register_font().map_err(fail)?;
    if records.is_empty() {
        return Err(fail("no records".into()));
    }
    let label = energy_label(&records.iter().collect::<Vec<_>>());
    let t_max = records.last().map_or(1.0, |r| r.at_seconds).max(1.0) * 1.02;
    let j_max = records
        .iter()
        .map(|r| r.joules.max(r.budget_joules_per_request))
        .fold(0.0, f64::max)
        * 1.1;
    let d_max = records.iter().map(|r| r.samples).max().unwrap_or(1) as f64 + 0.5;
    let window = 8;
    let series = |value: &dyn Fn(&Record) -> f64| -> Vec<Series<'_>> {
        policies(records)
            .into_iter()
            .enumerate()
            .map(|(i, policy)| {
                let rows: Vec<&Record> = records.iter().filter(|r| r.policy == policy).collect();
                Series {
                    policy: rows[0].policy.as_str(),
                    colour: COLOURS[i % COLOURS.len()],
                    times: rows.iter().map(|r| r.at_seconds).collect(),
                    values: rows.iter().map(|r| value(r)).collect(),
                }
            })
            .collect()
    };

    let root = BitMapBackend::new(path, (1000, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let root = root
        .titled(
            &format!("ttc-operator demo — {model}: what the budget buys"),
            (FONT, 20),
        )
        .map_err(|e| fail(e.to_string()))?;
    let panels = root.split_evenly((3, 1));

    let mut chart = panel(
        &panels[0],
        (t_max, j_max),
        &format!("joules per request — {label}"),
        &series(&|r| r.joules),
        window,
        true,
    )
    .map_err(fail)?;
    // The budget as a step line: its value while each phase ran (one budget for all policies).
    let mut budget = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let start = if i == 0 {
            0.0
        } else {
            records[i - 1].at_seconds
        };
        budget.push((start, r.budget_joules_per_request));
        budget.push((r.at_seconds, r.budget_joules_per_request));
    }
    chart
        .draw_series(LineSeries::new(budget, RED_LINE.stroke_width(2)))
        .map_err(|e| fail(e.to_string()))?
        .label("budget (spec.budget.joulesPerRequest)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED_LINE.stroke_width(2)));
    legend(&mut chart).map_err(fail)?;
    let mut chart = panel(
        &panels[1],
        (t_max, d_max),
        "TTC depth (samples)",
        &series(&|r| r.samples as f64),
        window,
        true,
    )
    .map_err(fail)?;
    legend(&mut chart).map_err(fail)?;
    let mut chart = panel(
        &panels[2],
        (t_max, 1.05),
        "accuracy (share right)",
        &series(&|r| f64::from(u8::from(r.correct))),
        window,
        false,
    )
    .map_err(fail)?;
    legend(&mut chart).map_err(fail)?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Writes `records.csv`, `summary.json` and `demo.png` into `dir`; returns their paths.
pub fn write_all(
    dir: &Path,
    records: &[Record],
    summaries: &[PhaseSummary],
    model: &str,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let csv_path = dir.join("records.csv");
    std::fs::write(&csv_path, csv(records))
        .with_context(|| format!("writing {}", csv_path.display()))?;
    let json_path = dir.join("summary.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(summaries)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png_path = dir.join("demo.png");
    plot_png(&png_path, records, model)?;
    Ok(vec![csv_path, json_path, png_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: usize, budget: f64, joules: f64, samples: usize, correct: bool) -> Record {
        Record {
            policy: "chat".into(),
            phase,
            budget_joules_per_request: budget,
            item: "f/0".into(),
            pod: "p".into(),
            correct,
            joules,
            energy_source: "estimate".into(),
            measured: false,
            samples,
            at_seconds: 0.0,
            latency_seconds: 0.1,
        }
    }

    #[test]
    fn summarises_each_phase_and_labels_estimates() {
        let mut records = vec![
            record(0, 10.0, 8.0, 4, true),
            record(0, 10.0, 12.0, 6, false),
            record(1, 2.0, 3.0, 2, true),
            record(1, 2.0, 1.0, 1, true),
        ];
        for (i, r) in records.iter_mut().enumerate() {
            r.at_seconds = i as f64;
        }
        let s = summarise(&records);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].mean_joules_per_request, 10.0);
        assert_eq!(s[0].settled_joules_per_request, 12.0);
        assert_eq!(s[0].mean_depth, 5.0);
        assert_eq!(s[0].accuracy, 0.5);
        assert_eq!(s[1].budget_joules_per_request, 2.0);
        assert_eq!(s[1].accuracy, 1.0);
        assert_eq!(s[1].energy, "estimate (estimated)");
        let text = table(&s);
        assert!(text.contains("estimate (estimated)"), "{text}");
        assert_eq!(csv(&records).lines().count(), 5);

        let dir = tempfile::tempdir().unwrap();
        let files = write_all(dir.path(), &records, &s, "m").unwrap();
        assert!(files.iter().all(|f| f.metadata().unwrap().len() > 0));
    }

    #[test]
    fn each_policy_is_summarised_and_compared_on_its_own() {
        let mut records = Vec::new();
        // `checked` answers first; summaries still go by policy name.
        for (policy, phase, correct) in [
            ("checked", 0, true),
            ("chat", 0, true),
            ("chat", 1, false),
            ("checked", 1, false),
        ] {
            let mut r = record(phase, [20.0, 3.0][phase], 5.0, 4 - 3 * phase, correct);
            r.policy = policy.into();
            r.at_seconds = records.len() as f64;
            records.push(r);
        }
        let s = summarise(&records);
        let keys: Vec<(&str, usize)> = s.iter().map(|s| (s.policy.as_str(), s.phase)).collect();
        assert_eq!(
            keys,
            [("chat", 0), ("chat", 1), ("checked", 0), ("checked", 1)]
        );
        let lines = changes(&s);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("chat: budget 20.0 -> 3.0"),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("checked: "), "{lines:?}");
        assert!(table(&s).contains("checked"));
        assert!(
            csv(&records)
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("checked,1,")
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(write_all(dir.path(), &records, &s, "m").is_ok());
    }

    #[test]
    fn rolling_mean_trails() {
        assert_eq!(rolling(&[2.0, 4.0, 6.0], 2), vec![2.0, 3.0, 5.0]);
    }
}
