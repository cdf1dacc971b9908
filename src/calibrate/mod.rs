//! The calibration stage: everything that runs the model over calibration text, and what it
//! produces for the fits ([`FitInputs`]: moments, `o_proj` refits, the record) and for the plan
//! (the ranks of `budget:F` SPECs).
//!
//! The text is read and tokenized once ([`text::CalibrationText`]); which passes run over it is
//! one [`Passes`] value, decided once by the command (`convert`, `sweep`) and handed down:
//!
//! - [`Passes::OneShot`]: the original model once, every layer's moments ([`one_shot`]).
//! - [`Passes::OneShotRefit`]: the same pass, which also keeps each refitted layer's input and
//!   heads' outputs in the scratch file; the refit then runs the attention block alone per layer
//!   ([`refit`]): `--compensate o_proj` costs a fraction of a pass, not two.
//! - [`Passes::Sequential`]: two streams, the original model and the compressed one so far
//!   ([`sequential`]); preceded by the one-shot pass where `budget:F` needs spectra.
//!
//! Budgets ([`budgets`]) are resolved between the one-shot pass and what follows it, so the
//! compressed model the later passes run is the one the plan will write. Files: `text.rs` (the
//! text), `moments.rs` (the sums), `one_shot.rs`, `refit.rs` with `compensation.rs` (one layer's
//! refit), `sequential.rs`, `budgets.rs` with `sensitivity.rs` (the probes of
//! `--budget-allocation sensitivity`), `substitute.rs` (fitted groups swapped into forward-pass
//! layers: the compressed model the passes and `sweep` run).

pub mod budgets;
pub(crate) mod compensation;
pub mod moments;
pub mod one_shot;
pub mod progress;
pub mod refit;
pub(crate) mod sensitivity;
pub(crate) mod sequential;
pub mod substitute;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_families;
pub mod text;

use crate::error::Result;
use crate::execute::{FitInputs, KeptSpectra};
use crate::forward::Llama;
use crate::input::checkpoint::Checkpoint;
use crate::options::{Allocation, Calibration};
use crate::plan::GroupPlan;
use crate::scratch::Scratch;
use one_shot::Keep;
use progress::Progress;
use text::CalibrationText;

/// Which passes over the calibration text a run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// The one-shot pass alone: the original model's moments.
    OneShot,
    /// The one-shot pass, keeping what the `o_proj` refit reads, then the refit (attention blocks
    /// alone).
    OneShotRefit,
    /// The two-stream sequential pass; `one_shot_first`: the one-shot pass runs before it, for the
    /// spectra the budgets are spent on.
    Sequential {
        /// Whether the one-shot pass runs first.
        one_shot_first: bool,
    },
}

impl Passes {
    /// Short name, for progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Passes::OneShot => "one-shot",
            Passes::OneShotRefit => "one-shot + o_proj refit",
            Passes::Sequential { .. } => "sequential",
        }
    }
}

/// One run's calibration: the model, its text (tokenized once) and the scratch file the passes
/// keep their results in.
pub struct Calibrator<'a> {
    llama: Llama<'a>,
    calibration: &'a Calibration,
    text: CalibrationText,
    scratch: Scratch,
    progress: &'a dyn Progress,
}

impl<'a> Calibrator<'a> {
    /// Reads and tokenizes `calibration`'s text for `checkpoint`; the passes will tell
    /// `progress` how they go.
    pub fn new(
        checkpoint: &'a Checkpoint,
        calibration: &'a Calibration,
        progress: &'a dyn Progress,
    ) -> Result<Self> {
        Ok(Calibrator {
            llama: Llama::new(checkpoint)?,
            calibration,
            text: CalibrationText::load(checkpoint, calibration)?,
            scratch: Scratch::new()?,
            progress,
        })
    }

    /// What the one-shot pass must keep for the `o_proj` refit of `groups`.
    pub fn keep_for(&self, groups: &[GroupPlan]) -> Keep {
        refit::keep_for(&self.llama, groups)
    }

