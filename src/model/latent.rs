//! The factored format's description in `config.json` (`latent_attention`), both ways: written for
//! `--emit factored`, parsed and validated when a factored checkpoint is read (by `expand`), and
//! removed again to restore a standard Llama config. The format is specified in
//! `docs/factored-format.md`; the Python module that loads it is embedded here.

use crate::error::{Error, Result};
use crate::model::arch::FactoredClasses;
use serde_json::{json, Map, Value};
use std::path::Path;

/// The newest `latent_attention.format_version` this build writes and reads: version 2 adds
/// cross-layer sharing (`kv_share`, `kv_groups`); a checkpoint without it is written as version 1.
pub const FORMAT_VERSION: u64 = 2;
/// The version of a checkpoint whose layers share nothing.
pub const FORMAT_VERSION_PER_LAYER: u64 = 1;
/// The transformers module written next to a factored checkpoint.
pub const MODULE_FILE: &str = "modeling_surgery_llama.py";
/// Its source (lives in the repository under `python/`).
pub const MODULE_SOURCE: &str = include_str!("../../python/modeling_surgery_llama.py");
/// The module of the other families (Qwen2, Qwen3), built on the Llama one.
pub const FAMILY_MODULE_FILE: &str = "modeling_surgery.py";
/// Its source (`python/`).
pub const FAMILY_MODULE_SOURCE: &str = include_str!("../../python/modeling_surgery.py");

/// The source of a Python file a factored checkpoint carries ([`FactoredClasses::files`]).
pub fn module_source(file: &str) -> Option<&'static str> {
    match file {
        MODULE_FILE => Some(MODULE_SOURCE),
        FAMILY_MODULE_FILE => Some(FAMILY_MODULE_SOURCE),
        _ => None,
    }
}

/// What a group of adjacent layers shares (`--share`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// One down-projection for the group; every layer computes and caches its own latent from its
    /// own input (saves parameters, not cache).
    Basis,
    /// One latent per token for the group, computed from its first layer's input; every layer of
    /// the group reads its K and V from it (saves cache; needs `--fit act`).
    Latent,
}

impl Share {
    /// The name used on the command line, in `config.json` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Share::Basis => "basis",
            Share::Latent => "latent",
        }
    }
}

/// How K and V are factored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMode {
    /// One latent for both (`kv_a_proj`, `k_b_proj`, `v_b_proj`).
    Shared,
    /// Each on its own (`k_a_proj`/`k_b_proj` and/or `v_a_proj`/`v_b_proj`).
    Separate,
}

impl KvMode {
    fn name(self) -> &'static str {
        match self {
            KvMode::Shared => "shared",
            KvMode::Separate => "separate",
        }
    }
}

/// The validated `latent_attention` object: which projections are factored and each layer's latent
/// width (the stored width: the rank, plus one for the mean direction of fit `pca`).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentAttention {
    /// The fit that produced the factors (informational).
    pub fit: String,
    /// K/V factoring, `None` when K and V are dense.
    pub kv: Option<KvMode>,
    /// Shared K/V latent width per layer (`kv == Shared`).
    pub kv_rank: Option<Vec<usize>>,
    /// Query latent width per layer, when the query is factored.
    pub q_rank: Option<Vec<usize>>,
    /// K latent width per layer (`kv == Separate`).
    pub k_rank: Option<Vec<usize>>,
    /// V latent width per layer (`kv == Separate`).
    pub v_rank: Option<Vec<usize>>,
    /// Cross-layer sharing of the shared K/V latent (format version 2).
    pub kv_sharing: Option<KvSharing>,
    /// The input's `architectures`, restored by `expand`.
    pub original_architectures: Value,
    /// The input's `model_type` (`Null` when it had none), restored by `expand`.
    pub original_model_type: Value,
}

/// Groups of adjacent layers sharing one K/V down-projection (`kv_groups`), and what they share
/// (`kv_share`). The first layer of each group is its source: it holds `kv_a_proj`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSharing {
    /// What the layers of a group share.
    pub share: Share,
    /// The groups, in layer order: runs of consecutive layers covering every layer.
    pub groups: Vec<Vec<usize>>,
}

