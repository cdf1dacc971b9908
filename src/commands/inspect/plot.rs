//! `inspect --svg`: one small panel per layer (up to six in a row) with the cumulative explained-variance curves of K
//! and V fitted separately (dashed) and of K/V stacked with one shared basis (solid), the 90% level
//! and where each curve reaches it. Drawn with `plotters`' SVG backend.

use crate::commands::inspect::spectra::{cumulative, LayerSpectra};
use crate::fit::decompose::rank_for_threshold;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// Size of one layer's panel, pixels.
const PANEL: (u32, u32) = (280, 210);
/// Height of the title and legend above the panels.
const HEADER: u32 = 96;
/// The figure's least width (room for the legend).
const MIN_WIDTH: u32 = 840;
/// Panels per row, at most.
const MAX_COLUMNS: usize = 6;
/// The level marked in every panel.
const LEVEL: f64 = 0.9;
/// `k_proj` alone.
pub const K_COLOR: RGBColor = RGBColor(31, 119, 180);
/// `v_proj` alone.
pub const V_COLOR: RGBColor = RGBColor(255, 127, 14);
/// The stack with one shared basis.
pub const SHARED_COLOR: RGBColor = RGBColor(30, 30, 30);
/// The 90% guide.
const GUIDE_COLOR: RGBColor = RGBColor(160, 160, 160);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn message(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The curve of a spectrum: `(0, 0)`, then `(i + 1, variance kept by i + 1 components)`.
fn curve(spectrum: &[f64]) -> Vec<(f64, f64)> {
    std::iter::once((0.0, 0.0))
        .chain(
            cumulative(spectrum)
                .into_iter()
                .enumerate()
                .map(|(i, c)| ((i + 1) as f64, c.min(1.0))),
        )
        .collect()
}

/// Where a spectrum's curve reaches [`LEVEL`].
fn level_point(spectrum: &[f64]) -> Option<(f64, f64)> {
    let r = rank_for_threshold(spectrum, LEVEL);
    let kept = cumulative(spectrum).get(r.checked_sub(1)?).copied()?;
    Some((r as f64, kept.min(1.0)))
}

fn draw_header(area: &Area<'_>, model: &str) -> Result<(), String> {
    let title = format!("Cumulative explained variance per layer, fit pca: {model}");
    area.draw(&Text::new(title, (12, 8), ("sans-serif", 17).into_font()))
        .map_err(message)?;
    let font = ("sans-serif", 13).into_font();
    let items: [(&str, RGBColor, bool); 4] = [
        ("K alone (separate fit)", K_COLOR, true),
        ("V alone (separate fit)", V_COLOR, true),
        ("K and V stacked, one shared basis", SHARED_COLOR, false),
        (
            "90% level; dots: components needed to reach it",
            GUIDE_COLOR,
            false,
        ),
    ];
    for (i, (label, color, dashed)) in items.into_iter().enumerate() {
        let (x, y) = (14 + 400 * (i as i32 % 2), 44 + 24 * (i as i32 / 2));
        let line = [(x, y), (x + 34, y)];
        if dashed {
            area.draw(&DashedPathElement::new(line, 5, 3, color.stroke_width(2)))
                .map_err(message)?;
        } else {
            area.draw(&PathElement::new(line, color.stroke_width(2)))
                .map_err(message)?;
        }
        area.draw(&Text::new(label, (x + 42, y - 7), font.clone()))
            .map_err(message)?;
    }
    Ok(())
}

fn draw_panel(area: &Area<'_>, s: &LayerSpectra) -> Result<(), String> {
    let at = |sp: &[f64]| rank_for_threshold(sp, LEVEL);
    let (k, v, shared) = (at(&s.k), at(&s.v), at(&s.shared_kv));
    let x_max = s.shared_kv.len().max(s.k.len()).max(s.v.len()).max(1) as f64;
    let caption = format!(
        "layer {}: 90% at K {k} + V {v} = {} | shared {shared}",
        s.layer,
        k + v
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 12))
        .margin(6)
        .x_label_area_size(20)
        .y_label_area_size(30)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0)
        .map_err(message)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .y_labels(6)
        .label_style(("sans-serif", 10))
        .max_light_lines(0)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(message)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, LEVEL), (x_max, LEVEL)],
            GUIDE_COLOR.stroke_width(1),
        ))
        .map_err(message)?;
    for (spectrum, color) in [(&s.k, K_COLOR), (&s.v, V_COLOR)] {
        chart
            .draw_series(DashedLineSeries::new(
                curve(spectrum),
                5,
                3,
                color.stroke_width(2),
            ))
            .map_err(message)?;
    }
    chart
        .draw_series(LineSeries::new(
            curve(&s.shared_kv),
            SHARED_COLOR.stroke_width(2),
        ))
        .map_err(message)?;
    for (spectrum, color) in [
        (&s.k, K_COLOR),
        (&s.v, V_COLOR),
        (&s.shared_kv, SHARED_COLOR),
    ] {
        chart
            .draw_series(level_point(spectrum).map(|p| Circle::new(p, 3, color.filled())))
            .map_err(message)?;
    }
    Ok(())
}

/// The SVG document for `layers` of `model`, or the drawing error's message.
pub fn svg(model: &str, layers: &[LayerSpectra]) -> Result<String, String> {
    let columns = layers.len().clamp(1, MAX_COLUMNS);
    let rows = layers.len().div_ceil(columns).max(1);
    let size = (
        (columns as u32 * PANEL.0).max(MIN_WIDTH),
        HEADER + rows as u32 * PANEL.1,
    );
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        root.fill(&WHITE).map_err(message)?;
        let (header, grid) = root.split_vertically(HEADER);
        draw_header(&header, model)?;
        for (s, panel) in layers.iter().zip(grid.split_evenly((rows, columns))) {
            draw_panel(&panel, s)?;
        }
        root.present().map_err(message)?;
    }
    Ok(text)
}
