//! The `sweep` subcommand: perplexity over a grid of conversions, computed in memory.
//!
//! The model, the text and (for fit `act`) the calibration are loaded once. The unmodified model
//! is scored first, then each configuration ([`options`]): its groups are picked by
//! [`crate::plan::groups`], `budget:F` SPECs resolved by [`crate::convert::resolve_budgets`], and
//! the forward pass of `eval` runs with every layer's projections replaced by their
//! reconstructions as that layer is reached ([`evaluate`]). No checkpoint is written: the output
//! directory (created atomically, like a conversion's) holds `sweep.json` ([`record`]), `sweep.md`
//! ([`table`]) and `sweep.svg` ([`plot`]).

pub mod evaluate;
pub mod options;
pub mod plot;
pub mod record;
pub mod table;

use crate::checkpoint::{Checkpoint, CONFIG_FILE};
use crate::cli::SweepArgs;
use crate::convert::{fit_inputs, resolve_budgets};
use crate::error::{Error, Result};
use crate::eval::{negative_log_likelihood, read_text, select};
use crate::llama::Llama;
use crate::output::{check_out_path, Staging};
use crate::plan;
use crate::report::Tool;
use crate::source;
use crate::writer::write_file;
use indicatif::{ProgressBar, ProgressStyle};
use record::{BaseRecord, SweepModel, SweepReport, TextRecord};
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

/// File names written into `--out`.
pub const FILES: [&str; 3] = ["sweep.json", "sweep.md", "sweep.svg"];

fn progress_bar(quiet: bool, layers: usize, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(layers as u64);
    let template = format!("{what}: layer {{pos}}/{{len}} {{wide_bar}} {{elapsed}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Runs the sweep, writes its directory and returns the report.
pub fn run(args: &SweepArgs) -> Result<SweepReport> {
    let started = Instant::now();
    let configs = options::configs(args)?;
    let calibration = options::calibration(args)?;
    let input = source::resolve(&args.input, &args.revision)?;
    let out = check_out_path(&input.dir, &args.out, args.force)?;
    let checkpoint = Checkpoint::open(&input.dir)?;
    if checkpoint.config.latent.is_some() {
        return Err(Error::invalid(
            checkpoint.dir.join(CONFIG_FILE),
            format!(
                "a factored checkpoint (written by --emit factored); expand it to a standard one first: surgery-convert expand {} --out DENSE_DIR",
                args.input
            ),
        ));
    }
    let llama = Llama::new(&checkpoint)?;
    let (ctx, tokens) = (args.ctx.get(), args.tokens.get());
    let text = read_text(&input.dir, &args.text)?;
    let selection = select(text.ids.len(), args.offset, tokens, ctx)?;
    let ids = &text.ids[selection.range.clone()];
    let inputs = fit_inputs(calibration.as_ref(), &checkpoint)?;
    let c = &checkpoint.config;
    let (layers, kv_dim) = (c.num_layers, c.kv_dim() as u64);
    let total = configs.len() + 1;
    let say = |line: String| {
        if !args.quiet {
            eprintln!("{line}");
        }
    };

    let clock = Instant::now();
    let bar = progress_bar(args.quiet, layers, &format!("[1/{total}] base"));
    let (nll, count) = negative_log_likelihood(&llama, ids, ctx, |_| bar.inc(1))?;
    bar.finish_and_clear();
    let (perplexity, nll_mean) = record::perplexity(nll, count);
    let base = BaseRecord {
        perplexity,
        nll_mean,
        kv_cache_values_per_token: 2 * kv_dim * layers as u64,
        seconds: clock.elapsed().as_secs_f64(),
    };
    say(format!(
        "[1/{total}] base: perplexity {perplexity:.4} ({:.1}s)",
        base.seconds
    ));

    let mut records = Vec::with_capacity(configs.len());
    for (i, config) in configs.iter().enumerate() {
        let clock = Instant::now();
        let label = config.label();
        let mut groups = plan::groups(&checkpoint, &config.surgery());
        resolve_budgets(&checkpoint, &mut groups, &inputs)?;
        let bar = progress_bar(args.quiet, layers, &format!("[{}/{total}] {label}", i + 2));
        let evaluation = evaluate::evaluate(&llama, &groups, &inputs, ids, ctx, |_| bar.inc(1))?;
        bar.finish_and_clear();
        let r = record::config_record(
            config,
            &evaluation,
            layers,
            kv_dim,
            base.perplexity,
            clock.elapsed().as_secs_f64(),
        );
        say(format!(
            "[{}/{total}] {label}: K/V {} -> {} values per token, perplexity {:.4} (x{:.3}) ({:.1}s)",
            i + 2,
            r.kv_cache_values_per_token.before,
            r.kv_cache_values_per_token.after,
            r.perplexity,
            r.ratio_to_base,
            r.seconds
        ));
        records.push(r);
    }

    let report = SweepReport {
        tool: Tool {
            name: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
        },
        command: options::command(args, calibration.as_ref()),
        model: SweepModel {
            identity: input.identity.clone(),
            architecture: c.class_name.clone(),
            num_layers: layers,
            hidden_size: c.hidden_size,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        },
        text: TextRecord {
            file: args.text.display().to_string(),
            sha256: text.sha256.clone(),
            offset: args.offset,
            tokens: count,
            ctx,
            windows: selection.windows,
        },
        calibration: inputs.calibration.clone(),
        base,
        configs: records,
        seconds: started.elapsed().as_secs_f64(),
    };
    write(&out, &report)?;
    say(format!(
        "wrote {} ({}) in {:.1}s",
        args.out.display(),
        FILES.join(", "),
        started.elapsed().as_secs_f64()
    ));
    Ok(report)
}

/// Writes the three files into a staging directory and moves it to `out`.
fn write(out: &Path, report: &SweepReport) -> Result<()> {
    let [json_name, md_name, svg_name] = FILES;
    let json = serde_json::to_value(report).map_err(|source| Error::Json {
        path: json_name.into(),
        source,
    })?;
    let json = crate::latent::to_pretty_bytes(&json, Path::new(json_name))?;
    let svg = plot::svg(report)
        .map_err(|e| Error::invalid(out.join(svg_name), format!("cannot draw the plot: {e}")))?;
    let staging = Staging::create(out)?;
    write_file(&staging.path().join(json_name), &json)?;
    write_file(
        &staging.path().join(md_name),
        table::markdown(report).as_bytes(),
    )?;
    write_file(&staging.path().join(svg_name), svg.as_bytes())?;
    staging.commit()
}
