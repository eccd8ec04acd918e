//! Pictures, as SVG (`plotters`, SVG backend only): the drift profile against the step
//! (`ditc calibrate --profile`) and a bundle's decision timeline (`ditc run --plot`).
//!
//! Drift: one row of panels per group of quantities (the policies' quantities and the output; the
//! MagCache ratio; AdaCache's motion; the attention sites), one column per guidance branch, one line per quantity with
//! its name in the legend. Relative L1 changes are drawn as log10 (they span decades); the ratio as it is.
//!
//! Timeline: one row per cached value and branch (`cond` rows first, then `uncond`; within a branch the
//! scheduled groups, then the scheduled attention sites, then the scheduled MLPs), one cell per step,
//! left to right: [`COMPUTED`] where the value was computed, [`REUSED`] where it was reused.

use std::collections::BTreeSet;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::calibration::profile::{Measure, Profile, QuantityGroup, QuantityProfile};
use crate::manifest::Manifest;
use crate::runtime::RunReport;
use crate::schedule::guidance::Branch;
use crate::schedule::{Decider, Group};

/// A timeline cell's fill where the value was computed (`#1F77B4` in the SVG).
pub const COMPUTED: RGBColor = RGBColor(0x1F, 0x77, 0xB4);
/// A timeline cell's fill where the value was reused (`#FFB347` in the SVG).
pub const REUSED: RGBColor = RGBColor(0xFF, 0xB3, 0x47);

const FONT: &str = "sans-serif";
/// Pixels of one drift panel's chart, and of the legend beside it.
const PANEL_WIDTH: u32 = 560;
const LEGEND_WIDTH: u32 = 190;

/// plotters' errors carry the backend's error type; say what failed.
fn drawn<T, E: std::fmt::Debug>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow!("drawing the picture failed: {e:?}"))
}

/// One row of the drift picture.
struct Panel<'a> {
    title: &'static str,
    /// Draw log10 of the values (relative changes), else the values (ratios).
    log: bool,
    series: Vec<&'a QuantityProfile>,
}

fn drift_panels(profile: &Profile) -> Vec<Panel<'_>> {
    let pick = |f: &dyn Fn(&QuantityProfile) -> bool| -> Vec<&QuantityProfile> {
        profile.quantities.iter().filter(|q| f(q)).collect()
    };
    let panels = [
        Panel {
            title:
                "policy quantities and the output: relative L1 change to the previous step (log10)",
            log: true,
            series: pick(&|q| {
                matches!(q.group, QuantityGroup::Output | QuantityGroup::Policy)
                    && q.measure == Measure::RelL1
            }),
        },
        Panel {
            title: "MagCache ratio |r_t| / |r_t-1| of the stack residual",
            log: false,
            series: pick(&|q| q.measure == Measure::NormRatio),
        },
        Panel {
            title: "AdaCache's MoReg motion between frames (per step)",
            log: false,
            series: pick(&|q| q.measure == Measure::Motion),
        },
        Panel {
            title: "attention outputs (PAB): relative L1 change to the previous step (log10)",
            log: true,
            series: pick(&|q| q.group == QuantityGroup::Attention),
        },
        Panel {
            title: "MLP outputs (static tables): relative L1 change to the previous step (log10)",
            log: true,
            series: pick(&|q| q.group == QuantityGroup::Mlp),
        },
    ];
    panels
        .into_iter()
        .filter(|p| !p.series.is_empty())
        .collect()
}

/// The points of `q` on `branch` (mean over cases) as drawn: log10 where `log` (positive values only).
fn points(q: &QuantityProfile, branch: Branch, log: bool) -> Vec<(f64, f64)> {
    q.mean_over_cases(branch)
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let v = (*v)?;
            match log {
                true if v > 0.0 => Some((i as f64, v.log10())),
                true => None,
                false => Some((i as f64, v)),
            }
        })
        .collect()
}

/// The drift picture of `profile` (an SVG document).
pub fn drift_svg(profile: &Profile) -> Result<String> {
    let panels = drift_panels(profile);
    let columns = profile.branches.len().max(1);
    let size = (
        (PANEL_WIDTH + LEGEND_WIDTH) * columns as u32 + 20,
        420 * panels.len().max(1) as u32 + 50,
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        let title = format!(
            "Drift per sampling step ({} steps, mean over {} case(s))",
            profile.steps,
            profile.cases.len()
        );
        let root = drawn(root.titled(&title, (FONT, 20)))?;
        let areas = root.split_evenly((panels.len().max(1), columns));
        for (r, panel) in panels.iter().enumerate() {
            let all: Vec<(f64, f64)> = profile
                .branches
                .iter()
                .flat_map(|&b| {
                    panel
                        .series
                        .iter()
                        .flat_map(move |q| points(q, b, panel.log))
                })
                .collect();
            let (lo, hi) = padded_range(all.iter().map(|p| p.1));
            for (c, &branch) in profile.branches.iter().enumerate() {
                let area = &areas[r * columns + c];
                draw_panel(area, panel, branch, profile.steps, (lo, hi))?;
            }
        }
        drawn(root.present())?;
    }
    Ok(svg)
}

