//! One configuration of a sweep evaluated in memory: the forward pass of `eval`, layer by layer,
//! with each layer's fitted projections swapped for their reconstructions as that layer is reached
//! ([`crate::calibrate::substitute`]): fitted only then, encoded in the projection's dtype exactly as
//! a conversion writes them, decoded to `f32`, and dropped with the layer, so memory stays one
//! layer's worth.

use crate::calibrate::substitute::Substitution;
use crate::error::{Error, Result};
use crate::execute::{FitInputs, GroupReport};
use crate::forward::score::negative_log_likelihood_edited;
use crate::forward::Llama;
use crate::plan::GroupPlan;

/// What evaluating one configuration gave.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Summed negative log-likelihood (nats).
    pub nll: f64,
    /// Predictions scored.
    pub count: usize,
    /// Every group's report, in group order.
    pub reports: Vec<GroupReport>,
}

/// Refuses sharing across layers on a model with attention biases whose family's factored form
/// has no bias terms (Llama's), as a factored conversion does (plan/factored.rs): a group shared
/// across layers is scored in its factored form. Checked once for the whole grid, before anything
/// is scored.
pub(crate) fn refuse_shared_biases(llama: &Llama, groups: &[GroupPlan]) -> Result<()> {
    let factored_biases = llama.checkpoint().config.arch.factored_biases();
    if llama.params().family.biases.qkv
        && !factored_biases
        && groups.iter().any(|g| g.share.is_some())
    {
        return Err(Error::invalid(
            llama.checkpoint().dir.join(crate::model::layout::CONFIG_FILE),
            "--share-layers: the factored form of a group shared across layers has no bias terms, and this model's attention has biases (attention_bias)",
        ));
    }
    Ok(())
}

/// Runs the forward pass over `ids` (windows of `ctx`) with `groups` fitted and substituted layer by
/// layer. `progress` is told each finished layer.
pub fn evaluate(
    llama: &Llama<'_>,
    groups: &[GroupPlan],
    inputs: &FitInputs,
    ids: &[u32],
    ctx: usize,
    progress: impl FnMut(usize),
) -> Result<Evaluation> {
    let mut substitution = Substitution::new(llama.checkpoint(), groups);
    let mut reports = Vec::with_capacity(groups.len());
    let (nll, count) = negative_log_likelihood_edited(
        llama,
        ids,
        ctx,
        |layer| {
            reports.extend(substitution.apply(layer, inputs)?);
            Ok(())
        },
        progress,
    )?;
    Ok(Evaluation {
        nll,
        count,
        reports,
    })
}
