//! Fused tensors (Phi-3's `qkv_proj` and `gate_up_proj`) presented as their parts.
//!
//! A fused tensor stacks the rows of several roles, so each part is a contiguous byte range of the
//! stored tensor: opening a checkpoint replaces the fused entry by one [`TensorEntry`] per part,
//! under the part's own table name (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`), and
//! every later stage (fits, the forward pass, the checks) reads the parts as it reads any other
//! family's tensors. The planner writes them back fused (`plan::fused`).

use crate::error::{Error, Result};
use crate::input::entry::{part_label, FusedPart, TensorEntry};
use crate::model::arch::{Classified, Fusion, Role};
use crate::model::config::ModelConfig;
use crate::model::shapes::disagreement;
use std::path::Path;

/// The entries `entry` stands for: its parts for a fused tensor, else itself. A part stored on its
/// own is refused unless the checkpoint is factored (whose format keeps a dense `q_proj` apart from
/// the K/V factors).
pub fn split(config: &ModelConfig, path: &Path, entry: TensorEntry) -> Result<Vec<TensorEntry>> {
    let arch = config.arch;
    let fusion = match entry.class.role {
        Role::Fused(fusion) => fusion,
        role => {
            if let (Some(fusion), None) = (arch.fusion_of(role), &config.latent) {
                let fused = fused_name(config, entry.class.layer, fusion);
                return Err(Error::tensor(
                    path,
                    &entry.name,
                    format!(
                        "stored on its own, but {} keeps it inside `{fused}` (only a factored checkpoint stores it apart)",
                        config.class_name
                    ),
                ));
            }
            return Ok(vec![entry]);
        }
    };
    let (rows, row_bytes) = blocks(config, path, &entry, fusion)?;
    let cols = config.hidden_size;
    let mut start = entry.range.start;
    let mut first_row = 0;
    let mut parts = Vec::with_capacity(rows.len());
    for (&role, &n) in fusion.parts().iter().zip(&rows) {
        let len = n
            .checked_mul(row_bytes)
            .ok_or_else(|| Error::tensor(path, &entry.name, "row block size overflows"))?;
        let layer = entry
            .class
            .layer
            .ok_or_else(|| Error::bug(format!("{}: a fused tensor outside a layer", entry.name)))?;
        let name = arch
            .layer_tensor_name(layer, role)
            .ok_or_else(|| Error::bug(format!("{}: part {role:?} has no name", entry.name)))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::tensor(path, &entry.name, "row block size overflows"))?;
        parts.push(TensorEntry {
            name,
            shard: entry.shard,
            dtype: entry.dtype,
            shape: vec![n, cols],
            range: start..end,
            class: Classified {
                layer: Some(layer),
                role,
            },
            fused: Some(FusedPart {
                name: entry.name.clone(),
                rows: first_row..first_row + n,
            }),
        });
        start = end;
        first_row += n;
    }
    if start != entry.range.end {
        return Err(Error::tensor(
            path,
            &entry.name,
            format!(
                "holds {} bytes, not the {} its shape implies",
                entry.range.len(),
                start - entry.range.start
            ),
        ));
    }
    Ok(parts)
}

/// The rows of each part of the fused `entry` (by head counts and `intermediate_size`) and the
/// bytes of one row, after checking its shape against `config.json`: the blocks must sum to its
/// rows (so a tensor whose rows sum right splits where the heads say) and its width must be
/// `hidden_size`.
fn blocks(
    config: &ModelConfig,
    path: &Path,
    entry: &TensorEntry,
    fusion: Fusion,
) -> Result<(Vec<usize>, usize)> {
    let rows = config.fused_rows(fusion).ok_or_else(|| {
        Error::tensor(
            path,
            &entry.name,
            "config.json has no `intermediate_size` to split it by",
        )
    })?;
    let [stored_rows, cols] = entry.shape[..] else {
        return Err(Error::tensor(
            path,
            &entry.name,
            format!("shape {:?} is not a matrix", entry.shape),
        ));
    };
    let total = rows.iter().try_fold(0usize, |a, &r| a.checked_add(r));
    if total != Some(stored_rows) {
        return Err(Error::tensor(
            path,
            &entry.name,
            format!(
                "shape {:?}: its row blocks do not sum to its rows ({} from config.json)",
                entry.shape,
                describe_blocks(fusion, &rows)
            ),
        ));
    }
    if cols != config.hidden_size {
        return Err(Error::tensor(
            path,
            &entry.name,
            disagreement(&entry.shape, &[stored_rows, config.hidden_size]),
        ));
    }
    let row_bytes = cols
        .checked_mul(entry.dtype.bitsize())
        .filter(|bits| bits % 8 == 0)
        .map(|bits| bits / 8)
        .ok_or_else(|| {
            Error::tensor(
                path,
                &entry.name,
                format!(
                    "rows of {cols} {:?} values are not whole bytes",
                    entry.dtype
                ),
            )
        })?;
    Ok((rows, row_bytes))
}

