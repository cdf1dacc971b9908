//! The hyper-parameters of the forward pass, read once from `config.json` ([`ModelConfig::raw`]):
//! the raw fields as the file spells them ([`RawParams`], transformers' `LlamaConfig` defaults for
//! absent keys), resolved and validated into [`LlamaParams`] (RoPE type and its parameters, the
//! activation, biases, Mistral's sliding window). Downstream code never reads the JSON again.

use crate::error::{Error, Result};
use crate::forward::attention::AttentionShape;
use crate::forward::family::{FamilyParams, RawFamily};
use crate::forward::rope::{Rope, RopeScaling};
use crate::model::arch::Family;
use crate::model::config::ModelConfig;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// The `config.json` keys the forward pass reads beyond [`ModelConfig`], as written.
#[derive(Debug, Default, Deserialize)]
pub struct RawParams {
    /// `rms_norm_eps` (default 1e-6).
    pub rms_norm_eps: Option<f64>,
    /// `rope_theta` (default 10000).
    pub rope_theta: Option<f64>,
    /// `rope_scaling` (transformers 4) ...
    pub rope_scaling: Option<Map<String, Value>>,
    /// ... or `rope_parameters` (transformers 5; `rope_scaling` wins when both are set).
    pub rope_parameters: Option<Map<String, Value>>,
    /// `max_position_embeddings` (default 2048).
    pub max_position_embeddings: Option<usize>,
    /// A top-level `original_max_position_embeddings` overrides the one in the RoPE parameters.
    pub original_max_position_embeddings: Option<usize>,
    /// `partial_rotary_factor`: only 1 (or absent) is supported.
    pub partial_rotary_factor: Option<f64>,
    /// `hidden_act` (default `silu`, the only one supported).
    pub hidden_act: Option<String>,
    /// `attention_bias` (default false): q, k, v and o projections carry biases.
    pub attention_bias: Option<bool>,
    /// `mlp_bias` (default false): gate, up and down projections carry biases.
    pub mlp_bias: Option<bool>,
    /// `intermediate_size` (required).
    pub intermediate_size: Option<usize>,
    /// `vocab_size` (required).
    pub vocab_size: Option<usize>,
    /// `sliding_window` (Mistral, Qwen; `null` for none).
    pub sliding_window: Option<usize>,
    /// `use_sliding_window` (Qwen).
    pub use_sliding_window: Option<bool>,
    /// `max_window_layers` (Qwen).
    pub max_window_layers: Option<usize>,
    /// `layer_types` (Qwen, Gemma).
    pub layer_types: Option<Vec<String>>,
    /// `sliding_window_pattern` (Gemma 3, older configs).
    pub sliding_window_pattern: Option<usize>,
    /// `query_pre_attn_scalar` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
    /// `attn_logit_softcapping` (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `final_logit_softcapping` (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// `hidden_activation` (Gemma's MLP activation; `hidden_act` is not read for Gemma).
    pub hidden_activation: Option<String>,
    /// `use_bidirectional_attention` (Gemma 3).
    pub use_bidirectional_attention: Option<bool>,
    /// `rope_local_base_freq` (Gemma 3's sliding layers, older configs; default 10000).
    pub rope_local_base_freq: Option<f64>,
}

/// Everything the forward pass needs to know about the model, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// Heads (the sliding window is per layer: [`Self::layer_shape`]).
    pub attention: AttentionShape,
    /// The family's differences: biases, query/key norms, each layer's sliding window.
    pub family: FamilyParams,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// The resolved rotary embedding.
    pub rope: Rope,
    /// Gemma 3's rotary embedding of the sliding-window layers (`None`: every layer uses `rope`).
    pub local_rope: Option<Rope>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `mlp_bias`.
    pub mlp_bias: bool,
    /// `tie_word_embeddings`: the head is `embed_tokens`.
    pub tie_word_embeddings: bool,
}

