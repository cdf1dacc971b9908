//! Fit `act`'s left weighting of one layer's stacked members ([`layer_weight`]): the members
//! balanced to equal output energy, or attention-aware (key errors through the queries that read
//! them, value errors through `o_proj`). A group's fit ([`super::group`]) and a fit shared by
//! layers ([`super::shared`]) both weight with it.

use crate::error::{Error, Result};
use crate::execute::AttentionStats;
use crate::fit::act::{
    balance_scales, blockwise_weight, key_weight, shrink_toward_identity, value_weight,
    ActWeighting, Heads, LeftWeight, Weighted,
};
use crate::fit::decompose::matrix_from_rows;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::Role;
use faer::{Mat, MatRef};

/// How far the attention weighting is shrunk toward weighting every output alike
/// (`fit::act::shrink_toward_identity`; 0: not at all, the weighting as measured). 1 gave lower
/// perplexity on three held-out prose domains on SmolLM2 and Gemma 3 at 50% and 25% of the K+V
/// cache, and SmolLM2's greedy answer to the README's chat question turned to nonsense
/// (`docs/quality.md`, "The attention weighting, shrunk"), so it stays off.
const ATTENTION_RIDGE: f64 = 0.0;

/// Fit `act`'s left weighting of one layer's stacked `members` (`w`, inputs of moment `c`),
/// applied ([`Weighted`]: `L`, `L W`, `L W C`).
pub(crate) fn layer_weight(
    checkpoint: &Checkpoint,
    layer: usize,
    members: &[usize],
    weighting: ActWeighting,
    w: MatRef<'_, f64>,
    c: MatRef<'_, f64>,
    stats: Option<&AttentionStats>,
) -> Result<Weighted> {
    let rows: Vec<usize> = members
        .iter()
        .map(|&i| checkpoint.tensors[i].shape[0])
        .collect();
    Ok(match weighting {
        ActWeighting::Energy => {
            Weighted::of(w, c, LeftWeight::Diagonal(balance_scales(w, c, &rows)))
        }
        ActWeighting::Attention | ActWeighting::Projections => {
            // The family's own norms, unless the projections alone are asked for.
            let stats = stats.filter(|_| weighting == ActWeighting::Attention);
            let mut blocks = attention_blocks(checkpoint, layer, members, c, stats)?;
            if weighting == ActWeighting::Attention && ATTENTION_RIDGE > 0.0 {
                for m in blocks.iter_mut().filter_map(|(_, g)| g.as_mut()) {
                    *m = shrink_toward_identity(m.as_ref(), ATTENTION_RIDGE);
                }
            }
            blockwise_weight(w, c, &blocks).map_err(|e| {
                let t = &checkpoint.tensors[members[0]];
                Error::tensor(
                    &checkpoint.shards[t.shard].path,
                    &t.name,
                    format!("layer {layer}: cannot weight the fit: {e}"),
                )
            })?
        }
    })
}

/// Decodes a layer's projection (by role) to `f64`, its pages released afterwards.
fn decode_role(checkpoint: &Checkpoint, layer: usize, role: Role) -> Result<Mat<f64>> {
    let arch = checkpoint.config.arch;
    let name = arch
        .layer_tensor_name(layer, role)
        .ok_or_else(|| Error::bug(format!("the {} name table has no {role:?}", arch.family)))?;
    let t = checkpoint
        .tensor(&name)
        .ok_or_else(|| Error::tensor(&checkpoint.dir, &name, "missing"))?;
    let ft = checkpoint.float_type(t, "read")?;
    if t.shape.len() != 2 {
        return Err(Error::tensor(
            &checkpoint.shards[t.shard].path,
            &t.name,
            format!("expected a matrix, found shape {:?}", t.shape),
        ));
    }
    let values = ft.decode(checkpoint.bytes(t));
    // Read for every budgeted layer before calibration ends: left mapped, Llama-3-8B's `q_proj`
    // and `o_proj` pages would add 2 GB to the resident set.
    checkpoint.release(t);
    Ok(matrix_from_rows(t.shape[0], t.shape[1], &values))
}

/// The attention-aware cost of each member's output errors: keys through the queries that read
/// them, values through `o_proj`; queries unweighted.
fn attention_blocks(
    checkpoint: &Checkpoint,
    layer: usize,
    members: &[usize],
    c: MatRef<'_, f64>,
    stats: Option<&AttentionStats>,
) -> Result<Vec<(usize, Option<Mat<f64>>)>> {
    let cfg = &checkpoint.config;
    let heads = Heads {
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    members
        .iter()
        .map(|&i| {
            let t = &checkpoint.tensors[i];
            let g = match t.class.role {
                Role::Key => match stats.and_then(|s| s.queries.as_ref()) {
                    Some(q) => {
                        let q = q.load()?;
                        let gain = stats.and_then(|s| s.key_gain.as_deref());
                        Some(scale_both((*q).as_ref(), gain))
                    }
                    _ => {
                        let wq = decode_role(checkpoint, layer, Role::Query)?;
                        Some(key_weight(wq.as_ref(), c, heads))
                    }
                },
                Role::Value => {
                    let mut wo = decode_role(checkpoint, layer, Role::Output)?;
                    // A value error reaches the residual stream through o_proj and the norm
                    // after it (Gemma's post_attention_layernorm): its gain scales o_proj's rows.
                    if let Some(g) = stats.and_then(|s| s.output_gain.as_deref()) {
                        for i in 0..wo.nrows() {
                            for j in 0..wo.ncols() {
                                wo[(i, j)] *= g[i];
                            }
                        }
                    }
                    Some(value_weight(wo.as_ref(), heads))
                }
                _ => None,
            };
            Ok((t.shape[0], g))
        })
        .collect()
}

/// `diag(g) m diag(g)`, `g` repeated over `m`'s blocks of its length (a per-head gain); `m`
/// itself without one.
fn scale_both(m: MatRef<'_, f64>, gain: Option<&[f64]>) -> Mat<f64> {
    let g = |i: usize| gain.map_or(1.0, |g| g[i % g.len().max(1)]);
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| g(i) * m[(i, j)] * g(j))
}
