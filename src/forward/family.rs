//! What the forward pass does differently per architecture family (`model::arch::Family`), resolved
//! once from `config.json` into [`FamilyParams`]: which attention projections carry biases, the
//! per-head query/key norms, and which layers attend through a sliding window.
//!
//! | family | biases | q/k norm | sliding window |
//! |---|---|---|---|
//! | Llama | q, k, v, o with `attention_bias` | no | none |
//! | Mistral | as Llama | no | `sliding_window`, every layer |
//! | Qwen2 | q, k, v always, o never | no | `use_sliding_window`: the layers `layer_types` marks (default: from `max_window_layers` on) |
//! | Qwen3 | q, k, v, o with `attention_bias` | yes | as Qwen2 |
//! | Gemma 2 | as Llama | no | `layer_types` (default: even layers) |
//! | Gemma 3 | as Llama | yes | `layer_types` (default: all but every `sliding_window_pattern`-th) |
//! | Phi-3 | none | no | `sliding_window`, every layer |
//!
//! Phi-3's fused `qkv_proj` and `gate_up_proj` are split into their parts when the checkpoint is
//! opened (`input::fused`), so the pass reads them as Llama's; its partial rotary
//! (`partial_rotary_factor`) is resolved in `forward::params`.
//!
//! Gemma also differs in the layer itself ([`Gemma`]): `(1 + w)` norms, a norm after the attention
//! block and after the MLP, embeddings scaled by `sqrt(hidden_size)`, a GeLU-tanh MLP, queries
//! scaled by `query_pre_attn_scalar`, and (Gemma 2) soft-capped attention scores and logits.

use crate::model::arch::Family;
use crate::model::config::ModelConfig;

/// The raw keys this module reads (a part of `forward::params::RawParams`).
#[derive(Debug, Default, Clone, Copy)]
pub struct RawFamily<'a> {
    /// `attention_bias`.
    pub attention_bias: Option<bool>,
    /// `sliding_window`.
    pub sliding_window: Option<usize>,
    /// `use_sliding_window` (Qwen).
    pub use_sliding_window: Option<bool>,
    /// `max_window_layers` (Qwen, default 28).
    pub max_window_layers: Option<usize>,
    /// `layer_types` (Qwen, Gemma): `full_attention` or `sliding_attention` per layer.
    pub layer_types: Option<&'a [String]>,
    /// `sliding_window_pattern` (Gemma 3's older configs, default 6).
    pub sliding_window_pattern: Option<usize>,
    /// `query_pre_attn_scalar` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
    /// `attn_logit_softcapping` (Gemma 2; `None` also for `null`).
    pub attn_logit_softcapping: Option<f64>,
    /// `final_logit_softcapping` (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// `hidden_activation` (Gemma; default `gelu_pytorch_tanh`).
    pub hidden_activation: Option<&'a str>,
    /// `use_bidirectional_attention` (Gemma 3; only false is supported).
    pub use_bidirectional_attention: Option<bool>,
}

/// Gemma's differences in the layer itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemma {
    /// `query_pre_attn_scalar^-1/2`, the scale of the attention scores.
    pub attention_scale: f64,
    /// `attn_logit_softcapping`: scores become `c * tanh(s / c)` before the mask.
    pub attention_softcap: Option<f64>,
    /// `final_logit_softcapping`: logits become `c * tanh(l / c)`.
    pub final_softcap: Option<f64>,
}

/// Which attention projections carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Biases {
    /// `q_proj`, `k_proj`, `v_proj`.
    pub qkv: bool,
    /// `o_proj`.
    pub o: bool,
    /// What makes them present, for messages (`attention_bias`, or the family's rule).
    pub reason: &'static str,
}

/// The family's differences from Llama, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyParams {
    /// The attention biases.
    pub biases: Biases,
    /// Qwen3's per-head RMSNorm of queries and keys (`q_norm`, `k_norm`) before RoPE.
    pub qk_norm: bool,
    /// The sliding window of each layer (`None`: full causal attention).
    pub windows: Vec<Option<usize>>,
    /// Gemma's layer differences (`None` for the Llama-style families).
    pub gemma: Option<Gemma>,
}

/// `layer_types` value of a layer with a sliding window.
const SLIDING: &str = "sliding_attention";
/// `layer_types` value of a layer with full attention.
const FULL: &str = "full_attention";
/// transformers' default `max_window_layers` for Qwen2 and Qwen3.
const DEFAULT_MAX_WINDOW_LAYERS: usize = 28;
/// transformers' default `sliding_window` for Gemma.
const GEMMA_DEFAULT_WINDOW: usize = 4096;
/// transformers' default `sliding_window_pattern` for Gemma 3.
const GEMMA3_DEFAULT_PATTERN: usize = 6;
/// The one activation Gemma's MLP is supported with.
const GELU_TANH: &str = "gelu_pytorch_tanh";