impl LlamaParams {
    /// The rotary embedding of layer `layer`.
    pub fn layer_rope(&self, layer: usize) -> Rope {
        match (&self.local_rope, self.layer_shape(layer).sliding_window) {
            (Some(local), Some(_)) => local.clone(),
            _ => self.rope.clone(),
        }
    }

    /// The attention shape of layer `layer`, with its sliding window.
    pub fn layer_shape(&self, layer: usize) -> AttentionShape {
        AttentionShape {
            sliding_window: self.family.windows.get(layer).copied().flatten(),
            ..self.attention
        }
    }

    /// Resolves the parameters of `config` (read from `path`, named in errors).
    pub fn resolve(config: &ModelConfig, path: &Path) -> Result<Self> {
        let raw: RawParams =
            serde_json::from_value(Value::Object(config.raw.clone())).map_err(|source| {
                Error::Json {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        Self::from_raw(config, &raw, path)
    }

    /// Resolves already-parsed raw fields.
    pub fn from_raw(config: &ModelConfig, raw: &RawParams, path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::invalid(path, message);
        let gemma = matches!(config.arch.kind, Family::Gemma2 | Family::Gemma3);
        let act = raw.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" && !gemma {
            return Err(invalid(format!(
                "hidden_act `{act}` is not supported by eval (Llama uses silu)"
            )));
        }
        let required = |value: Option<usize>, key: &str| {
            value
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid(format!("`{key}` must be a positive integer")))
        };
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(2048).max(1);
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(invalid(format!(
                "`rms_norm_eps` must be a non-negative number, found {rms_norm_eps}"
            )));
        }
        let phi3 = config.arch.kind == Family::Phi3;
        if let Some(f) = raw.partial_rotary_factor.filter(|&f| f != 1.0 && !phi3) {
            return Err(invalid(format!(
                "partial_rotary_factor {f} is not supported by eval for {} (it rotates the whole head)",
                config.arch.family
            )));
        }
        if config.head_dim % 2 != 0 {
            return Err(invalid(format!(
                "head_dim {} is odd; RoPE needs an even head dimension",
                config.head_dim
            )));
        }
        let (mut rope, local_rope) = ropes(config, raw, max_position_embeddings)
            .map_err(|m| invalid(format!("rope: {m}")))?;
        if phi3 {
            rope.rotary_dim = rotary_dim(config, raw).map_err(invalid)?;
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope.scaling
        {
            let want = rope.rotary_dim / 2;
            if short_factor.len() != want || long_factor.len() != want {
                return Err(invalid(format!(
                    "rope: longrope's short_factor and long_factor hold {} and {} values; the rotated dimension {} needs {want}",
                    short_factor.len(),
                    long_factor.len(),
                    rope.rotary_dim
                )));
            }
        }
        let family = FamilyParams::resolve(
            config,
            &RawFamily {
                attention_bias: raw.attention_bias,
                sliding_window: raw.sliding_window,
                use_sliding_window: raw.use_sliding_window,
                max_window_layers: raw.max_window_layers,
                layer_types: raw.layer_types.as_deref(),
                sliding_window_pattern: raw.sliding_window_pattern,
                query_pre_attn_scalar: raw.query_pre_attn_scalar,
                attn_logit_softcapping: raw.attn_logit_softcapping,
                final_logit_softcapping: raw.final_logit_softcapping,
                hidden_activation: raw.hidden_activation.as_deref(),
                use_bidirectional_attention: raw.use_bidirectional_attention,
            },
        )
        .map_err(invalid)?;
        Ok(LlamaParams {
            hidden_size: config.hidden_size,
            intermediate_size,
            vocab_size,
            num_layers: config.num_layers,
            attention: AttentionShape {
                num_heads: config.num_heads,
                num_kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
                sliding_window: None,
                scale: family.gemma.map(|g| g.attention_scale as f32),
                softcap: family
                    .gemma
                    .and_then(|g| g.attention_softcap)
                    .map(|c| c as f32),
            },
            family,
            rms_norm_eps,
            rope,
            local_rope,
            max_position_embeddings,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            tie_word_embeddings: config.tie_word_embeddings,
        })
    }
}

/// Phi-3's rotated dimension: `int(head_dim * partial_rotary_factor)` (the factor from the RoPE
/// parameters, else the top-level key, else 1), as transformers' `Phi3RotaryEmbedding` computes it.
fn rotary_dim(config: &ModelConfig, raw: &RawParams) -> std::result::Result<usize, String> {
    let in_rope = [&raw.rope_scaling, &raw.rope_parameters]
        .into_iter()
        .flatten()
        .find_map(|p| p.get("partial_rotary_factor").and_then(Value::as_f64));
    let factor = in_rope.or(raw.partial_rotary_factor).unwrap_or(1.0);
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(format!(
            "partial_rotary_factor must be in (0, 1], found {factor}"
        ));
    }
    let dim = (config.head_dim as f64 * factor) as usize;
    if dim == 0 || dim % 2 != 0 {
        return Err(format!(
            "partial_rotary_factor {factor} rotates {dim} of head_dim {} values; RoPE needs a positive even number",
            config.head_dim
        ));
    }
    Ok(dim)
}

