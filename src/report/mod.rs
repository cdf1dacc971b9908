//! The conversion report: `surgery.json` (deterministic: no times, no output path) and the summary
//! table printed on stderr.

use crate::llama::calibrate::CalibrationRecord;
use crate::input::checkpoint::Checkpoint;
use crate::options::ConvertOptions;
use crate::execute::GroupReport;
use crate::plan::{Emit, Plan};
use crate::input::source::InputIdentity;
pub use crate::digest::FileRecord;
use serde::Serialize;
use std::fmt::Write as _;

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

impl Report {
    /// Assembles the report.
    #[allow(clippy::too_many_arguments)] // one call site per output form; a builder would add nothing
    pub fn build(
        options: &ConvertOptions,
        identity: &InputIdentity,
        checkpoint: &Checkpoint,
        plan: &Plan,
        groups: Vec<GroupReport>,
        calibration: Option<&CalibrationRecord>,
        weight_files: Vec<FileRecord>,
        output_sizes: Option<&[u64]>,
    ) -> Report {
        let c = &checkpoint.config;
        let s = &options.surgery;
        let kv_dim = c.kv_dim() as u64;
        let zero = BeforeAfter {
            before: 0,
            after: 0,
        };
        let mut layers: Vec<LayerRecord> = (0..c.num_layers)
            .map(|layer| LayerRecord {
                layer,
                groups: Vec::new(),
                params: zero,
                bytes: zero,
                kv_cache_values_per_token: BeforeAfter {
                    before: 2 * kv_dim,
                    after: 2 * kv_dim,
                },
            })
            .collect();
        for g in &groups {
            let l = &mut layers[g.layer];
            l.params.before += g.params_original;
            l.params.after += g.params_factored;
            l.bytes.before += g.bytes_original;
            l.bytes.after += g.bytes_factored;
            l.groups.push(g.clone());
        }
        for l in &mut layers {
            l.kv_cache_values_per_token.after = kv_values_per_token(&l.groups, kv_dim);
        }
        let mut variance: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        for g in &groups {
            let e = variance.entry(g.kind.to_string()).or_default();
            e.0 += g.variance_kept;
            e.1 += 1;
        }
        let params = |t: &crate::plan::TensorPlan| t.shape.iter().product::<usize>() as u64;
        let model_params = BeforeAfter {
            before: checkpoint
                .tensors
                .iter()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum(),
            after: plan
                .shards
                .iter()
                .flat_map(|s| &s.tensors)
                .map(params)
                .sum(),
        };
        let totals = Totals {
            decompositions: groups.len(),
            params: BeforeAfter {
                before: groups.iter().map(|g| g.params_original).sum(),
                after: groups.iter().map(|g| g.params_factored).sum(),
            },
            bytes: BeforeAfter {
                before: groups.iter().map(|g| g.bytes_original).sum(),
                after: groups.iter().map(|g| g.bytes_factored).sum(),
            },
            model_params,
            model_bytes: BeforeAfter {
                before: checkpoint
                    .tensors
                    .iter()
                    .map(|t| t.range.len() as u64)
                    .sum(),
                after: plan.data_len(),
            },
            kv_cache_values_per_token: BeforeAfter {
                before: layers
                    .iter()
                    .map(|l| l.kv_cache_values_per_token.before)
                    .sum(),
                after: layers
                    .iter()
                    .map(|l| l.kv_cache_values_per_token.after)
                    .sum(),
            },
            mean_variance_kept: variance
                .into_iter()
                .map(|(k, (sum, n))| (k, sum / n as f64))
                .collect(),
        };
        let spec = |x: Option<crate::fit::spec::Spec>| x.map(|s| s.to_string());
        Report {
            tool: Tool::current(),
            command: options.reproduce_command(),
            options: OptionsRecord {
                shared_kv: spec(s.shared_kv),
                q: spec(s.q),
                k: spec(s.k),
                v: spec(s.v),
                fit: s.fit.name(),
                emit: plan.emit.name(),
                max_shard_size: options.max_shard_size,
                calibration: calibration.cloned(),
            },
            input: InputRecord {
                identity: identity.clone(),
                architecture: c.class_name.clone(),
                weight_files,
                skipped_files: checkpoint
                    .skipped_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            },
            model: ModelRecord {
                num_layers: c.num_layers,
                hidden_size: c.hidden_size,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
            },
            output: OutputRecord {
                emit: plan.emit.name(),
                weight_files: plan
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(i, sh)| ShardRecord {
                        name: sh.file_name.clone(),
                        tensors: sh.tensors.len(),
                        bytes: output_sizes
                            .and_then(|s| s.get(i).copied())
                            .unwrap_or_else(|| sh.data_len()),
                    })
                    .collect(),
                index: plan.write_index,
                copied_files: plan
                    .copied_files()
                    .map(|p| p.display().to_string())
                    .collect(),
            },
            layers,
            totals,
        }
    }

    /// The human summary: one row per layer, then totals.
    pub fn summary(&self, seconds: f64, out: Option<&str>) -> String {
        let kinds: Vec<&str> = ["q", "k", "v", "shared_kv"]
            .into_iter()
            .filter(|k| {
                self.layers
                    .iter()
                    .any(|l| l.groups.iter().any(|g| g.kind == *k))
            })
            .collect();
        let mut s = String::new();
        let _ = write!(s, "{:>5}", "layer");
        for k in &kinds {
            let _ = write!(s, "  {:>22}", format!("{k} rank (var kept)"));
        }
        let _ = writeln!(s, "  {:>9}  {:>14}", "max err", "kv/token");
        for l in &self.layers {
            let _ = write!(s, "{:>5}", l.layer);
            let mut max_err = 0.0f64;
            for k in &kinds {
                match l.groups.iter().find(|g| g.kind == *k) {
                    Some(g) => {
                        max_err = max_err.max(g.relative_error);
                        let _ = write!(
                            s,
                            "  {:>22}",
                            format!("{}/{} ({:.3})", g.rank, g.full_rank, g.variance_kept)
                        );
                    }
                    None => {
                        let _ = write!(s, "  {:>22}", "-");
                    }
                }
            }
            let kv = l.kv_cache_values_per_token;
            let _ = writeln!(
                s,
                "  {:>9.4}  {:>14}",
                max_err,
                format!("{} -> {}", kv.before, kv.after)
            );
        }
        let t = &self.totals;
        let kv = t.kv_cache_values_per_token;
        let pct = |a: u64, b: u64| {
            if a == 0 {
                0.0
            } else {
                100.0 * (b as f64 - a as f64) / a as f64
            }
        };
        let factored = self.output.emit == Emit::Factored.name();
        let _ = writeln!(
            s,
            "{} decompositions (fit {}, emit {})",
            t.decompositions, self.options.fit, self.output.emit
        );
        let _ = writeln!(
            s,
            "KV cache per token{}: {} -> {} values ({:+.1}%); decomposed params{}: {} -> {} ({:+.1}%)",
            if factored { "" } else { " if factored" },
            group_digits(kv.before),
            group_digits(kv.after),
            pct(kv.before, kv.after),
            if factored { "" } else { " if factored" },
            group_digits(t.params.before),
            group_digits(t.params.after),
            pct(t.params.before, t.params.after),
        );
        if factored {
            let _ = writeln!(
                s,
                "model: {} -> {} parameters, {} -> {} bytes of weights ({:+.1}%)",
                group_digits(t.model_params.before),
                group_digits(t.model_params.after),
                group_digits(t.model_bytes.before),
                group_digits(t.model_bytes.after),
                pct(t.model_bytes.before, t.model_bytes.after),
            );
        }
        for g in self
            .layers
            .iter()
            .flat_map(|l| &l.groups)
            .filter(|g| g.rank_clamped)
        {
            let _ = writeln!(
                s,
                "note: layer {} {}: {} exceeds the maximum rank {}; clamped",
                g.layer, g.kind, g.spec, g.full_rank
            );
        }
        match out {
            Some(out) => {
                let bytes: u64 = self.output.weight_files.iter().map(|f| f.bytes).sum();
                let _ = writeln!(
                    s,
                    "wrote {out} ({} weight files, {} bytes) in {seconds:.2}s",
                    self.output.weight_files.len(),
                    group_digits(bytes)
                );
            }
            None => {
                let _ = writeln!(s, "dry run: nothing written ({seconds:.2}s)");
            }
        }
        s
    }
}

/// K and V values one layer caches per token in the factored form, given that layer's groups:
/// the shared latent width (`r + m`), else each of K and V's latent width, or `kv_dim` for a
/// projection left untouched.
pub fn kv_values_per_token(layer_groups: &[GroupReport], kv_dim: u64) -> u64 {
    let latent_of = |kind: &str| {
        layer_groups
            .iter()
            .find(|g| g.kind == kind)
            .map(|g| g.latent as u64)
    };
    match latent_of("shared_kv") {
        Some(r) => r,
        None => latent_of("k").unwrap_or(kv_dim) + latent_of("v").unwrap_or(kv_dim),
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
