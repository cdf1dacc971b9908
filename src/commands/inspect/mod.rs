//! The `inspect` subcommand: how many components K, V and the stacked K/V of each layer need for
//! 50%, 90% and 99% of their explained variance (weight-only `pca` fit, [`spectra`]), fitted
//! separately and with one shared basis. Prints a table on stderr or JSON on stdout, and with
//! `--svg` draws the cumulative curves, one panel per layer ([`plot`]). With `--share-layers`, the
//! same counts for one basis shared by groups of adjacent layers ([`groups`]).

pub(crate) mod groups;
pub(crate) mod plot;
pub(crate) mod spectra;

use crate::error::{Error, Result};
use crate::input::source::InputIdentity;
use crate::options::InspectOptions;
use crate::report::{group_digits, Tool};
use groups::{group_counts, GroupSize};
use serde::Serialize;
use spectra::{layer_counts, layer_spectra, totals, Counts, LayerCounts, TotalCounts, THRESHOLDS};
use std::fmt::Write as _;
use std::path::Path;

/// What `inspect --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// Tool name and version.
    pub tool: Tool,
    /// The model inspected.
    pub model: InputIdentity,
    /// The fit whose spectra are counted.
    pub fit: &'static str,
    /// The variance shares counted.
    pub thresholds: Vec<f64>,
    /// Per layer.
    pub layers: Vec<LayerCounts>,
    /// Over all layers.
    pub totals: TotalCounts,
    /// Per `--share-layers` size: one shared K/V basis per group of adjacent layers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_across_layers: Vec<GroupSize>,
}

/// `a/b/c` of a count per threshold.
fn triple(c: &Counts) -> String {
    THRESHOLDS
        .iter()
        .map(|t| c.get(&t.to_string()).copied().unwrap_or(0).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// `1 layer`, `2 layers`.
fn plural(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// The table printed on stderr.
pub fn table(report: &InspectReport) -> String {
    let shares = THRESHOLDS
        .iter()
        .map(|t| format!("{:.0}%", t * 100.0))
        .collect::<Vec<_>>()
        .join(" / ");
    let mut s = String::new();
    if let Some(first) = report.layers.first() {
        let f = first.full_rank;
        let _ = writeln!(
            s,
            "components for {shares} of the explained variance (fit {}; full rank K {}, V {}, K/V stacked {})",
            report.fit, f.k, f.v, f.shared_kv
        );
    }
    let _ = writeln!(
        s,
        "{:>5}  {:>14}  {:>14}  {:>14}  {:>14}",
        "layer", "K", "V", "K+V separate", "K/V shared"
    );
    let mut row = |label: String, k: &Counts, v: &Counts, sep: &Counts, shared: &Counts| {
        let _ = writeln!(
            s,
            "{label:>5}  {:>14}  {:>14}  {:>14}  {:>14}",
            triple(k),
            triple(v),
            triple(sep),
            triple(shared)
        );
    };
    for l in &report.layers {
        row(l.layer.to_string(), &l.k, &l.v, &l.separate, &l.shared_kv);
    }
    let t = &report.totals;
    row("total".into(), &t.k, &t.v, &t.separate, &t.shared_kv);
    for th in THRESHOLDS {
        let key = th.to_string();
        let sep = t.separate.get(&key).copied().unwrap_or(0) as u64;
        let shared = t.shared_kv.get(&key).copied().unwrap_or(0) as u64;
        let pct = if sep == 0 {
            0.0
        } else {
            100.0 * (shared as f64 - sep as f64) / sep as f64
        };
        let _ = writeln!(
            s,
            "{:.0}%: separate K+V {} components over all layers, shared K/V {} ({pct:+.1}%)",
            th * 100.0,
            group_digits(sep),
            group_digits(shared)
        );
    }
    for g in &report.shared_across_layers {
        let _ = writeln!(
            s,
            "groups of {} ({}), one K/V basis each: {} components for {shares}, against {} for one basis per layer",
            plural(g.size, "layer"),
            plural(g.groups.len(), "group"),
            triple(&g.shared_kv),
            triple(&g.per_layer_sum)
        );
    }
    s
}

/// Writes `bytes` to `path` through a sibling temporary file renamed into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            Error::usage(
                "--svg",
                format!("`{}` does not name a file", path.display()),
            )
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.surgery-tmp-{}", std::process::id()));
    let written = crate::output::writer::write_file(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|_| ())
}

/// Runs `inspect`: prints the counts and, with `--svg`, writes the curves.
pub fn run(options: &InspectOptions) -> Result<()> {
    let (input, _, checkpoint) = super::open_input(&options.model, &options.revision, true, None)?;
    checkpoint.require_dense(&options.model)?;
    let spectra = layer_spectra(&checkpoint)?;
    let layers: Vec<LayerCounts> = spectra.iter().map(layer_counts).collect();
    let shared_across_layers = group_counts(&checkpoint, &options.share_layers, &layers)?;
    let report = InspectReport {
        tool: Tool::current(),
        model: input.identity.clone(),
        fit: "pca",
        thresholds: THRESHOLDS.to_vec(),
        totals: totals(&layers),
        layers,
        shared_across_layers,
    };
    if let Some(path) = &options.svg {
        let svg = plot::svg(&options.model, &spectra)
            .map_err(|e| Error::invalid(path, format!("cannot draw the spectra: {e}")))?;
        write_atomically(path, svg.as_bytes())?;
    }
    if options.json {
        let json = serde_json::to_string_pretty(&report).map_err(|source| Error::Json {
            path: "inspect".into(),
            source,
        })?;
        println!("{json}");
    } else {
        eprint!("{}", table(&report));
        if let Some(path) = &options.svg {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
