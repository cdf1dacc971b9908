//! The `sweep` subcommand: perplexity over a grid of conversions, computed in memory.
//!
//! The model, the text and (for fit `act`) the calibration are loaded once. The unmodified model
//! is scored first, then each configuration ([`crate::options::SweepConfig`]): its groups are picked by
//! [`crate::plan::groups`], `budget:F` SPECs resolved by [`crate::calibrate::budgets::resolve_budgets`], and
//! the forward pass of `eval` runs with every layer's projections replaced by their
//! reconstructions as that layer is reached ([`evaluate`]). No checkpoint is written: the output
//! directory (created atomically, like a conversion's) holds `sweep.json` ([`record`]), `sweep.md`
//! ([`table`]) and `sweep.svg` ([`plot`]).

pub(crate) mod evaluate;
pub mod plot;
pub(crate) mod record;
pub(crate) mod table;

use crate::calibrate::budgets::resolve_budgets;
use crate::calibrate::one_shot::{Keep, Kept};
use crate::calibrate::{Calibrator, Passes};
use crate::error::{Error, Result};
use crate::execute::FitInputs;
use crate::forward::score::{negative_log_likelihood, read_text};
use crate::forward::stream::TextSpan;
use crate::forward::Llama;
use crate::input::checkpoint::Checkpoint;
use crate::options::{SweepConfig, SweepOptions};
use crate::output::staging::{OutTarget, Staging};
use crate::output::writer::write_file;
use crate::plan;
use crate::report::{ModelRecord, Tool};
use indicatif::ProgressBar;
use record::{BaseRecord, ConfigRecord, SweepModel, SweepReport, TextRecord};
use std::path::Path;
use std::time::Instant;

/// File names written into `--out` (what `--force` recognises as an earlier sweep).
pub const FILES: [&str; 3] = crate::output::previous::SWEEP_FILES;

fn progress_bar(quiet: bool, layers: usize, what: &str) -> ProgressBar {
    let template = format!("{what}: layer {{pos}}/{{len}} {{wide_bar}} {{elapsed}}");
    super::progress_bar(!quiet, layers as u64, &template)
}

/// What every configuration is scored on: the model, the tokens, the fits' inputs.
struct Bench<'a> {
    checkpoint: &'a Checkpoint,
    llama: &'a Llama<'a>,
    ids: &'a [u32],
    ctx: usize,
    inputs: &'a FitInputs,
    /// The calibration, for the configurations that refit `o_proj` or calibrate sequentially (a
    /// pass each).
    calibrator: Option<&'a Calibrator<'a>>,
    /// What the one-shot pass kept for the configurations' `o_proj` refits.
    kept: &'a Kept,
    quiet: bool,
    /// Configurations plus the base.
    total: usize,
}

impl Bench<'_> {
    fn say(&self, line: String) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// Scores the unmodified model; returns its record and the number of predictions scored.
    fn base(&self) -> Result<(BaseRecord, usize)> {
        let c = &self.checkpoint.config;
        let clock = Instant::now();
        let what = format!("[1/{}] base", self.total);
        let bar = progress_bar(self.quiet, c.num_layers, &what);
        let (nll, count) = negative_log_likelihood(self.llama, self.ids, self.ctx, |_| bar.inc(1))?;
        bar.finish_and_clear();
        let (perplexity, nll_mean) = record::perplexity(nll, count);
        let base = BaseRecord {
            perplexity,
            nll_mean,
            kv_cache_values_per_token: 2 * c.kv_dim() as u64 * c.num_layers as u64,
            seconds: clock.elapsed().as_secs_f64(),
        };
        self.say(format!(
            "{what}: perplexity {perplexity:.4} ({:.1}s)",
            base.seconds
        ));
        Ok((base, count))
    }

    /// Scores configuration `config` (number `i` from 0) against the base perplexity.
    fn config(&self, i: usize, config: &SweepConfig, base: f64) -> Result<ConfigRecord> {
        let c = &self.checkpoint.config;
        let clock = Instant::now();
        let label = config.label();
        let mut groups = plan::groups(self.checkpoint, &config.surgery());
        let what = format!("[{}/{}] {label}", i + 2, self.total);
        // Sequential calibration and compensation depend on the configuration: a pass of their
        // own, before scoring.
        let own = match self.calibrator {
            Some(calibrator) => {
                calibrator.resolve_budgets(&mut groups, self.inputs, config.allocation)?;
                let passes = crate::commands::calibration_passes(config.mode, &groups);
                match passes {
                    Passes::OneShot => None,
                    Passes::OneShotRefit => {
                        self.say(format!("{what}: {} calibration", passes.name()));
                        Some(calibrator.refit(&groups, (self.inputs, self.kept))?)
                    }
                    Passes::Sequential { .. } => {
                        self.say(format!("{what}: {} calibration", passes.name()));
                        Some(calibrator.sequential(&groups)?)
                    }
                }
            }
            None => {
                resolve_budgets(self.checkpoint, &mut groups, self.inputs, None)?;
                None
            }
        };
        let inputs = own.as_ref().unwrap_or(self.inputs);
        let bar = progress_bar(self.quiet, c.num_layers, &what);
        let evaluation =
            evaluate::evaluate(self.llama, &groups, inputs, self.ids, self.ctx, |_| {
                bar.inc(1)
            })?;
        bar.finish_and_clear();
        let r = record::config_record(
            config,
            &evaluation,
            c.num_layers,
            c.kv_dim() as u64,
            base,
            clock.elapsed().as_secs_f64(),
        );
        self.say(format!(
            "{what}: K/V {} -> {} values per token, perplexity {:.4} (x{:.3}) ({:.1}s)",
            r.kv_cache_values_per_token.before,
            r.kv_cache_values_per_token.after,
            r.perplexity,
            r.ratio_to_base,
            r.seconds
        ));
        Ok(r)
    }
}