impl KvSharing {
    /// The group holding `layer`.
    pub fn group_of(&self, layer: usize) -> Option<&[usize]> {
        self.groups
            .iter()
            .find(|g| g.contains(&layer))
            .map(Vec::as_slice)
    }

    /// The source layer of `layer`'s group (the layer itself when it is not in a group).
    pub fn source_of(&self, layer: usize) -> usize {
        self.group_of(layer)
            .and_then(|g| g.first().copied())
            .unwrap_or(layer)
    }
}

impl LatentAttention {
    /// The JSON object written into `config.json`.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        let version = match self.kv_sharing {
            Some(_) => FORMAT_VERSION,
            None => FORMAT_VERSION_PER_LAYER,
        };
        obj.insert("format_version".into(), json!(version));
        obj.insert("fit".into(), json!(self.fit));
        obj.insert("kv".into(), json!(self.kv.map(KvMode::name)));
        obj.insert("kv_rank".into(), json!(self.kv_rank));
        if let Some(sharing) = &self.kv_sharing {
            obj.insert("kv_share".into(), json!(sharing.share.name()));
            obj.insert("kv_groups".into(), json!(sharing.groups));
        }
        obj.insert("q_rank".into(), json!(self.q_rank));
        obj.insert("k_rank".into(), json!(self.k_rank));
        obj.insert("v_rank".into(), json!(self.v_rank));
        obj.insert(
            "original_architectures".into(),
            self.original_architectures.clone(),
        );
        obj.insert(
            "original_model_type".into(),
            self.original_model_type.clone(),
        );
        Value::Object(obj)
    }

    /// Parses and validates `value` (the `latent_attention` object of `path`) for a model of
    /// `num_layers` layers.
    pub fn from_json(value: &Value, num_layers: usize, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| invalid(path, "expected an object"))?;
        let version = check_format_version(obj, path)?;
        let kv = kv_mode(obj, path)?;
        let ranks = Ranks::from_json(obj, num_layers, path)?;
        ranks.check_consistent(kv, path)?;
        let kv_sharing = kv_sharing(obj, version, num_layers, path)?;
        if let (Some(sharing), Some(widths)) = (&kv_sharing, &ranks.kv) {
            check_group_widths(sharing, widths, path)?;
        }
        if kv_sharing.is_some() && kv != Some(KvMode::Shared) {
            return Err(invalid(
                path,
                "kv_groups need kv \"shared\" (one K/V latent to share)",
            ));
        }
        let original_architectures = obj
            .get("original_architectures")
            .filter(|v| {
                v.as_array()
                    .and_then(|a| a.first())
                    .is_some_and(Value::is_string)
            })
            .cloned()
            .ok_or_else(|| invalid(path, "original_architectures must be a list of class names"))?;
        let original_model_type = obj
            .get("original_model_type")
            .cloned()
            .unwrap_or(Value::Null);
        Ok(LatentAttention {
            fit: obj
                .get("fit")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            kv,
            kv_rank: ranks.kv,
            q_rank: ranks.q,
            k_rank: ranks.k,
            v_rank: ranks.v,
            kv_sharing,
            original_architectures,
            original_model_type,
        })
    }
}

/// A refusal of `path`'s `latent_attention`.
fn invalid(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::invalid(path, format!("latent_attention: {message}"))
}

/// `format_version` must be one this build reads; returns it.
fn check_format_version(obj: &Map<String, Value>, path: &Path) -> Result<u64> {
    let supported =
        format!("this build reads versions {FORMAT_VERSION_PER_LAYER} and {FORMAT_VERSION}");
    match obj.get("format_version") {
        None | Some(Value::Null) => Err(invalid(
            path,
            format!("format_version is missing ({supported})"),
        )),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => match n.as_u64() {
            Some(v @ (FORMAT_VERSION_PER_LAYER | FORMAT_VERSION)) => Ok(v),
            _ => Err(invalid(
                path,
                format!("format_version {n} is not supported ({supported})"),
            )),
        },
        Some(v) => Err(invalid(
            path,
            format!("format_version has the wrong type (expected an integer), found {v}"),
        )),
    }
}

