//! Fused tensors written back whole: a family that stores several roles in one tensor (Phi-3's
//! `qkv_proj`, `gate_up_proj`) is read as its parts (`input::fused`), and wherever every part of a
//! layer's fused tensor is among the output tensors (the dense layout, `expand`, and a factored
//! layout's `gate_up_proj`), they become one tensor under the fused name whose bytes are the
//! parts' one after the other. Parts the factored form replaces (K and V by their factors) leave
//! the rest on their own (`q_proj`), as `docs/factored-format.md` defines.

use super::shards::Placed;
use super::{Op, TensorPlan};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use std::collections::{HashMap, HashSet};

/// `out` with each complete set of a fused tensor's parts replaced by the fused tensor, placed
/// where its first part was.
pub(super) fn fuse(checkpoint: &Checkpoint, out: Vec<Placed>) -> Result<Vec<Placed>> {
    let config = &checkpoint.config;
    let arch = config.arch;
    if arch.fusions().next().is_none() {
        return Ok(out);
    }
    let at: HashMap<String, usize> = out
        .iter()
        .enumerate()
        .map(|(i, p)| (p.tensor.name.clone(), i))
        .collect();
    // Output index of a fusion's first part -> (fused name, the parts' output indices).
    let mut fusions: HashMap<usize, (String, Vec<usize>)> = HashMap::new();
    for layer in 0..config.num_layers {
        for fusion in arch.fusions() {
            let parts: Option<Vec<usize>> = fusion
                .parts()
                .iter()
                .map(|&role| {
                    arch.layer_tensor_name(layer, role)
                        .and_then(|name| at.get(&name).copied())
                })
                .collect();
            let (Some(parts), Some(name)) =
                (parts, arch.layer_tensor_name(layer, Role::Fused(fusion)))
            else {
                continue;
            };
            fusions.insert(parts[0], (name, parts));
        }
    }
    let in_fusion: HashSet<usize> = fusions.values().flat_map(|(_, p)| p.clone()).collect();
    let mut slots: Vec<Option<Placed>> = out.into_iter().map(Some).collect();
    let mut fused_out = Vec::with_capacity(slots.len());
    for i in 0..slots.len() {
        match fusions.remove(&i) {
            Some((name, parts)) => {
                let parts: Vec<Placed> = parts.iter().filter_map(|&p| slots[p].take()).collect();
                fused_out.push(fused(checkpoint, name, parts)?);
            }
            None if in_fusion.contains(&i) => {}
            None => {
                if let Some(p) = slots[i].take() {
                    fused_out.push(p);
                }
            }
        }
    }
    Ok(fused_out)
}

/// One fused tensor from its placed parts (same dtype and columns, rows stacked).
fn fused(checkpoint: &Checkpoint, name: String, parts: Vec<Placed>) -> Result<Placed> {
    let first = parts
        .first()
        .ok_or_else(|| Error::bug(format!("{name}: a fused tensor without parts")))?;
    let (dtype, cols, home, key) = (
        first.tensor.dtype,
        first.tensor.shape.get(1).copied(),
        first.home,
        (first.key.0, first.key.1, name.clone()),
    );
    let mut rows = 0usize;
    let mut byte_len = 0usize;
    for p in &parts {
        let t = &p.tensor;
        if t.dtype != dtype || t.shape.len() != 2 || t.shape.get(1).copied() != cols {
            return Err(Error::invalid(
                &checkpoint.dir,
                format!(
                    "cannot write `{name}` fused: its parts are {}",
                    parts
                        .iter()
                        .map(|p| format!(
                            "`{}` {:?} {:?}",
                            p.tensor.name, p.tensor.dtype, p.tensor.shape
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        rows = rows
            .checked_add(t.shape[0])
            .ok_or_else(|| Error::bug(format!("{name}: rows overflow")))?;
        byte_len = byte_len
            .checked_add(t.byte_len)
            .ok_or_else(|| Error::bug(format!("{name}: bytes overflow")))?;
    }
    let tensor = TensorPlan {
        name,
        dtype,
        shape: vec![rows, cols.unwrap_or(0)],
        byte_len,
        op: Op::Fused {
            parts: parts.into_iter().map(|p| p.tensor).collect(),
        },
    };
    Ok(Placed { tensor, home, key })
}