/// The fused tensor's name in `layer` (for messages).
fn fused_name(config: &ModelConfig, layer: Option<usize>, fusion: Fusion) -> String {
    layer
        .and_then(|l| config.arch.layer_tensor_name(l, Role::Fused(fusion)))
        .unwrap_or_else(|| format!("{fusion:?}"))
}

/// `q_proj 128 + k_proj 32 + v_proj 32 = 192`.
fn describe_blocks(fusion: Fusion, rows: &[usize]) -> String {
    let terms: Vec<String> = fusion
        .parts()
        .iter()
        .zip(rows)
        .map(|(role, n)| format!("{} {n}", part_label(*role)))
        .collect();
    format!("{} = {}", terms.join(" + "), rows.iter().sum::<usize>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;
    use serde_json::json;

    fn phi3(extra: serde_json::Value) -> ModelConfig {
        let mut v = json!({"architectures": ["Phi3ForCausalLM"], "hidden_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
            "intermediate_size": 6});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    fn entry(config: &ModelConfig, role: Role, shape: &[usize], start: usize) -> TensorEntry {
        let name = config.arch.layer_tensor_name(1, role).unwrap();
        let len = shape.iter().product::<usize>() * 2;
        TensorEntry {
            name,
            shard: 0,
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            range: start..start + len,
            class: Classified {
                layer: Some(1),
                role,
            },
            fused: None,
        }
    }

    /// `split` of a stored tensor of `role` and `shape` at byte `start` of layer 1.
    fn split_of(
        c: &ModelConfig,
        role: Role,
        shape: &[usize],
        start: usize,
    ) -> Result<Vec<TensorEntry>> {
        split(c, Path::new("m"), entry(c, role, shape, start))
    }

    #[test]
    fn qkv_splits_into_row_ranges_in_order() {
        let c = phi3(json!({}));
        // q 2 heads x 4 = 8 rows, k and v 4 rows each, 8 columns of bf16 = 16 bytes a row.
        let parts = split_of(&c, Role::Fused(Fusion::Qkv), &[16, 8], 100).unwrap();
        let got: Vec<(&str, Vec<usize>, std::ops::Range<usize>, Role)> = parts
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.shape.clone(),
                    p.range.clone(),
                    p.class.role,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "model.layers.1.self_attn.q_proj.weight",
                    vec![8, 8],
                    100..228,
                    Role::Query
                ),
                (
                    "model.layers.1.self_attn.k_proj.weight",
                    vec![4, 8],
                    228..292,
                    Role::Key
                ),
                (
                    "model.layers.1.self_attn.v_proj.weight",
                    vec![4, 8],
                    292..356,
                    Role::Value
                ),
            ]
        );
        // Each part knows the tensor the file stores and its rows in it, for messages.
        let stored = "model.layers.1.self_attn.qkv_proj.weight";
        let fused: Vec<_> = parts.iter().map(|p| p.fused.clone().unwrap()).collect();
        assert_eq!(
            fused,
            [(0..8), (8..12), (12..16)].map(|rows| FusedPart {
                name: stored.to_string(),
                rows
            })
        );
        let up = split_of(&c, Role::Fused(Fusion::GateUp), &[12, 8], 0).unwrap();
        assert_eq!(up[0].class.role, Role::MlpGate);
        assert_eq!(
            (up[1].class.role, up[1].range.clone()),
            (Role::MlpUp, 96..192)
        );
    }

    #[test]
    fn block_sizes_that_do_not_sum_are_refused_in_one_line() {
        let c = phi3(json!({}));
        let err = split_of(&c, Role::Fused(Fusion::Qkv), &[17, 8], 0)
            .unwrap_err()
            .to_line();
        assert!(err.contains("qkv_proj"), "{err}");
        assert!(err.contains("q_proj 8 + k_proj 4 + v_proj 4 = 16"), "{err}");
        let err = split_of(&c, Role::Fused(Fusion::GateUp), &[10, 8], 0)
            .unwrap_err()
            .to_line();
        assert!(err.contains("gate_proj 6 + up_proj 6 = 12"), "{err}");
        // Rows that sum right but a width other than hidden_size.
        let err = split_of(&c, Role::Fused(Fusion::Qkv), &[16, 9], 0)
            .unwrap_err()
            .to_line();
        assert!(
            err.ends_with(
                "qkv_proj.weight`: shape [16, 9] disagrees with config.json, which implies [16, 8]"
            ),
            "{err}"
        );
        let no_size = phi3(json!({"intermediate_size": null}));
        let err = split_of(&no_size, Role::Fused(Fusion::GateUp), &[12, 8], 0)
            .unwrap_err()
            .to_line();
        assert!(err.contains("intermediate_size"), "{err}");
    }

    #[test]
    fn a_part_stored_apart_is_refused_unless_factored() {
        let c = phi3(json!({}));
        let err = split_of(&c, Role::Key, &[4, 8], 0).unwrap_err().to_line();
        assert!(
            err.contains("inside `model.layers.1.self_attn.qkv_proj.weight`"),
            "{err}"
        );
        // Other roles pass through unchanged.
        let o = split_of(&c, Role::Output, &[8, 8], 0).unwrap();
        assert_eq!(o.len(), 1);
    }
}