impl FamilyParams {
    /// Resolves the family's differences; the error is the message (the caller names the file).
    pub fn resolve(config: &ModelConfig, raw: &RawFamily<'_>) -> Result<Self, String> {
        let layers = config.num_layers;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let with_flag = Biases {
            qkv: attention_bias,
            o: attention_bias,
            reason: "attention_bias",
        };
        let (biases, qk_norm, windows) = match config.arch.kind {
            Family::Llama => {
                let mistral = config.class_name == "MistralForCausalLM";
                let window = raw.sliding_window.filter(|&w| w > 0 && mistral);
                (with_flag, false, vec![window; layers])
            }
            Family::Qwen2 => {
                let biases = Biases {
                    qkv: true,
                    o: false,
                    reason: "Qwen2 (q/k/v biases, none on o_proj)",
                };
                (biases, false, qwen_windows(raw, layers)?)
            }
            Family::Qwen3 => (with_flag, true, qwen_windows(raw, layers)?),
            Family::Gemma2 | Family::Gemma3 => {
                let gemma3 = config.arch.kind == Family::Gemma3;
                (with_flag, gemma3, gemma_windows(raw, layers, gemma3)?)
            }
            Family::Phi3 => {
                let none = Biases {
                    qkv: false,
                    o: false,
                    reason: "Phi-3 (no biases)",
                };
                let window = raw.sliding_window.filter(|&w| w > 0);
                (none, false, vec![window; layers])
            }
        };
        let gemma = match config.arch.kind {
            Family::Gemma2 | Family::Gemma3 => Some(gemma(config, raw)?),
            _ => None,
        };
        Ok(FamilyParams {
            biases,
            qk_norm,
            windows,
            gemma,
        })
    }
}

/// Gemma's layer parameters, validated.
fn gemma(config: &ModelConfig, raw: &RawFamily<'_>) -> Result<Gemma, String> {
    let act = raw.hidden_activation.unwrap_or(GELU_TANH);
    if act != GELU_TANH {
        return Err(format!(
            "hidden_activation `{act}` is not supported by eval (Gemma uses {GELU_TANH})"
        ));
    }
    if raw.use_bidirectional_attention == Some(true) {
        return Err(
            "use_bidirectional_attention true is not supported (causal models only)".into(),
        );
    }
    let positive = |value: Option<f64>, key: &str| match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            Err(format!("`{key}` must be a positive number, found {v}"))
        }
        v => Ok(v),
    };
    let scalar = positive(raw.query_pre_attn_scalar, "query_pre_attn_scalar")?
        .unwrap_or(config.head_dim as f64);
    Ok(Gemma {
        attention_scale: 1.0 / scalar.sqrt(),
        attention_softcap: positive(raw.attn_logit_softcapping, "attn_logit_softcapping")?,
        final_softcap: positive(raw.final_logit_softcapping, "final_logit_softcapping")?,
    })
}

