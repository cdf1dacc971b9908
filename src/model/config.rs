//! `config.json`: parsed once into a validated [`ModelConfig`]; downstream code never re-checks it.

use crate::model::arch::{self, Architecture, Factor, Role};
use crate::error::{Error, Result};
use crate::model::latent::{self, KvMode, LatentAttention};
use serde_json::{Map, Value};
use std::path::Path;

/// Largest `config.json` accepted (16 MiB; real ones are a few kilobytes).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Largest `hidden_size` and `num_attention_heads * head_dim` accepted (65,536): bounds the memory
/// of one fit whatever a checkpoint claims.
pub const MAX_DIMENSION: usize = 1 << 16;

/// The model facts the surgery needs, validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `architectures[0]` (of a factored checkpoint: the original class it was made from).
    pub class_name: String,
    /// The tensor-name table for it.
    pub arch: &'static Architecture,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`).
    pub num_kv_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `tie_word_embeddings` (defaults to false, as in transformers' Llama).
    pub tie_word_embeddings: bool,
    /// The factored form's description, for a checkpoint written by `--emit factored`.
    pub latent: Option<LatentAttention>,
    /// The whole `config.json` object, key order kept (rewritten for factored output).
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// Rows of `q_proj`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Rows of `k_proj` and `v_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The attention projection tensors every layer must have, with their shapes: `q_proj`,
    /// `k_proj`, `v_proj`, or for a factored checkpoint the factors that replace them.
    pub fn attention_tensors(&self, layer: usize) -> Vec<(Role, [usize; 2])> {
        let (h, q, kv) = (self.hidden_size, self.q_dim(), self.kv_dim());
        let width = |ranks: &Option<Vec<usize>>| ranks.as_ref().and_then(|r| r.get(layer).copied());
        let Some(l) = &self.latent else {
            return vec![
                (Role::Query, [q, h]),
                (Role::Key, [kv, h]),
                (Role::Value, [kv, h]),
            ];
        };
        let mut out = Vec::new();
        match width(&l.q_rank) {
            Some(r) => out.extend([
                (Role::Factor(Factor::QDown), [r, h]),
                (Role::Factor(Factor::QUp), [q, r]),
            ]),
            None => out.push((Role::Query, [q, h])),
        }
        match (l.kv, width(&l.kv_rank)) {
            (Some(KvMode::Shared), Some(r)) => out.extend([
                (Role::Factor(Factor::KvDown), [r, h]),
                (Role::Factor(Factor::KUp), [kv, r]),
                (Role::Factor(Factor::VUp), [kv, r]),
            ]),
            _ => {
                for (ranks, dense, down, up) in [
                    (&l.k_rank, Role::Key, Factor::KDown, Factor::KUp),
                    (&l.v_rank, Role::Value, Factor::VDown, Factor::VUp),
                ] {
                    match width(ranks) {
                        Some(r) => {
                            out.extend([(Role::Factor(down), [r, h]), (Role::Factor(up), [kv, r])])
                        }
                        None => out.push((dense, [kv, h])),
                    }
                }
            }
        }
        out
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::input::files::read_limited(path, MAX_CONFIG_BYTES)?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&value, path)
    }

    /// Validates a parsed `config.json` (`path` is used in messages).
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::invalid(path, message);
        let obj = value
            .as_object()
            .ok_or_else(|| invalid("expected a JSON object".into()))?;
        let class_name = obj
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| {
                invalid("missing `architectures` (expected e.g. [\"LlamaForCausalLM\"])".into())
            })?
            .to_string();
        let factored = class_name == latent::CLASS_NAME;
        let class_name = if factored {
            obj.get("latent_attention")
                .and_then(|l| l.get("original_architectures"))
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(format!(
                        "`architectures` is {} but latent_attention.original_architectures is missing",
                        latent::CLASS_NAME
                    ))
                })?
                .to_string()
        } else {
            class_name
        };
        let arch = arch::find(&class_name).ok_or_else(|| {
            invalid(format!(
                "unsupported architecture `{class_name}` (supported: {})",
                arch::supported_class_names().join(", ")
            ))
        })?;
        let field = |name: &str| -> Result<Option<usize>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .map(Some)
                    .ok_or_else(|| {
                        invalid(format!("`{name}` must be a positive integer, found {v}"))
                    }),
            }
        };
        let required = |name: &str| -> Result<usize> {
            field(name)?.ok_or_else(|| invalid(format!("missing required field `{name}`")))
        };
        let hidden_size = required("hidden_size")?;
        let num_heads = required("num_attention_heads")?;
        let num_layers = required("num_hidden_layers")?;
        let num_kv_heads = field("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match field("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(invalid(format!(
                        "num_attention_heads {num_heads} does not divide hidden_size {hidden_size}"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(invalid(format!(
                "num_key_value_heads {num_kv_heads} does not divide num_attention_heads {num_heads}"
            )));
        }
        let q_dim = num_heads
            .checked_mul(head_dim)
            .ok_or_else(|| invalid("num_attention_heads * head_dim overflows".into()))?;
        // Bounds what one fit may allocate (a matrix of these dimensions in f64), whatever the file.
        for (what, value) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads * head_dim", q_dim),
        ] {
            if value > MAX_DIMENSION {
                return Err(invalid(format!(
                    "{what} = {value} exceeds the limit of {MAX_DIMENSION} (Llama-3-405B uses 16384)"
                )));
            }
        }
        let tie_word_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(invalid(format!(
                    "`tie_word_embeddings` must be true or false, found {v}"
                )))
            }
        };
        let latent = if factored {
            let value = obj.get("latent_attention").unwrap_or(&Value::Null);
            Some(LatentAttention::from_json(value, num_layers, path)?)
        } else {
            None
        };
        Ok(ModelConfig {
            class_name,
            arch,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            num_layers,
            tie_word_embeddings,
            latent,
            raw: obj.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9,
               "num_key_value_heads": 3, "num_hidden_layers": 30, "tie_word_embeddings": true})
    }

    #[test]
    fn parses_smollm2_shape() {
        let c = parse(base()).unwrap();
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (64, 576, 192));
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn rejects_bad_configs() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("GPT2LMHeadModel"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = base();
        v["num_attention_heads"] = json!(7);
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("does not divide"));
        let mut v = base();
        v["num_key_value_heads"] = json!(2);
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("does not divide"));
    }
}