/// Runs the sweep, writes its directory and returns the report.
pub fn run(options: &SweepOptions) -> Result<()> {
    let started = Instant::now();
    let configs = options.configs();
    let out = Some((options.out.as_path(), options.force));
    let (input, out, checkpoint) =
        super::open_input(&options.input, &options.revision, !options.quiet, out)?;
    let out = out.ok_or_else(|| Error::bug("sweep: --out was not checked"))?;
    checkpoint.require_dense(&options.input)?;
    let llama = Llama::new(&checkpoint)?;
    let w = &options.window;
    let ctx = w.ctx.get();
    let span = TextSpan {
        offset: w.offset,
        tokens: w.tokens.get(),
    };
    let text = read_text(
        &input.dir,
        &w.text,
        &crate::commands::EVAL_FLAGS,
        w.bos,
        span,
    )?;
    let windows = text.windows(w.offset, w.tokens.get(), ctx)?;
    let all_groups: Vec<_> = configs
        .iter()
        .flat_map(|c| plan::groups(&checkpoint, &c.surgery()))
        .collect();
    evaluate::refuse_shared_biases(&llama, &all_groups)?;
    let bars = crate::commands::progress::PassBars::new(!options.quiet);
    let calibrator = match &options.calibration {
        Some(c) => Some(Calibrator::new(&checkpoint, c, &bars)?),
        None => None,
    };
    let (inputs, kept) = match &calibrator {
        Some(calibrator) => {
            let keep = keep_for_refits(calibrator, &checkpoint, &configs);
            calibrator.one_shot(&all_groups, &keep)?
        }
        None => (FitInputs::default(), Kept::default()),
    };
    drop(all_groups);

    let bench = Bench {
        checkpoint: &checkpoint,
        llama: &llama,
        ids: &windows.ids,
        ctx,
        inputs: &inputs,
        calibrator: calibrator.as_ref(),
        kept: &kept,
        quiet: options.quiet,
        total: configs.len() + 1,
    };
    let (base, count) = bench.base()?;
    let records = configs
        .iter()
        .enumerate()
        .map(|(i, config)| bench.config(i, config, base.perplexity))
        .collect::<Result<Vec<_>>>()?;
    let c = &checkpoint.config;
    let report = SweepReport {
        tool: Tool::current(),
        command: options.reproduce_command(),
        model: SweepModel {
            identity: input.identity.clone(),
            architecture: c.class_name.clone(),
            shape: ModelRecord::of(c),
        },
        text: TextRecord {
            file: w.text.to_string(),
            sha256: text.sha256.clone(),
            offset: w.offset,
            tokens: count,
            ctx,
            windows: windows.selection.windows,
            bos: text.bos.clone(),
            unknown_tokens: windows.unknown_tokens,
        },
        calibration: inputs.calibration.clone(),
        base,
        configs: records,
        seconds: started.elapsed().as_secs_f64(),
    };
    write(&out, &report)?;
    bench.say(format!(
        "wrote {} ({}) in {:.1}s",
        options.out.display(),
        FILES.join(", "),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What the shared one-shot pass keeps for the configurations that refit `o_proj` after it.
fn keep_for_refits(
    calibrator: &Calibrator,
    checkpoint: &Checkpoint,
    configs: &[SweepConfig],
) -> Keep {
    let mut keep = Keep::default();
    for config in configs {
        let groups = plan::groups(checkpoint, &config.surgery());
        if crate::commands::calibration_passes(config.mode, &groups) == Passes::OneShotRefit {
            keep.extend(calibrator.keep_for(&groups));
        }
    }
    keep
}

/// Writes the three files into a staging directory and moves it to `out`.
fn write(out: &OutTarget, report: &SweepReport) -> Result<()> {
    let [json_name, md_name, svg_name] = FILES;
    let json = serde_json::to_value(report).map_err(|source| Error::Json {
        path: json_name.into(),
        source,
    })?;
    let json = crate::model::latent::to_pretty_bytes(&json, Path::new(json_name))?;
    let svg = plot::svg(report).map_err(|e| {
        Error::invalid(
            out.path.join(svg_name),
            format!("cannot draw the plot: {e}"),
        )
    })?;
    let staging = Staging::create(out)?;
    write_file(&staging.path().join(json_name), &json)?;
    write_file(
        &staging.path().join(md_name),
        table::markdown(report).as_bytes(),
    )?;
    write_file(&staging.path().join(svg_name), svg.as_bytes())?;
    staging.commit()
}