/// `kv_share` and `kv_groups`: both present in version 2, both absent in version 1; the groups
/// must be runs of consecutive layers covering `0..num_layers` in order.
fn kv_sharing(
    obj: &Map<String, Value>,
    version: u64,
    num_layers: usize,
    path: &Path,
) -> Result<Option<KvSharing>> {
    let (share, groups) = (obj.get("kv_share"), obj.get("kv_groups"));
    if version == FORMAT_VERSION_PER_LAYER {
        return match share.or(groups) {
            Some(_) => Err(invalid(path, "kv_share / kv_groups need format_version 2")),
            None => Ok(None),
        };
    }
    let share = match share.and_then(Value::as_str) {
        Some("latent") => Share::Latent,
        Some("basis") => Share::Basis,
        _ => {
            return Err(invalid(
                path,
                "format_version 2 needs kv_share \"latent\" or \"basis\"",
            ))
        }
    };
    let parsed: Option<Vec<Vec<usize>>> = groups.and_then(Value::as_array).and_then(|gs| {
        gs.iter()
            .map(|g| {
                g.as_array()?
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                    .collect()
            })
            .collect()
    });
    let flat: Option<Vec<usize>> = parsed
        .as_ref()
        .map(|gs| gs.iter().flatten().copied().collect());
    match (parsed, flat) {
        (Some(groups), Some(flat))
            if flat == (0..num_layers).collect::<Vec<_>>() && groups.iter().all(|g| !g.is_empty()) =>
        {
            Ok(Some(KvSharing { share, groups }))
        }
        _ => Err(invalid(
            path,
            format!("kv_groups must list runs of consecutive layers covering 0..{num_layers} in order (e.g. [[0, 1], [2, 3]])"),
        )),
    }
}

/// The layers of a group read one latent, so they list the same width.
fn check_group_widths(sharing: &KvSharing, widths: &[usize], path: &Path) -> Result<()> {
    for group in &sharing.groups {
        let first = widths.get(group[0]);
        if group.iter().any(|&l| widths.get(l) != first) {
            return Err(invalid(
                path,
                format!("kv_rank must be equal within each of kv_groups (layers {group:?})"),
            ));
        }
    }
    Ok(())
}

/// `kv`: `"shared"`, `"separate"`, or absent / `null` for dense K and V.
fn kv_mode(obj: &Map<String, Value>, path: &Path) -> Result<Option<KvMode>> {
    match obj.get("kv") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "shared" => Ok(Some(KvMode::Shared)),
        Some(Value::String(s)) if s == "separate" => Ok(Some(KvMode::Separate)),
        Some(v) => Err(invalid(
            path,
            format!("kv must be \"shared\", \"separate\" or null, found {v}"),
        )),
    }
}

/// The per-layer latent widths, each list optional.
struct Ranks {
    kv: Option<Vec<usize>>,
    q: Option<Vec<usize>>,
    k: Option<Vec<usize>>,
    v: Option<Vec<usize>>,
}

impl Ranks {
    /// Reads `kv_rank`, `q_rank`, `k_rank` and `v_rank`, in that order.
    fn from_json(obj: &Map<String, Value>, num_layers: usize, path: &Path) -> Result<Self> {
        Ok(Ranks {
            kv: rank_list(obj, "kv_rank", num_layers, path)?,
            q: rank_list(obj, "q_rank", num_layers, path)?,
            k: rank_list(obj, "k_rank", num_layers, path)?,
            v: rank_list(obj, "v_rank", num_layers, path)?,
        })
    }

