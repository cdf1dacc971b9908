//! The decomposition floor of a conversion (`surgery-dev bench-decompose`, used by
//! `scripts/bench`): every group's matrix is decoded into memory first, then only the fits are
//! timed, in parallel across matrices as the conversion runs them.

use crate::calibrate::progress::{Progress, Silent};
use crate::calibrate::text::CalibrationText;
use crate::calibrate::{calibrate, Passes};
use crate::error::Result;
use crate::execute::group::{fit_group, release_members, stack_group};
use crate::execute::FitInputs;
use crate::fit::decompose::Decomposition;
use crate::forward::{Llama, PassState};
use crate::input::checkpoint::Checkpoint;
use crate::input::source;
use crate::options::{CalibrateMode, ConvertOptions};
use crate::plan::{self, GroupPlan};
use faer::Mat;
use rayon::prelude::*;

/// The decision of which calibration passes run (the commands' `calibration_passes`).
pub type DecidePasses = fn(CalibrateMode, &[GroupPlan]) -> Passes;

/// The calibration stage of the conversion `options` describes, its passes decided by `passes`.
fn calibrated(
    checkpoint: &Checkpoint,
    options: &ConvertOptions,
    groups: &mut [GroupPlan],
    (passes, progress): (DecidePasses, &dyn Progress),
) -> Result<FitInputs> {
    let calibration = options
        .calibration
        .as_ref()
        .map(|c| (c, passes(c.mode, groups)));
    calibrate(checkpoint, calibration, groups, progress)
}

/// The pass running (its name and start) and the passes timed, in order.
type Timed = (
    Option<(&'static str, std::time::Instant)>,
    Vec<(&'static str, f64)>,
);

/// Each calibration pass's seconds, as the stage reports them.
#[derive(Default)]
pub struct PassTimes {
    running: std::sync::Mutex<Timed>,
}

impl PassTimes {
    /// The passes timed so far, in order.
    pub fn passes(&self) -> Vec<(&'static str, f64)> {
        self.running.lock().map(|r| r.1.clone()).unwrap_or_default()
    }
}

impl Progress for PassTimes {
    fn start(&self, pass: &'static str, _layers: usize, _tokens: usize) {
        if let Ok(mut r) = self.running.lock() {
            r.0 = Some((pass, std::time::Instant::now()));
        }
    }

    fn finish(&self) {
        if let Ok(mut r) = self.running.lock() {
            if let Some((pass, started)) = r.0.take() {
                r.1.push((pass, started.elapsed().as_secs_f64()));
            }
        }
    }
}

/// The floor of the conversion `options` describes: the seconds its fits take and their number.
pub fn decompose_floor(options: &ConvertOptions, passes: DecidePasses) -> Result<(f64, usize)> {
    let input = source::resolve(&options.input, &options.revision, false)?;
    let checkpoint = Checkpoint::open(&input.dir)?;
    let mut groups = plan::groups(&checkpoint, &options.surgery);
    let inputs = calibrated(&checkpoint, options, &mut groups, (passes, &Silent))?;
    let seconds = fits_alone(&checkpoint, &groups, &inputs)?;
    Ok((seconds, groups.len()))
}

/// Seconds taken by the fits of `groups` alone, in parallel across matrices, with every matrix
/// decoded into memory beforehand.
fn fits_alone(checkpoint: &Checkpoint, groups: &[GroupPlan], inputs: &FitInputs) -> Result<f64> {
    let matrices: Vec<Mat<f64>> = groups
        .par_iter()
        .map(|group| {
            let (_, w) = stack_group(checkpoint, group)?;
            release_members(checkpoint, group);
            Ok(w)
        })
        .collect::<Result<_>>()?;
    let started = std::time::Instant::now();
    let fits: Vec<Result<Decomposition>> = groups
        .par_iter()
        .zip(matrices)
        .map(|(group, w)| fit_group(checkpoint, group, inputs, w, group.effective_spec()))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    for fit in fits {
        fit?;
    }
    Ok(seconds)
}

/// The calibration pass of the conversion `options` describes, alone (`surgery-dev
/// bench-calibrate`; sequential calibration: with its one-shot pass for the budgets, and the fits
/// it runs as it goes): its seconds and the number of cross moments it accumulates (`--share
/// latent`); writes nothing. Run it under `/usr/bin/time -v` for its peak memory.
pub fn calibration_cost(
    options: &ConvertOptions,
    passes: DecidePasses,
    times: &PassTimes,
) -> Result<(f64, usize)> {
    let input = source::resolve(&options.input, &options.revision, false)?;
    let checkpoint = Checkpoint::open(&input.dir)?;
    let mut groups = plan::groups(&checkpoint, &options.surgery);
    let started = std::time::Instant::now();
    let inputs = calibrated(&checkpoint, options, &mut groups, (passes, times))?;
    Ok((started.elapsed().as_secs_f64(), inputs.cross.len()))
}

/// One forward pass of the original model over the calibration tokens of the conversion
/// `options` describes (`surgery-dev bench-forward`): the layers over the same windows the
/// calibration passes run, then the output head (final norm, logits and their log-likelihood),
/// which calibration never runs. Returns the seconds of the layers and of the head (the text's
/// reading and tokenizing not counted) and the number of positions.
pub fn forward_cost(options: &ConvertOptions) -> Result<(f64, f64, usize)> {
    let input = source::resolve(&options.input, &options.revision, false)?;
    let checkpoint = Checkpoint::open(&input.dir)?;
    let Some(calibration) = options.calibration.as_ref() else {
        return Err(crate::error::Error::usage(
            "--fit",
            "bench-forward times the calibration tokens' forward pass: give --fit act",
        ));
    };
    let text = CalibrationText::load(&checkpoint, calibration)?;
    let llama = Llama::new(&checkpoint)?;
    let started = std::time::Instant::now();
    let mut h = llama.embed(&text.ids)?;
    let mut state = PassState::default();
    for index in 0..llama.params().num_layers {
        llama
            .layer(index)?
            .forward(&mut h, text.ctx(), &mut state)?;
    }
    let layers = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    llama.log_likelihood(h.as_ref(), &text.ids, text.ctx())?;
    Ok((layers, started.elapsed().as_secs_f64(), text.ids.len()))
}
