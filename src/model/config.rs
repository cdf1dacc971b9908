//! `config.json`: parsed once into a validated [`ModelConfig`]; downstream code never re-checks it.
//! Reading the file is `input::config_file`'s job; this module validates parsed JSON only.

use crate::error::{Error, Result};
use crate::model::arch::{self, Architecture, Family};
use crate::model::latent::LatentAttention;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

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
    /// `intermediate_size`, when given (the forward pass requires it; a fused `gate_up_proj` is
    /// split by it).
    pub intermediate_size: Option<usize>,
    /// `vocab_size`, when given (the forward pass requires it; the embedding and the head have
    /// that many rows).
    pub vocab_size: Option<usize>,
    /// `tie_word_embeddings` (defaults to false, as in transformers' Llama; true for Gemma).
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

    /// Validates a parsed `config.json` (`path` is used in messages).
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::invalid(path, "expected a JSON object"))?;
        let raw = RawConfig::deserialize(value).map_err(|e| Error::invalid(path, e.to_string()))?;
        let (class_name, factored) = class_name(&raw, path)?;
        let arch = architecture(&class_name, path)?;
        if let Some(written) = first_string(raw.architectures.as_ref()).filter(|_| factored) {
            if arch.factored.class_name != written {
                return Err(Error::invalid(
                    path,
                    format!(
                        "`architectures` is {written} but latent_attention.original_architectures names {class_name}, whose factored form is {}",
                        arch.factored.class_name
                    ),
                ));
            }
        }
        let dims = Dimensions::from_raw(&raw, arch, path)?;
        // Gemma ties its head to the embedding unless told otherwise (transformers' defaults).
        let tie_default = matches!(arch.kind, Family::Gemma2 | Family::Gemma3);
        let tie_word_embeddings =
            tie_word_embeddings(raw.tie_word_embeddings.as_ref(), tie_default, path)?;
        let latent = if factored {
            let value = raw.latent_attention.as_ref().unwrap_or(&Value::Null);
            Some(LatentAttention::from_json(value, dims.num_layers, path)?)
        } else {
            None
        };
        Ok(ModelConfig {
            class_name,
            arch,
            hidden_size: dims.hidden_size,
            num_heads: dims.num_heads,
            num_kv_heads: dims.num_kv_heads,
            head_dim: dims.head_dim,
            num_layers: dims.num_layers,
            intermediate_size: positive_integer(
                "intermediate_size",
                raw.intermediate_size.as_ref(),
                path,
            )?,
            vocab_size: positive_integer("vocab_size", raw.vocab_size.as_ref(), path)?,
            tie_word_embeddings,
            latent,
            raw: obj.clone(),
        })
    }
}

/// The fields of `config.json` the surgery reads, each kept as JSON so that every value is checked,
/// and every message worded, by the functions below in a fixed order (serde's own messages are never
/// shown). Missing and `null` both read as `None`; other keys are ignored (they stay in
/// [`ModelConfig::raw`]).
#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Value>,
    hidden_size: Option<Value>,
    num_attention_heads: Option<Value>,
    num_hidden_layers: Option<Value>,
    num_key_value_heads: Option<Value>,
    head_dim: Option<Value>,
    intermediate_size: Option<Value>,
    vocab_size: Option<Value>,
    tie_word_embeddings: Option<Value>,
    latent_attention: Option<Value>,
}

/// The validated attention dimensions.
struct Dimensions {
    hidden_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    num_layers: usize,
}

/// The first string of a JSON list.
fn first_string(list: Option<&Value>) -> Option<&str> {
    list.and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
}

/// The class name to look the architecture up by (`architectures[0]`, or of a factored checkpoint
/// `latent_attention.original_architectures[0]`), and whether the checkpoint is factored.
fn class_name(raw: &RawConfig, path: &Path) -> Result<(String, bool)> {
    let class_name = first_string(raw.architectures.as_ref()).ok_or_else(|| {
        Error::invalid(
            path,
            "missing `architectures` (expected e.g. [\"LlamaForCausalLM\"])",
        )
    })?;
    if arch::find_factored(class_name).is_none() {
        return Ok((class_name.to_string(), false));
    }
    let original = raw
        .latent_attention
        .as_ref()
        .and_then(|l| l.get("original_architectures"));
    let original = first_string(original).ok_or_else(|| {
        Error::invalid(
            path,
            format!(
                "`architectures` is {class_name} but latent_attention.original_architectures is missing"
            ),
        )
    })?;
    Ok((original.to_string(), true))
}

/// The name table for `class_name`.
fn architecture(class_name: &str, path: &Path) -> Result<&'static Architecture> {
    arch::find(class_name).ok_or_else(|| {
        Error::invalid(
            path,
            format!(
                "unsupported architecture `{class_name}` (supported: {})",
                arch::supported_class_names().join(", ")
            ),
        )
    })
}

