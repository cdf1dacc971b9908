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

use crate::model::arch::Family;
use crate::model::config::ModelConfig;

/// The raw keys this module reads (a part of `llama::params::RawParams`).
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
    /// `layer_types` (Qwen): `full_attention` or `sliding_attention` per layer.
    pub layer_types: Option<&'a [String]>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyParams {
    /// The attention biases.
    pub biases: Biases,
    /// Qwen3's per-head RMSNorm of queries and keys (`q_norm`, `k_norm`) before RoPE.
    pub qk_norm: bool,
    /// The sliding window of each layer (`None`: full causal attention).
    pub windows: Vec<Option<usize>>,
}

/// `layer_types` value of a layer with a sliding window.
const SLIDING: &str = "sliding_attention";
/// `layer_types` value of a layer with full attention.
const FULL: &str = "full_attention";
/// transformers' default `max_window_layers` for Qwen2 and Qwen3.
const DEFAULT_MAX_WINDOW_LAYERS: usize = 28;

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
        };
        Ok(FamilyParams {
            biases,
            qk_norm,
            windows,
        })
    }
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
        Some(types) => {
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
                .collect::<Result<_, _>>()?
        }
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