/// The model's RoPE and, for Gemma 3, that of its sliding-window layers: from `rope_parameters`
/// keyed by layer type (transformers 5), or the legacy keys (`rope_scaling` and `rope_theta` for the
/// full layers, `rope_local_base_freq` for the sliding ones).
fn ropes(
    config: &ModelConfig,
    raw: &RawParams,
    max_position_embeddings: usize,
) -> std::result::Result<(Rope, Option<Rope>), String> {
    let empty = Map::new();
    let d = config.head_dim;
    let p = raw
        .rope_scaling
        .as_ref()
        .filter(|m| !m.is_empty())
        .or(raw.rope_parameters.as_ref())
        .unwrap_or(&empty);
    if config.arch.kind != Family::Gemma3 {
        return Ok((
            resolve_rope(raw, p, d, max_position_embeddings, config.arch.kind)?,
            None,
        ));
    }
    let by_type = |key: &str| p.get(key).and_then(Value::as_object);
    if let (Some(full), Some(local)) = (by_type("full_attention"), by_type("sliding_attention")) {
        let global = resolve_rope(raw, full, d, max_position_embeddings, config.arch.kind)?;
        let local = resolve_rope(raw, local, d, max_position_embeddings, config.arch.kind)?;
        return Ok((global, Some(local)));
    }
    let global = resolve_rope(raw, p, d, max_position_embeddings, config.arch.kind)?;
    let theta = raw.rope_local_base_freq.unwrap_or(10000.0);
    let local = resolve_rope(
        &RawParams {
            rope_theta: Some(theta),
            ..RawParams::default()
        },
        &empty,
        d,
        max_position_embeddings,
        config.arch.kind,
    )?;
    Ok((global, Some(local)))
}

/// transformers' `Phi3Config.original_max_position_embeddings` default, which a longrope config
/// without the top-level key gets (it overrides the one in the RoPE parameters).
const PHI3_ORIGINAL_MAX_POSITIONS: usize = 4096;