/// The optional field `name`, which must be a positive integer when given.
fn positive_integer(name: &str, value: Option<&Value>, path: &Path) -> Result<Option<usize>> {
    let Some(v) = value else {
        return Ok(None);
    };
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .map(Some)
        .ok_or_else(|| {
            Error::invalid(
                path,
                format!("`{name}` must be a positive integer, found {v}"),
            )
        })
}

/// The required field `name`, a positive integer.
fn required_integer(name: &str, value: Option<&Value>, path: &Path) -> Result<usize> {
    positive_integer(name, value, path)?
        .ok_or_else(|| Error::invalid(path, format!("missing required field `{name}`")))
}

impl Dimensions {
    /// Reads the dimensions, applies the defaults and checks that the heads divide evenly. Qwen3
    /// requires `head_dim` (its heads are not `hidden_size / num_attention_heads` wide, and
    /// transformers' default of 128 is no model's truth to guess).
    fn from_raw(raw: &RawConfig, arch: &Architecture, path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::invalid(path, message);
        let hidden_size = required_integer("hidden_size", raw.hidden_size.as_ref(), path)?;
        let num_heads = required_integer(
            "num_attention_heads",
            raw.num_attention_heads.as_ref(),
            path,
        )?;
        let num_layers =
            required_integer("num_hidden_layers", raw.num_hidden_layers.as_ref(), path)?;
        let num_kv_heads = positive_integer(
            "num_key_value_heads",
            raw.num_key_value_heads.as_ref(),
            path,
        )?
        .unwrap_or(num_heads);
        let head_dim = match positive_integer("head_dim", raw.head_dim.as_ref(), path)? {
            Some(d) => d,
            None if matches!(arch.kind, Family::Qwen3 | Family::Gemma2 | Family::Gemma3) => {
                return Err(invalid(format!(
                    "missing required field `head_dim` ({} does not derive it from hidden_size / num_attention_heads)",
                    arch.family
                )))
            }
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
        let dims = Dimensions {
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            num_layers,
        };
        dims.check_limits(path)?;
        Ok(dims)
    }

    /// Bounds what one fit may allocate (a matrix of these dimensions in f64), whatever the file.
    fn check_limits(&self, path: &Path) -> Result<()> {
        let q_dim = self
            .num_heads
            .checked_mul(self.head_dim)
            .ok_or_else(|| Error::invalid(path, "num_attention_heads * head_dim overflows"))?;
        for (what, value) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads * head_dim", q_dim),
        ] {
            if value > MAX_DIMENSION {
                return Err(Error::invalid(
                    path,
                    format!(
                        "{what} = {value} exceeds the limit of {MAX_DIMENSION} (Llama-3-405B uses 16384)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `tie_word_embeddings`, the family's `default` when absent.
fn tie_word_embeddings(value: Option<&Value>, default: bool, path: &Path) -> Result<bool> {
    match value {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::invalid(
            path,
            format!("`tie_word_embeddings` must be true or false, found {v}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::latent;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9,
               "num_key_value_heads": 3, "num_hidden_layers": 30, "tie_word_embeddings": true})
    }

    /// `base()` with `key` set to `value` (removed for `None`), parsed: the message of the
    /// [`Error::Invalid`] it must fail with.
    fn refusal(key: &str, value: Option<Value>) -> String {
        let mut v = base();
        match value {
            Some(value) => v[key] = value,
            None => {
                v.as_object_mut().unwrap().remove(key);
            }
        }
        match parse(v) {
            Err(Error::Invalid { path, message }) => {
                assert_eq!(path, Path::new("config.json"));
                message
            }
            other => panic!("{key}: expected Error::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn parses_smollm2_shape() {
        let c = parse(base()).unwrap();
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (64, 576, 192));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.class_name, "LlamaForCausalLM");
        assert!(c.latent.is_none());
        assert_eq!(c.raw, *base().as_object().unwrap());
    }

    #[test]
    fn applies_defaults() {
        let mut v = base();
        let obj = v.as_object_mut().unwrap();
        obj.remove("num_key_value_heads");
        obj.remove("tie_word_embeddings");
        obj.insert("head_dim".into(), Value::Null);
        let c = parse(v).unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim), (9, 64));
        assert!(!c.tie_word_embeddings);
        let mut v = base();
        v["head_dim"] = json!(32);
        v["tie_word_embeddings"] = Value::Null;
        let c = parse(v).unwrap();
        assert_eq!((c.head_dim, c.q_dim()), (32, 288));
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(refusal("architectures", Some(json!(["GPT2LMHeadModel"])))
            .starts_with("unsupported architecture `GPT2LMHeadModel` (supported: "));
        assert_eq!(
            refusal("hidden_size", None),
            "missing required field `hidden_size`"
        );
        assert_eq!(
            refusal("num_attention_heads", Some(json!(7))),
            "num_attention_heads 7 does not divide hidden_size 576"
        );
        assert_eq!(
            refusal("num_key_value_heads", Some(json!(2))),
            "num_key_value_heads 2 does not divide num_attention_heads 9"
        );
    }

    #[test]
    fn rejects_missing_architectures() {
        let expected = "missing `architectures` (expected e.g. [\"LlamaForCausalLM\"])";
        for value in [
            None,
            Some(json!([])),
            Some(json!("LlamaForCausalLM")),
            Some(json!([3])),
        ] {
            assert_eq!(refusal("architectures", value), expected);
        }
    }

    #[test]
    fn rejects_non_positive_integers() {
        for (key, value, shown) in [
            ("hidden_size", json!(0), "0"),
            ("num_attention_heads", json!(-1), "-1"),
            ("num_hidden_layers", json!(2.5), "2.5"),
            ("num_key_value_heads", json!("3"), "\"3\""),
            ("head_dim", json!([64]), "[64]"),
        ] {
            assert_eq!(
                refusal(key, Some(value)),
                format!("`{key}` must be a positive integer, found {shown}")
            );
        }
        assert_eq!(
            refusal("num_hidden_layers", Some(Value::Null)),
            "missing required field `num_hidden_layers`"
        );
    }

    #[test]
    fn rejects_huge_dimensions() {
        assert_eq!(
            refusal("hidden_size", Some(json!(MAX_DIMENSION * 9))),
            format!(
                "hidden_size = {} exceeds the limit of {MAX_DIMENSION} (Llama-3-405B uses 16384)",
                MAX_DIMENSION * 9
            )
        );
        assert_eq!(
            refusal("head_dim", Some(json!(MAX_DIMENSION))),
            format!(
                "num_attention_heads * head_dim = {} exceeds the limit of {MAX_DIMENSION} (Llama-3-405B uses 16384)",
                MAX_DIMENSION * 9
            )
        );
        assert_eq!(
            refusal("head_dim", Some(json!(usize::MAX))),
            "num_attention_heads * head_dim overflows"
        );
    }

    #[test]
    fn rejects_non_boolean_tie() {
        assert_eq!(
            refusal("tie_word_embeddings", Some(json!("yes"))),
            "`tie_word_embeddings` must be true or false, found \"yes\""
        );
    }

    #[test]
    fn checks_in_a_fixed_order() {
        // Several problems at once: the architecture is reported before the fields, the fields in
        // the order hidden_size, num_attention_heads, num_hidden_layers, and tie_word_embeddings last.
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        v["hidden_size"] = json!(0);
        let message = parse(v).unwrap_err().to_string();
        assert!(message.contains("unsupported architecture"), "{message}");
        let mut v = base();
        v["num_attention_heads"] = json!(0);
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v).unwrap_err().to_string().contains("`hidden_size`"));
        let mut v = base();
        v["tie_word_embeddings"] = json!(1);
        v["hidden_size"] = json!(9 * 7282); // above the limit, a multiple of 9 heads
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("exceeds the limit"));
    }

    #[test]
    fn rejects_non_objects() {
        let err = ModelConfig::from_json(&json!([1]), Path::new("config.json")).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { message, .. } if message == "expected a JSON object"),
            "{err:?}"
        );
    }

    #[test]
    fn factored_configs_name_the_original_class() {
        let mut v = base();
        v["architectures"] = json!([crate::model::arch::LLAMA.factored.class_name]);
        assert_eq!(
            parse(v.clone()).unwrap_err().to_string(),
            format!("config.json: `architectures` is {} but latent_attention.original_architectures is missing", crate::model::arch::LLAMA.factored.class_name)
        );
        v["latent_attention"] = json!({"format_version": latent::FORMAT_VERSION_PER_LAYER, "kv": null,
            "q_rank": vec![4; 30], "original_architectures": ["LlamaForCausalLM"]});
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.class_name, "LlamaForCausalLM");
        let l = c.latent.as_ref().unwrap();
        assert_eq!((l.kv, l.q_rank.as_deref()), (None, Some(&[4; 30][..])));
        v["latent_attention"]["q_rank"] = json!([4]);
        let err = parse(v).unwrap_err();
        assert!(
            matches!(&err, Error::Invalid { message, .. }
                if message == "latent_attention: q_rank must list 30 positive integers (one per layer)"),
            "{err:?}"
        );
    }
}
