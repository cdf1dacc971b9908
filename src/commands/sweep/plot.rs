//! `sweep.svg`: perplexity (log scale) against the K/V cache values per token of the factored
//! form, one line per fit (and per `--q` SPEC when that list was given), with the unmodified model
//! as a dashed horizontal reference. Drawn with `plotters`' SVG backend.

use crate::commands::sweep::record::{ConfigRecord, SweepReport};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::Path;

/// Width and height of the figure, pixels.
const SIZE: (u32, u32) = (960, 600);
/// Line colours, in series order.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
/// The base line's colour.
pub const BASE_COLOR: RGBColor = RGBColor(90, 90, 90);

/// One line: its legend label and its points (K/V values, perplexity), sorted by K/V values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text: the fit, plus the `--q` SPEC when there is one.
    pub label: String,
    /// `(kv values per token, perplexity)`, finite points only, in increasing K/V order.
    pub points: Vec<(f64, f64)>,
}

/// The configurations grouped into lines, in order of first appearance.
pub fn series(configs: &[ConfigRecord]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for c in configs {
        let label = match &c.q {
            Some(q) => format!("{}, q {q}", c.fit),
            None => c.fit.to_string(),
        };
        let point = (c.kv_cache_values_per_token.after as f64, c.perplexity);
        let finite = point.1.is_finite() && point.1 > 0.0;
        match out.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.extend(finite.then_some(point)),
            None => out.push(Series {
                label,
                points: finite.then_some(point).into_iter().collect(),
            }),
        }
    }
    for s in &mut out {
        s.points
            .sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    }
    out
}

/// The y range: every finite perplexity, padded by 15% either way on the log scale.
fn y_range(base: f64, lines: &[Series]) -> (f64, f64) {
    let values = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(std::iter::once(base))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() && hi > 0.0 {
        (lo / 1.15, hi * 1.15)
    } else {
        (1.0, 10.0)
    }
}

/// Tick values for a log axis over `[lo, hi]` (`0 < lo < hi`): the 1-2-5 values inside, or, when
/// fewer than three fall inside, five values evenly spaced on the log scale.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return Vec::new();
    }
    let mut ticks = Vec::new();
    let mut exponent = lo.log10().floor() as i32;
    while 10f64.powi(exponent) <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(exponent);
            if (lo..=hi).contains(&v) {
                ticks.push(v);
            }
        }
        exponent += 1;
    }
    if ticks.len() >= 3 {
        return ticks;
    }
    let (a, b) = (lo.ln(), hi.ln());
    (0..5)
        .map(|i| (a + (b - a) * (i as f64 + 0.5) / 5.0).exp())
        .collect()
}

/// A perplexity with about three significant digits (at least the integer part).
pub fn short_number(v: f64) -> String {
    let decimals = match v.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    };
    format!("{v:.decimals$}")
}

/// A tick label: whole numbers without decimals, others as [`short_number`].
fn tick_label(v: f64) -> String {
    if v >= 1.0 && (v - v.round()).abs() < 1e-9 * v {
        format!("{v:.0}")
    } else {
        short_number(v)
    }
}

/// The SVG document, or the drawing error's message.
pub fn svg(report: &SweepReport) -> Result<String, String> {
    let lines = series(&report.configs);
    let base = report.base.perplexity;
    let x_max = (report.base.kv_cache_values_per_token as f64 * 1.05).max(1.0);
    let (y_lo, y_hi) = y_range(base, &lines);
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Perplexity vs K/V cache ({} tokens of {}, windows of {})",
                    report.text.tokens,
                    Path::new(&report.text.file)
                        .file_name()
                        .map_or(report.text.file.clone(), |n| n
                            .to_string_lossy()
                            .into_owned()),
                    report.text.ctx
                ),
                ("sans-serif", 18),
            )
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(
                0f64..x_max,
                (y_lo..y_hi)
                    .log_scale()
                    .with_key_points(log_ticks(y_lo, y_hi)),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("K/V cache values per token, all layers (factored form)")
            .y_desc("perplexity (log scale)")
            .x_label_formatter(&|v| crate::report::group_digits(v.round().max(0.0) as u64))
            .y_label_formatter(&|v| tick_label(*v))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, base), (x_max, base)],
                8,
                5,
                BASE_COLOR.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(format!("base (unmodified): {base:.4}"))
            .legend(|(x, y)| {
                DashedPathElement::new([(x, y), (x + 24, y)], 8, 5, BASE_COLOR.stroke_width(2))
            });
        for (i, line) in lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(line.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_prefer_round_values() {
        assert_eq!(
            log_ticks(15.0, 1100.0),
            [20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
        let narrow = log_ticks(224.0, 296.0);
        assert_eq!(narrow.len(), 5);
        assert!(narrow.windows(2).all(|w| w[0] < w[1]));
        assert!(narrow[0] > 224.0 && narrow[4] < 296.0);
        assert!(log_ticks(0.0, 1.0).is_empty());
        assert_eq!(short_number(22513.68), "22514");
        assert_eq!(short_number(19.4719), "19.5");
        assert_eq!(short_number(1.0), "1.00");
        assert_eq!(tick_label(50.0), "50");
        assert_eq!(tick_label(257.3), "257");
        assert_eq!(tick_label(24.31), "24.3");
    }
}