    /// The one-shot pass over the text for `groups` (the cross moments their shared latent
    /// groups need), keeping what `keep` lists for the refit; its inputs keep the fits' weighted
    /// spectra ([`KeptSpectra`]).
    pub fn one_shot(
        &self,
        groups: &[GroupPlan],
        keep: &Keep,
    ) -> Result<(FitInputs, one_shot::Kept)> {
        let mut pairs: Vec<(usize, usize)> =
            groups.iter().flat_map(GroupPlan::cross_pairs).collect();
        pairs.sort_unstable();
        pairs.dedup();
        let weighting = self.calibration.weighting;
        let (mut inputs, kept) = one_shot::one_shot(
            &self.llama,
            &self.text,
            &pairs,
            (keep, weighting),
            (&self.scratch, self.progress),
        )?;
        // Its moments are final: each group's weighted spectrum is computed by its first fit
        // (the budgets' spectra) and kept for the refit's and the write pass's.
        inputs.spectra = KeptSpectra::on(self.scratch.clone());
        Ok((inputs, kept))
    }

    /// Resolves `groups`' budgets on `inputs`, by measured sensitivity where `allocation` asks.
    pub fn resolve_budgets(
        &self,
        groups: &mut [GroupPlan],
        inputs: &FitInputs,
        allocation: Allocation,
    ) -> Result<()> {
        let probe = (allocation == Allocation::Sensitivity).then_some((
            &self.llama,
            &self.text,
            self.progress,
        ));
        budgets::resolve_budgets(self.llama.checkpoint(), groups, inputs, probe)
    }

    /// `one_shot` (the pass's inputs, with what it kept) with the `o_proj` refits of `groups`.
    pub fn refit(
        &self,
        groups: &[GroupPlan],
        (one_shot, kept): (&FitInputs, &one_shot::Kept),
    ) -> Result<FitInputs> {
        let mut inputs = one_shot.clone();
        refit::refit(
            &self.llama,
            self.text.ctx(),
            groups,
            (&mut inputs, kept),
            (&self.scratch, self.progress),
        )?;
        Ok(inputs)
    }

    /// The sequential pass for `groups` (budgets resolved).
    pub fn sequential(&self, groups: &[GroupPlan]) -> Result<FitInputs> {
        sequential::sequential(
            &self.llama,
            &self.text,
            groups,
            self.calibration.weighting,
            (&self.scratch, self.progress),
        )
    }
}

/// The calibration stage of a conversion: runs `passes` over `calibration`'s text for `groups`
/// and resolves their budgets (weight-only without calibration), telling `progress` how the
/// passes go. Returns what the fits read.
pub fn calibrate(
    checkpoint: &Checkpoint,
    calibration: Option<(&Calibration, Passes)>,
    groups: &mut [GroupPlan],
    progress: &dyn Progress,
) -> Result<FitInputs> {
    let Some((calibration, passes)) = calibration else {
        let inputs = FitInputs::default();
        budgets::resolve_budgets(checkpoint, groups, &inputs, None)?;
        return Ok(inputs);
    };
    let calibrator = Calibrator::new(checkpoint, calibration, progress)?;
    let allocation = calibration.allocation;
    match passes {
        Passes::OneShot => {
            let (inputs, _) = calibrator.one_shot(groups, &Keep::default())?;
            calibrator.resolve_budgets(groups, &inputs, allocation)?;
            Ok(inputs)
        }
        Passes::OneShotRefit => {
            let keep = calibrator.keep_for(groups);
            let (inputs, kept) = calibrator.one_shot(groups, &keep)?;
            calibrator.resolve_budgets(groups, &inputs, allocation)?;
            calibrator.refit(groups, (&inputs, &kept))
        }
        Passes::Sequential { one_shot_first } => {
            let inputs = match one_shot_first {
                true => calibrator.one_shot(groups, &Keep::default())?.0,
                false => FitInputs::default(),
            };
            calibrator.resolve_budgets(groups, &inputs, allocation)?;
            calibrator.sequential(groups)
        }
    }
}