/// The range of `values` with a margin (a unit range around a single value).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let margin = ((hi - lo) * 0.05).max(1e-3);
    (lo - margin, hi + margin)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    panel: &Panel,
    branch: Branch,
    steps: usize,
    (lo, hi): (f64, f64),
) -> Result<()> {
    let (plot_area, legend_area) = area.split_horizontally(PANEL_WIDTH);
    let caption = format!("{branch}: {}", panel.title);
    let mut chart = drawn(
        ChartBuilder::on(&plot_area)
            .caption(caption, (FONT, 13))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..steps.max(1) as f64, lo..hi),
    )?;
    let log = panel.log;
    let y_label = move |v: &f64| {
        if log {
            format!("{:.0e}", 10f64.powf(*v))
        } else {
            format!("{v:.3}")
        }
    };
    drawn(
        chart
            .configure_mesh()
            .x_desc("step")
            .y_label_formatter(&y_label)
            .max_light_lines(0)
            .bold_line_style(BLACK.mix(0.08))
            .x_labels(11)
            .y_labels(8)
            .draw(),
    )?;
    for (i, q) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line = points(q, branch, panel.log);
        // A value that never changes (0 at every step) has no point on a log axis: say so.
        let label = match line.is_empty() {
            true => format!("{} (no positive value)", q.name),
            false => q.name.clone(),
        };
        drawn(chart.draw_series(LineSeries::new(line, color.stroke_width(2))))?;
        // The legend beside the chart: a short line in the series' colour and its name.
        let y = 40 + 16 * i as i32;
        drawn(legend_area.draw(&PathElement::new(
            vec![(4, y), (24, y)],
            color.stroke_width(2),
        )))?;
        let style = TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        drawn(legend_area.draw(&Text::new(label, (30, y), style)))?;
    }
    Ok(())
}

/// One row of a decision timeline: computed (true) or reused at each step.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineRow {
    pub label: String,
    pub cells: Vec<bool>,
}

/// The rows of a run's decision timeline (see the module doc for the order). Sites the whole stack
/// or the cached blocks carry (MagCache, TeaCache, first-block-cache) decide as their group does: the
/// group's row stands for them (its label counts them) instead of one identical row each.
pub fn timeline_rows(report: &RunReport, manifest: &Manifest) -> Vec<TimelineRow> {
    let schedule = manifest.schedule.as_ref();
    let sites_of = |g: Group| -> usize {
        schedule.map_or(0, |s| match g {
            Group::Blocks => s.adaptive.as_ref().map_or(0, |a| a.sites.len()),
            _ => s.sites.get(&g).map_or(0, Vec::len),
        })
    };
    // Sites with a table of their own kind (PAB): one row each.
    let own_rows: BTreeSet<usize> = schedule
        .map(|s| {
            s.sites
                .iter()
                .filter(|(g, _)| !matches!(g, Group::Stack | Group::Blocks | Group::Mlp))
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect()
        })
        .unwrap_or_default();
    let kind_of = |id: usize| -> String {
        manifest
            .dit_map
            .get("attention")
            .and_then(|a| a.as_array())
            .and_then(|a| a.iter().find(|s| s["id"].as_u64() == Some(id as u64)))
            .and_then(|s| s["kind"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut rows = Vec::new();
    for (&branch, b) in &report.branches {
        let calls: Vec<_> = report
            .trace
            .iter()
            .filter_map(|s| s.branches.get(&branch))
            .collect();
        let groups: BTreeSet<Decider> = calls
            .iter()
            .flat_map(|c| c.groups.keys().copied())
            .collect();
        for &g in &groups {
            let carried = match (g.group, sites_of(g.group)) {
                (Group::Stack | Group::Blocks, n) if n > 0 => format!(" ({n} sites)"),
                _ => String::new(),
            };
            rows.push(TimelineRow {
                label: format!("{branch} {g}{carried}"),
                cells: calls
                    .iter()
                    .map(|c| c.groups.get(&g).copied().unwrap_or(true))
                    .collect(),
            });
        }
        if groups.is_empty() {
            rows.push(TimelineRow {
                label: format!("{branch} call"),
                cells: calls.iter().map(|c| c.computed).collect(),
            });
        }
        for (id, cells) in b.decisions.iter().filter(|(id, _)| own_rows.contains(id)) {
            rows.push(TimelineRow {
                label: format!("{branch} site {id} ({})", kind_of(*id)),
                cells: cells.clone(),
            });
        }
        for (block, cells) in &b.mlp_decisions {
            rows.push(TimelineRow {
                label: format!("{branch} mlp of block {block}"),
                cells: cells.clone(),
            });
        }
    }
    rows
}

/// The timeline picture of `rows` (an SVG document).
pub fn timeline_svg(title: &str, rows: &[TimelineRow]) -> Result<String> {
    let steps = rows.iter().map(|r| r.cells.len()).max().unwrap_or(0).max(1);
    let row_height = 18u32;
    let size = (1100u32, 110 + row_height * rows.len().max(1) as u32);
    let n = rows.len().max(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        drawn(root.fill(&WHITE))?;
        let caption = format!("{title}: blue = computed, orange = reused");
        let mut chart = drawn(
            ChartBuilder::on(&root)
                .caption(caption, (FONT, 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(200)
                .build_cartesian_2d(0f64..steps as f64, 0f64..n),
        )?;
        drawn(
            chart
                .configure_mesh()
                .disable_mesh()
                .disable_y_axis()
                .x_desc("step")
                .draw(),
        )?;
        // Row r (from the top) spans y in [n - r - 1, n - r].
        let cells = rows.iter().enumerate().flat_map(|(r, row)| {
            let top = n - r as f64;
            row.cells.iter().enumerate().map(move |(i, &computed)| {
                let color = if computed { COMPUTED } else { REUSED };
                Rectangle::new(
                    [(i as f64, top - 0.1), (i as f64 + 1.0, top - 0.9)],
                    color.filled(),
                )
            })
        });
        drawn(chart.draw_series(cells))?;
        for (r, row) in rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, n - r as f64 - 0.5));
            let style =
                TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
            drawn(root.draw(&Text::new(row.label.clone(), (x - 6, y), style)))?;
        }
        drawn(root.present())?;
    }
    Ok(svg)
}