    /// The lists given must be those `kv` calls for, and something must be factored.
    fn check_consistent(&self, kv: Option<KvMode>, path: &Path) -> Result<()> {
        match kv {
            Some(KvMode::Shared) if self.kv.is_none() => {
                return Err(invalid(path, "kv is \"shared\" but kv_rank is missing"))
            }
            Some(KvMode::Separate) if self.k.is_none() && self.v.is_none() => {
                return Err(invalid(
                    path,
                    "kv is \"separate\" but neither k_rank nor v_rank is given",
                ))
            }
            _ => {}
        }
        if kv != Some(KvMode::Shared) && self.kv.is_some() {
            return Err(invalid(path, "kv_rank is only valid with kv \"shared\""));
        }
        if kv != Some(KvMode::Separate) && (self.k.is_some() || self.v.is_some()) {
            return Err(invalid(
                path,
                "k_rank / v_rank are only valid with kv \"separate\"",
            ));
        }
        if kv.is_none() && self.q.is_none() {
            return Err(invalid(path, "no projection is factored"));
        }
        Ok(())
    }
}

/// The list `key`: absent / `null`, or one positive integer per layer.
fn rank_list(
    obj: &Map<String, Value>,
    key: &str,
    num_layers: usize,
    path: &Path,
) -> Result<Option<Vec<usize>>> {
    let items = match obj.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(v) => return Err(invalid(path, format!("{key} must be a list, found {v}"))),
    };
    let parsed: Option<Vec<usize>> = items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
        })
        .collect();
    match parsed {
        Some(list) if list.len() == num_layers => Ok(Some(list)),
        _ => Err(invalid(
            path,
            format!("{key} must list {num_layers} positive integers (one per layer)"),
        )),
    }
}

/// The factored checkpoint's `config.json`: the original with `architectures`, `model_type`,
/// `auto_map` and `latent_attention` set (other keys keep their order and values).
pub fn factored_config(
    original: &Map<String, Value>,
    latent: &LatentAttention,
    classes: &FactoredClasses,
) -> Value {
    let mut config = original.clone();
    config.insert("architectures".into(), json!([classes.class_name]));
    config.insert("model_type".into(), json!(classes.model_type));
    let module = classes.module;
    config.insert(
        "auto_map".into(),
        json!({
            "AutoConfig": format!("{module}.{}", classes.config_class),
            "AutoModelForCausalLM": format!("{module}.{}", classes.class_name),
        }),
    );
    config.insert("latent_attention".into(), latent.to_json());
    Value::Object(config)
}

/// The standard config of an expanded checkpoint: `latent_attention` and `auto_map` removed,
/// `architectures` and `model_type` restored.
pub fn dense_config(factored: &Map<String, Value>, latent: &LatentAttention) -> Value {
    let mut config = factored.clone();
    config.remove("latent_attention");
    config.remove("auto_map");
    config.insert(
        "architectures".into(),
        latent.original_architectures.clone(),
    );
    if latent.original_model_type.is_null() {
        config.remove("model_type");
    } else {
        config.insert("model_type".into(), latent.original_model_type.clone());
    }
    Value::Object(config)
}