/// Longrope's parameters as transformers' `_compute_longrope_parameters` reads them: both factor
/// lists, the pre-training length (the top-level key, else Phi-3's default, else the RoPE
/// parameters', else `max_position_embeddings`), and the attention factor (given, else
/// `sqrt(1 + ln(factor) / ln(original))` with `factor` given or `max / original`, 1 when at most 1).
fn longrope(
    raw: &RawParams,
    p: &Map<String, Value>,
    max_position_embeddings: usize,
    family: Family,
) -> std::result::Result<RopeScaling, String> {
    let factors = |key: &str| -> std::result::Result<std::sync::Arc<[f64]>, String> {
        let list = p
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("rope type `longrope` needs `{key}`, a list of numbers"))?;
        list.iter()
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| format!("`{key}` must hold positive numbers, found {v}"))
            })
            .collect()
    };
    let positive = |key: &str| p.get(key).and_then(Value::as_f64).filter(|x| *x > 0.0);
    let original = raw
        .original_max_position_embeddings
        .or((family == Family::Phi3).then_some(PHI3_ORIGINAL_MAX_POSITIONS))
        .or(positive("original_max_position_embeddings").map(|x| x as usize))
        .unwrap_or(max_position_embeddings)
        .max(2);
    let factor = positive("factor").unwrap_or(max_position_embeddings as f64 / original as f64);
    let attention_factor = match positive("attention_factor") {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// The RoPE parameters as transformers 5 standardises them, from `p` (the `rope_scaling` object if
/// non-empty, else `rope_parameters`): `rope_theta` from `p`, else the top-level key, else 10000;
/// the type from `rope_type`, else the legacy `type`, else `default`.
fn resolve_rope(
    raw: &RawParams,
    p: &Map<String, Value>,
    head_dim: usize,
    max_position_embeddings: usize,
    family: Family,
) -> std::result::Result<Rope, String> {
    let number = |key: &str| -> std::result::Result<Option<f64>, String> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .map(Some)
                .ok_or_else(|| format!("`{key}` must be a positive number, found {v}")),
        }
    };
    let required = |key: &str, kind: &str| {
        number(key)?.ok_or_else(|| format!("rope type `{kind}` needs `{key}`"))
    };
    let theta = match number("rope_theta")? {
        Some(t) => t,
        None => raw.rope_theta.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!(
            "rope_theta must be a positive number, found {theta}"
        ));
    }
    let kind = ["rope_type", "type"]
        .iter()
        .find_map(|k| p.get(*k).and_then(Value::as_str))
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: required("factor", kind)?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: required("factor", kind)?,
            max_position_embeddings,
        },
        "llama3" => {
            let low_freq_factor = required("low_freq_factor", kind)?;
            let high_freq_factor = required("high_freq_factor", kind)?;
            if high_freq_factor == low_freq_factor {
                return Err("llama3 needs high_freq_factor != low_freq_factor".into());
            }
            let original = match raw.original_max_position_embeddings {
                Some(n) => n as f64,
                None => number("original_max_position_embeddings")?
                    .unwrap_or(max_position_embeddings as f64),
            };
            RopeScaling::Llama3 {
                factor: required("factor", kind)?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original as usize,
            }
        }
        // transformers' Phi3Config reads the legacy `su` and `yarn` as longrope.
        "longrope" | "su" | "yarn" if kind == "longrope" || family == Family::Phi3 => {
            longrope(raw, p, max_position_embeddings, family)?
        }
        other => {
            return Err(format!(
                "rope type `{other}` is not supported by eval (supported: default, linear, dynamic, llama3, longrope; a conversion with a weight-only fit does not need it)"
            ))
        }
    };
    Ok(Rope {
        theta,
        head_dim,
        rotary_dim: head_dim,
        scaling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolve(extra: Value) -> Result<LlamaParams> {
        let mut v = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 256});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let path = Path::new("config.json");
        let config = ModelConfig::from_json(&v, path).unwrap();
        LlamaParams::resolve(&config, path)
    }

    #[test]
    fn defaults_follow_transformers() {
        let p = resolve(json!({})).unwrap();
        assert_eq!(p.rms_norm_eps, 1e-6);
        assert_eq!(p.rope.theta, 10000.0);
        assert_eq!(p.rope.scaling, RopeScaling::None);
        assert_eq!(p.max_position_embeddings, 2048);
        assert!(!p.family.biases.qkv && !p.family.biases.o && !p.mlp_bias);
        assert_eq!(p.attention.head_dim, 16);
    }

    #[test]
    fn reads_rope_scaling_both_spellings() {
        let p = resolve(
            json!({"rope_theta": 500000.0, "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        )
        .unwrap();
        assert_eq!(p.rope.theta, 500000.0);
        assert_eq!(
            p.rope.scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        // transformers 5: rope_parameters carries the theta; the legacy `type` key.
        let p = resolve(json!({"rope_theta": 1.0,
            "rope_parameters": {"type": "linear", "factor": 2.0, "rope_theta": 1000.0}}))
        .unwrap();
        assert_eq!(p.rope.theta, 1000.0);
        assert_eq!(p.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        let p = resolve(json!({"rope_scaling": null, "rope_parameters": {"rope_type": "default"}}))
            .unwrap();
        assert_eq!(p.rope.scaling, RopeScaling::None);
        // llama3 without original_max_position_embeddings falls back to max_position_embeddings.
        let p = resolve(
            json!({"max_position_embeddings": 300, "rope_scaling": {"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}),
        )
        .unwrap();
        assert!(matches!(
            p.rope.scaling,
            RopeScaling::Llama3 {
                original_max_position_embeddings: 300,
                ..
            }
        ));
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let err = |v: Value| resolve(v).unwrap_err().to_string();
        assert!(err(json!({"hidden_act": "gelu"})).contains("hidden_act `gelu`"));
        assert!(
            err(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
                .contains("rope type `yarn` is not supported")
        );
        assert!(err(json!({"rope_scaling": {"rope_type": "linear"}})).contains("needs `factor`"));
        assert!(
            err(json!({"rope_scaling": {"rope_type": "linear", "factor": -1}}))
                .contains("positive number")
        );
        assert!(err(json!({"vocab_size": null})).contains("vocab_size"));
        assert!(err(json!({"partial_rotary_factor": 0.5})).contains("partial_rotary_factor"));
        assert!(err(json!({"rms_norm_eps": "x"})).contains("config.json"));
    }

    #[test]
    fn phi3_partial_rotary_and_longrope() {
        let phi3 = |rope: Value| {
            resolve(
                json!({"architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 8192,
                "original_max_position_embeddings": 1024, "partial_rotary_factor": 0.5,
                "rope_scaling": rope, "sliding_window": 7}),
            )
        };
        let p = phi3(Value::Null).unwrap();
        assert_eq!((p.rope.head_dim, p.rope.rotary_dim), (16, 8));
        assert_eq!(
            p.layer_shape(1).sliding_window,
            Some(7),
            "every layer slides"
        );
        let factors = json!({"rope_type": "longrope", "short_factor": [1.0, 1.0, 2.0, 2.0],
            "long_factor": [3.0, 3.0, 3.0, 3.0]});
        let p = phi3(factors.clone()).unwrap();
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } = p.rope.scaling.clone()
        else {
            panic!("{:?}", p.rope.scaling)
        };
        assert_eq!(original_max_position_embeddings, 1024);
        // factor 8192 / 1024 = 8: sqrt(1 + ln 8 / ln 1024) = sqrt(1.3).
        assert!((attention_factor - 1.3f64.sqrt()).abs() < 1e-12);
        let short = p.rope.inv_freq(1024);
        let long = p.rope.inv_freq(1025);
        assert!(
            (short[2] / long[2] - 1.5).abs() < 1e-12 && (short[0] / long[0] - 3.0).abs() < 1e-12
        );
        // The legacy name, and factor lists of the wrong length.
        let mut su = factors.clone();
        su["rope_type"] = json!("su");
        assert!(phi3(su).is_ok());
        let mut short_list = factors;
        short_list["long_factor"] = json!([1.0, 2.0]);
        let err = phi3(short_list).unwrap_err().to_string();
        assert!(
            err.contains("long_factor hold 4 and 2 values") && err.contains("needs 4"),
            "{err}"
        );
        // Other families keep refusing a partial rotary.
        assert!(resolve(json!({"partial_rotary_factor": 0.5})).is_err());
    }

    #[test]
    fn mistral_sliding_window_only_for_mistral() {
        let p = resolve(json!({"sliding_window": 64})).unwrap();
        assert_eq!(p.layer_shape(1).sliding_window, None);
        let p = resolve(json!({"architectures": ["MistralForCausalLM"], "sliding_window": 64}))
            .unwrap();
        assert_eq!(p.layer_shape(1).sliding_window, Some(64));
    }
}
