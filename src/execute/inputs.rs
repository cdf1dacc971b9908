//! What the fits read besides the weights ([`FitInputs`]): the statistics calibration measured
//! (the calibration stage produces them), the `o_proj` refits it made, and the bases the factored
//! layout's width pass kept. Plain data: the executor reads it, never computes it.

use crate::fit::act::ActWeighting;
use crate::model::bos::BosToken;
use crate::scratch::{Moment, SpilledBytes};
use serde::Serialize;

/// What the fits need besides the weights.
#[derive(Debug, Clone, Default)]
pub struct FitInputs {
    /// Per layer, the covariance of the attention input (`--calibrate`), for fit `act`.
    pub covariances: Option<Vec<Moment>>,
    /// `E[x_l x_s^T]` of layer `l` with a shared latent group's source layer `s`, by `(l, s)`
    /// (sequential calibration: `x_l` the original model's input, `x_s` the compressed model's).
    pub cross: std::collections::BTreeMap<(usize, usize), Moment>,
    /// Sequential calibration (`--calibrate-mode sequential`): per layer, from layer 0 on, the
    /// moments of the compressed model's attention input (none for the later layers of a shared
    /// latent group: they read their source's latent); empty for one-shot calibration.
    pub sequential: Vec<Option<SequentialMoments>>,
    /// Per layer, its `o_proj` as calibration refitted it (`--compensate o_proj`).
    pub compensated: std::collections::BTreeMap<usize, CompensatedProjection>,
    /// How fit `act` weighs output errors.
    pub weighting: ActWeighting,
    /// Per layer, what calibration measured of its attention beyond the input moment (one-shot
    /// calibration; empty otherwise).
    pub attention: Vec<AttentionStats>,
    /// Where the covariances came from.
    pub calibration: Option<CalibrationRecord>,
    /// The weight-only bases the factored layout's width pass decomposed, for the write pass's
    /// fits to finish.
    pub bases: super::kept_bases::KeptBases,
    /// One-shot calibration's weighted spectra, computed by a group's first activation-aware fit
    /// for its later ones (off unless calibration switches it on).
    pub spectra: super::kept_spectra::KeptSpectra,
}

/// One layer's moments in sequential calibration: `x_c` is the attention input of the model with
/// the layers below compressed, `x_o` the original model's.
#[derive(Debug, Clone)]
pub struct SequentialMoments {
    /// `E[x_c x_c^T]`, `[hidden, hidden]`.
    pub compressed: Moment,
    /// `E[x_o x_c^T]`, `[hidden, hidden]`.
    pub target: Moment,
}

impl FitInputs {
    /// Layer `layer`'s sequential moments, if calibration is sequential.
    pub fn sequential_at(&self, layer: usize) -> Option<&SequentialMoments> {
        self.sequential.get(layer).and_then(Option::as_ref)
    }
}

/// What calibration measured of one layer's attention beyond its input moment: the pieces of the
/// family's own score function that `W_q C W_q^T` leaves out, and the BOS position (the sink).
#[derive(Debug, Clone, Default)]
pub struct AttentionStats {
    /// Per KV head, summed over the query heads reading it, the second moment of the queries as
    /// the scores read them (after the family's per-head `q_norm`), `[kv_dim, kv_dim]`
    /// block-diagonal; `None` where the family has no query norm (then `W_q C W_q^T` is exact).
    pub queries: Option<Moment>,
    /// The effective weights of the per-head `k_norm` (`head_dim`), where the family has one.
    pub key_gain: Option<Vec<f64>>,
    /// The effective weights of the norm on the attention block's output (Gemma's
    /// `post_attention_layernorm`, `hidden`), where the family has one.
    pub output_gain: Option<Vec<f64>>,
    /// The attention input at a window's first position when windows start with a BOS: the same
    /// in every window (position 0 sees itself only), `hidden`.
    pub sink: Option<Vec<f64>>,
}

/// The calibration's provenance.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationRecord {
    /// The text file as given, or `built-in:calibration`.
    pub file: String,
    /// Its SHA-256.
    pub sha256: String,
    /// First token used (of the whole file's tokens, no special tokens).
    pub offset: usize,
    /// Text tokens used.
    pub tokens: usize,
    /// Window length of the forward pass (positions, a BOS included).
    pub ctx: usize,
    /// The token every window starts with (`null`: none, the windows are text alone).
    pub bos: Option<BosToken>,
    /// Text tokens that are the tokenizer's unknown token (`<unk>`): text it cannot represent.
    pub unknown_tokens: usize,
    /// Where the windows start with a BOS: `exact` (the fits keep its keys and values exactly) or
    /// `fitted` (`--bos-sink`); absent without a BOS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_sink: Option<&'static str>,
    /// How the built-in text's dialogue was written for this model: `chat template` (its own,
    /// as instruct models are used) or `plain text` (absent for a `--calibrate` file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialogue: Option<&'static str>,
    /// `sequential` for sequential calibration (absent: one-shot, the original model's inputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// `sensitivity` when `budget:F` was allocated by measured sensitivity (absent: by spectra).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<&'static str>,
}

/// A layer's `o_proj` as calibration refitted it.
#[derive(Debug, Clone)]
pub struct CompensatedProjection {
    /// Index of the input tensor it replaces in [`Checkpoint::tensors`].
    pub tensor: usize,
    /// The refitted weight encoded in the tensor's dtype, as written (in the scratch file).
    pub bytes: SpilledBytes,
    /// What the refit changed.
    pub report: CompensationReport,
}

/// What the refit of one tensor changed, as recorded in `surgery.json`.
#[derive(Debug, Clone, Serialize)]
pub struct CompensationReport {
    /// The layer.
    pub layer: usize,
    /// The tensor rewritten.
    pub tensor: String,
    /// `||O' - O||_F / ||O||_F`, `O'` as written.
    pub relative_change: f64,
    /// On the calibration tokens, `||O z_c - O z_o|| / ||O z_o||`: the attention block's output
    /// error with the original `o_proj` on the compressed heads.
    pub calibration_error_before: f64,
    /// The same with the refitted `O'` (as written): `||O' z_c - O z_o|| / ||O z_o||`.
    pub calibration_error_after: f64,
}