/// `value` as pretty JSON with a final newline (the layout transformers' `save_pretrained` uses).
pub fn to_pretty_bytes(value: &Value, path: &Path) -> Result<Vec<u8>> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LatentAttention {
        LatentAttention {
            fit: "pca".into(),
            kv: Some(KvMode::Shared),
            kv_rank: Some(vec![4, 5]),
            q_rank: None,
            k_rank: None,
            v_rank: None,
            kv_sharing: None,
            original_architectures: json!(["LlamaForCausalLM"]),
            original_model_type: json!("llama"),
        }
    }

    #[test]
    fn round_trips_through_config() {
        let original = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                              "model_type": "llama", "num_hidden_layers": 2});
        let original = original.as_object().unwrap();
        let factored = factored_config(original, &sample(), &crate::model::arch::LLAMA.factored);
        assert_eq!(
            factored["architectures"],
            json!(["SurgeryLlamaForCausalLM"])
        );
        assert_eq!(factored["model_type"], json!("surgery_llama"));
        let parsed =
            LatentAttention::from_json(&factored["latent_attention"], 2, Path::new("c")).unwrap();
        assert_eq!(parsed, sample());
        let dense = dense_config(factored.as_object().unwrap(), &parsed);
        assert_eq!(&dense, &Value::Object(original.clone()));
        // Key order is kept.
        let keys: Vec<_> = dense.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "architectures",
                "hidden_size",
                "model_type",
                "num_hidden_layers"
            ]
        );
    }

    #[test]
    fn rejects_inconsistent_descriptions() {
        let path = Path::new("config.json");
        let mut v = sample().to_json();
        v["kv_rank"] = json!([4]);
        assert!(LatentAttention::from_json(&v, 2, path)
            .unwrap_err()
            .to_string()
            .contains("kv_rank must list 2"));
        let mut v = sample().to_json();
        v["format_version"] = json!(3);
        assert!(LatentAttention::from_json(&v, 2, path)
            .unwrap_err()
            .to_string()
            .contains("format_version 3"));
        for (value, message) in [
            (
                json!("2"),
                "format_version has the wrong type (expected an integer), found \"2\"",
            ),
            (
                json!(2.0),
                "format_version has the wrong type (expected an integer), found 2.0",
            ),
            (
                json!([2]),
                "format_version has the wrong type (expected an integer), found [2]",
            ),
            (
                json!(-1),
                "format_version -1 is not supported (this build reads versions 1 and 2)",
            ),
            (
                Value::Null,
                "format_version is missing (this build reads versions 1 and 2)",
            ),
        ] {
            let mut v = sample().to_json();
            v["format_version"] = value;
            assert_eq!(
                LatentAttention::from_json(&v, 2, path)
                    .unwrap_err()
                    .to_string(),
                format!("config.json: latent_attention: {message}")
            );
        }
        let mut v = sample().to_json();
        v.as_object_mut().unwrap().remove("format_version");
        assert!(LatentAttention::from_json(&v, 2, path)
            .unwrap_err()
            .to_string()
            .contains("format_version is missing"));
        let mut v = sample().to_json();
        v["kv"] = json!("separate");
        assert!(LatentAttention::from_json(&v, 2, path).is_err());
        let mut v = sample().to_json();
        v["kv_rank"] = json!([4, 0]);
        assert!(LatentAttention::from_json(&v, 2, path).is_err());
    }

    #[test]
    fn version_2_round_trips_and_checks_its_groups() {
        let path = Path::new("config.json");
        let shared = LatentAttention {
            kv_rank: Some(vec![4, 4, 6]),
            kv_sharing: Some(KvSharing {
                share: Share::Latent,
                groups: vec![vec![0, 1], vec![2]],
            }),
            ..sample()
        };
        let v = shared.to_json();
        assert_eq!(v["format_version"], json!(2));
        assert_eq!(v["kv_groups"], json!([[0, 1], [2]]));
        assert_eq!(LatentAttention::from_json(&v, 3, path).unwrap(), shared);
        let sharing = shared.kv_sharing.as_ref().unwrap();
        assert_eq!((sharing.source_of(1), sharing.source_of(2)), (0, 2));
        // A version-1 description has neither key.
        assert!(sample().to_json().get("kv_groups").is_none());
        let refused = |edit: &dyn Fn(&mut Value)| {
            let mut v = shared.to_json();
            edit(&mut v);
            LatentAttention::from_json(&v, 3, path)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&|v| v["kv_groups"] = json!([[0, 2], [1]])).contains("consecutive"));
        assert!(refused(&|v| v["kv_groups"] = json!([[0, 1]])).contains("covering 0..3"));
        assert!(refused(&|v| v["kv_rank"] = json!([4, 5, 6])).contains("equal within"));
        assert!(refused(&|v| v["kv_share"] = json!("both")).contains("kv_share"));
        assert!(refused(&|v| v["format_version"] = json!(1)).contains("need format_version 2"));
    }

    #[test]
    fn module_source_is_embedded() {
        assert!(MODULE_SOURCE.contains("class SurgeryLlamaForCausalLM"));
        assert!(MODULE_SOURCE.contains(&format!("FORMAT_VERSION = {FORMAT_VERSION}")));
    }
}
