//! The conversion report: `surgery.json` (deterministic: no times, no output path) and the summary
//! table printed on stderr: the record types here, their assembly in [`build`], the table in
//! [`summary`], the quality check's record and line in [`check`].

mod build;
mod check;
mod summary;

pub use crate::digest::FileRecord;
use crate::execute::CalibrationRecord;
use crate::execute::CompensationReport;
use crate::execute::GroupReport;
use crate::input::source::InputIdentity;
pub use check::CheckRecord;
use serde::Serialize;

/// `surgery.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Tool name and version.
    pub tool: Tool,
    /// The command that reproduces this output (add `--out DIR`).
    pub command: String,
    /// The options that determine the output.
    pub options: OptionsRecord,
    /// Where the input came from.
    pub input: InputRecord,
    /// Model shape.
    pub model: ModelRecord,
    /// Output files.
    pub output: OutputRecord,
    /// Per-layer results.
    pub layers: Vec<LayerRecord>,
    /// Whole-model totals.
    pub totals: Totals,
    /// Tensors rewritten besides the fitted ones (`--compensate o_proj`), in layer order, with
    /// what their refit changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compensated: Vec<CompensationReport>,
    /// The quality check, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckRecord>,
    /// Where the time went (printed, never in `surgery.json`, which holds no times).
    #[serde(skip)]
    pub timings: Timings,
}

/// Where a conversion's time went, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// What the fits need first: calibration (`--fit act`) and the `budget:F` spectra.
    pub prepare: f64,
    /// The write pass, the fits running ahead of the writer inside it (none for a dry run).
    pub write: Option<f64>,
    /// The quality check (`--check`).
    pub check: Option<f64>,
}

/// Tool identity.
#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    /// `surgery-convert`.
    pub name: &'static str,
    /// Crate version.
    pub version: &'static str,
}

impl Tool {
    /// This build of the tool.
    pub fn current() -> Self {
        Tool {
            name: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// The output-determining options.
#[derive(Debug, Clone, Serialize)]
pub struct OptionsRecord {
    /// `--shared-kv`.
    pub shared_kv: Option<String>,
    /// `--q`.
    pub q: Option<String>,
    /// `--k`.
    pub k: Option<String>,
    /// `--v`.
    pub v: Option<String>,
    /// `--fit`.
    pub fit: &'static str,
    /// Output form.
    pub emit: &'static str,
    /// `--max-shard-size` in bytes.
    pub max_shard_size: Option<u64>,
    /// `--compensate` (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensate: Option<&'static str>,
    /// Calibration text and settings (`--fit act` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
}

/// Input identity and weight files.
#[derive(Debug, Clone, Serialize)]
pub struct InputRecord {
    /// Local path or hub repo.
    #[serde(flatten)]
    pub identity: InputIdentity,
    /// `architectures[0]`.
    pub architecture: String,
    /// Weight files with their size and SHA-256 (empty in a dry run, which reads no more than it must).
    pub weight_files: Vec<FileRecord>,
    /// Files of the input not carried over (other weight formats).
    pub skipped_files: Vec<String>,
}

/// The model's shape.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRecord {
    /// Layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl ModelRecord {
    /// The shape of the model `config` describes.
    pub fn of(config: &crate::model::config::ModelConfig) -> Self {
        ModelRecord {
            num_layers: config.num_layers,
            hidden_size: config.hidden_size,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        }
    }
}

/// Output files.
#[derive(Debug, Clone, Serialize)]
pub struct OutputRecord {
    /// `dense` (standard checkpoint with reconstructed matrices) or `factored`.
    pub emit: &'static str,
    /// Weight files: name, tensor count, bytes.
    pub weight_files: Vec<ShardRecord>,
    /// Whether `model.safetensors.index.json` is written.
    pub index: bool,
    /// Files copied unchanged from the input.
    pub copied_files: Vec<String>,
}

/// One output weight file.
#[derive(Debug, Clone, Serialize)]
pub struct ShardRecord {
    /// File name.
    pub name: String,
    /// Tensors in it.
    pub tensors: usize,
    /// File size in bytes (header included), or tensor data bytes in a dry run.
    pub bytes: u64,
}

/// One layer's results.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRecord {
    /// Layer index.
    pub layer: usize,
    /// Each decomposition of the layer.
    pub groups: Vec<GroupReport>,
    /// Parameters of this layer's decomposed matrices: original, and in the factored form.
    pub params: BeforeAfter,
    /// Bytes of the same, in their dtypes.
    pub bytes: BeforeAfter,
    /// K and V values cached per token by this layer: as the model is, and with the factored form
    /// (the latent width: the rank, plus one with the mean kept).
    pub kv_cache_values_per_token: BeforeAfter,
}

/// A before/after pair.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BeforeAfter {
    /// Original.
    pub before: u64,
    /// With the factored form.
    pub after: u64,
}

/// Whole-model totals.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Matrices (groups) decomposed.
    pub decompositions: usize,
    /// Parameters of the decomposed matrices, original vs factored form.
    pub params: BeforeAfter,
    /// Bytes of the decomposed matrices, original vs factored form.
    pub bytes: BeforeAfter,
    /// Parameters of the whole model: input vs this output.
    pub model_params: BeforeAfter,
    /// Tensor data bytes of the whole model: input vs this output.
    pub model_bytes: BeforeAfter,
    /// K+V values per token over all layers, original vs factored form.
    pub kv_cache_values_per_token: BeforeAfter,
    /// Mean explained variance kept, per group kind.
    pub mean_variance_kept: std::collections::BTreeMap<String, f64>,
}

/// K and V values layer `layer` caches per token in the factored form, given every group: the
/// shared latent width of the group covering it (`r + m`; 0 for a later layer of a shared latent
/// group, whose latent the group's first layer caches), else each of K and V's latent width, or
/// `kv_dim` for a projection left untouched.
pub fn kv_values_per_token(groups: &[GroupReport], layer: usize, kv_dim: u64) -> u64 {
    let covering = |kind: &str| groups.iter().find(|g| g.kind == kind && g.covers(layer));
    match covering("shared_kv") {
        Some(g) if g.share == Some("latent") && g.layer != layer => 0,
        Some(g) => g.latent as u64,
        None => {
            let latent_of = |kind| covering(kind).map_or(kv_dim, |g| g.latent as u64);
            latent_of("k") + latent_of("v")
        }
    }
}

/// `1234567` -> `1,234,567`.
pub fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn digit_grouping() {
        assert_eq!(super::group_digits(0), "0");
        assert_eq!(super::group_digits(1234567), "1,234,567");
        assert_eq!(super::group_digits(100), "100");
    }
}