/// `layer_types` as sliding flags, checked against the layer count.
fn sliding_types(types: &[String], layers: usize) -> Result<Vec<bool>, String> {
    if types.len() != layers {
        return Err(format!(
            "layer_types lists {} layers but num_hidden_layers is {layers}",
            types.len()
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            SLIDING => Ok(true),
            FULL => Ok(false),
            other => Err(format!(
                "layer_types: `{other}` is not supported (expected {FULL} or {SLIDING})"
            )),
        })
        .collect()
}

/// Gemma's sliding windows: the layers `layer_types` marks, else Gemma 2's even layers or every
/// layer but each `sliding_window_pattern`-th of Gemma 3; `sliding_window` defaults to 4096.
fn gemma_windows(
    raw: &RawFamily<'_>,
    layers: usize,
    gemma3: bool,
) -> Result<Vec<Option<usize>>, String> {
    let window = match raw.sliding_window {
        Some(0) => return Err("sliding_window must be a positive integer".into()),
        Some(w) => w,
        None => GEMMA_DEFAULT_WINDOW,
    };
    let pattern = raw
        .sliding_window_pattern
        .unwrap_or(GEMMA3_DEFAULT_PATTERN)
        .max(1);
    let sliding = match raw.layer_types {
        Some(types) => sliding_types(types, layers)?,
        None if gemma3 => (0..layers).map(|i| (i + 1) % pattern != 0).collect(),
        None => (0..layers).map(|i| (i + 1) % 2 != 0).collect(),
    };
    Ok(sliding.into_iter().map(|s| s.then_some(window)).collect())
}

/// Qwen's sliding windows, as transformers' `Qwen2Config`/`Qwen3Config` resolve them: none
/// unless `use_sliding_window`; then the layers `layer_types` marks `sliding_attention`, or
/// without `layer_types` every layer from `max_window_layers` on.
fn qwen_windows(raw: &RawFamily<'_>, layers: usize) -> Result<Vec<Option<usize>>, String> {
    let window = match (raw.use_sliding_window.unwrap_or(false), raw.sliding_window) {
        (true, Some(w)) if w > 0 => Some(w),
        (true, _) => {
            return Err(
                "use_sliding_window is true but sliding_window is not a positive integer".into(),
            )
        }
        (false, _) => None,
    };
    let sliding: Vec<bool> = match raw.layer_types {
        Some(types) => sliding_types(types, layers)?,
        None => {
            let first = raw.max_window_layers.unwrap_or(DEFAULT_MAX_WINDOW_LAYERS);
            (0..layers)
                .map(|i| window.is_some() && i >= first)
                .collect()
        }
    };
    if window.is_none() && sliding.iter().any(|&s| s) {
        return Err(format!(
            "layer_types marks {SLIDING} layers but use_sliding_window is not true"
        ));
    }
    Ok(sliding
        .into_iter()
        .map(|s| if s { window } else { None })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn config(class: &str, layers: usize) -> ModelConfig {
        let mut v = json!({"architectures": [class], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": layers, "head_dim": 16});
        v["num_key_value_heads"] = json!(2);
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn llama_and_mistral() {
        let raw = RawFamily {
            attention_bias: Some(true),
            sliding_window: Some(8),
            ..RawFamily::default()
        };
        let p = FamilyParams::resolve(&config("LlamaForCausalLM", 2), &raw).unwrap();
        assert_eq!((p.biases.qkv, p.biases.o, p.qk_norm), (true, true, false));
        assert_eq!(p.windows, vec![None, None]);
        let p = FamilyParams::resolve(&config("MistralForCausalLM", 2), &raw).unwrap();
        assert_eq!(p.windows, vec![Some(8), Some(8)]);
    }

    #[test]
    fn qwen_biases_and_norms() {
        let raw = RawFamily {
            attention_bias: Some(true),
            ..RawFamily::default()
        };
        let p = FamilyParams::resolve(&config("Qwen2ForCausalLM", 2), &raw).unwrap();
        assert_eq!((p.biases.qkv, p.biases.o, p.qk_norm), (true, false, false));
        let p = FamilyParams::resolve(&config("Qwen3ForCausalLM", 2), &RawFamily::default());
        let p = p.unwrap();
        assert_eq!((p.biases.qkv, p.biases.o, p.qk_norm), (false, false, true));
    }

    #[test]
    fn gemma_layers() {
        let raw = RawFamily {
            sliding_window: Some(16),
            query_pre_attn_scalar: Some(64.0),
            attn_logit_softcapping: Some(50.0),
            ..RawFamily::default()
        };
        let p = FamilyParams::resolve(&config("Gemma2ForCausalLM", 4), &raw).unwrap();
        assert_eq!(p.windows, vec![Some(16), None, Some(16), None]);
        let g = p.gemma.unwrap();
        assert_eq!(
            (g.attention_scale, g.attention_softcap, g.final_softcap),
            (0.125, Some(50.0), None)
        );
        assert!(!p.qk_norm);
        let p = FamilyParams::resolve(&config("Gemma3ForCausalLM", 7), &raw).unwrap();
        let sliding: Vec<bool> = p.windows.iter().map(Option::is_some).collect();
        assert_eq!(sliding, [true, true, true, true, true, false, true]);
        assert!(p.qk_norm);
        let bad = RawFamily {
            hidden_activation: Some("silu"),
            ..raw
        };
        let err = FamilyParams::resolve(&config("Gemma2ForCausalLM", 4), &bad).unwrap_err();
        assert!(err.contains("hidden_activation `silu`"), "{err}");
    }

    #[test]
    fn qwen_sliding_layers() {
        let types: Vec<String> = [FULL, SLIDING, SLIDING].map(String::from).to_vec();
        let mut raw = RawFamily {
            sliding_window: Some(5),
            max_window_layers: Some(2),
            ..RawFamily::default()
        };
        let c = config("Qwen2ForCausalLM", 3);
        // Off unless use_sliding_window, as transformers reads it.
        assert_eq!(
            FamilyParams::resolve(&c, &raw).unwrap().windows,
            vec![None; 3]
        );
        raw.use_sliding_window = Some(true);
        let p = FamilyParams::resolve(&c, &raw).unwrap();
        assert_eq!(p.windows, vec![None, None, Some(5)]);
        raw.layer_types = Some(&types);
        let p = FamilyParams::resolve(&c, &raw).unwrap();
        assert_eq!(p.windows, vec![None, Some(5), Some(5)]);
        raw.use_sliding_window = Some(false);
        assert!(FamilyParams::resolve(&c, &raw)
            .unwrap_err()
            .contains("use_sliding_window"));
        let short = &types[..2];
        raw.layer_types = Some(short);
        assert!(FamilyParams::resolve(&c, &raw)
            .unwrap_err()
            .contains("lists 2 layers"));
        let odd: Vec<String> = vec!["chunked_attention".into(); 3];
        raw.layer_types = Some(&odd);
        assert!(FamilyParams::resolve(&c, &raw)
            .unwrap_err()
            .contains("chunked_attention"));
    }
}
