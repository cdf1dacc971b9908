//! Reading the forward pass's weights from a memory-mapped [`Checkpoint`]: each tensor looked up by
//! name, its shape checked against the config, decoded from F32/F16/BF16 to `f32`, and its pages
//! released. Builds the linear maps of one layer, dense or factored as `config.json` says.

use crate::model::arch::{Factor, Role};
use crate::input::checkpoint::Checkpoint;
use crate::model::dtype::FloatType;
use crate::error::{Error, Result};
use crate::llama::linear::{KeyValue, Linear, Projection};
use crate::llama::params::LlamaParams;
use half::{bf16, f16};

/// Decodes little-endian values of `ty` to `f32` (exact for F16 and BF16).
pub fn decode_f32(ty: FloatType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        FloatType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FloatType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FloatType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Tensor access for the forward pass.
#[derive(Debug, Clone, Copy)]
pub struct Loader<'a> {
    /// The opened checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// Its resolved parameters.
    pub params: &'a LlamaParams,
}

impl<'a> Loader<'a> {
    /// The float type and bytes of tensor `name` after checking its `shape`.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<(FloatType, &'a [u8])> {
        let ckpt = self.checkpoint;
        let t = ckpt
            .tensor(name)
            .ok_or_else(|| Error::tensor(&ckpt.dir, name, "missing from the checkpoint"))?;
        let path = &ckpt.shards[t.shard].path;
        if t.shape != shape {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "shape {:?} disagrees with config.json, which implies {shape:?}",
                    t.shape
                ),
            ));
        }
        let ty = FloatType::from_dtype(t.dtype).ok_or_else(|| {
            Error::tensor(
                path,
                name,
                format!(
                    "dtype {:?} is not supported by eval (F32, F16, BF16)",
                    t.dtype
                ),
            )
        })?;
        Ok((ty, ckpt.bytes(t)))
    }

    /// Tensor `name` of `shape`, decoded to `f32` (row-major), its pages released afterwards.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (ty, bytes) = self.raw(name, shape)?;
        let values = decode_f32(ty, bytes);
        if let Some(t) = self.checkpoint.tensor(name) {
            self.checkpoint.release(t);
        }
        Ok(values)
    }

    /// A bias of `len` values: required when `enabled` (the config's `attention_bias` / `mlp_bias`),
    /// refused when present without it (transformers would ignore it).
    pub fn bias(
        &self,
        name: &str,
        len: usize,
        enabled: bool,
        flag: &str,
    ) -> Result<Option<Vec<f32>>> {
        self.check_bias(name, len, enabled, flag)?;
        if enabled {
            return self.values(name, &[len]).map(Some);
        }
        Ok(None)
    }

    /// Checks what [`Self::bias`] would read, without decoding anything.
    pub fn check_bias(&self, name: &str, len: usize, enabled: bool, flag: &str) -> Result<()> {
        if enabled {
            return self.raw(name, &[len]).map(|_| ());
        }
        match self.checkpoint.tensor(name) {
            Some(t) => Err(Error::tensor(
                &self.checkpoint.shards[t.shard].path,
                name,
                format!("present, but config.json's {flag} is false"),
            )),
            None => Ok(()),
        }
    }

    /// Checks every tensor [`crate::llama::Llama::layer`] reads for `layer` besides the attention
    /// projections (which [`Checkpoint::open`] checked): names, shapes, dtypes and biases; no data
    /// is decoded.
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        let p = self.params;
        let (h, inter) = (p.hidden_size, p.intermediate_size);
        let q_dim = p.attention.num_heads * p.attention.head_dim;
        let kv_dim = p.attention.num_kv_heads * p.attention.head_dim;
        for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            self.raw(&self.layer_name(layer, norm), &[h])?;
        }
        let linears = [
            (
                "self_attn.o_proj",
                [h, q_dim],
                p.attention_bias,
                "attention_bias",
            ),
            ("mlp.gate_proj", [inter, h], p.mlp_bias, "mlp_bias"),
            ("mlp.up_proj", [inter, h], p.mlp_bias, "mlp_bias"),
            ("mlp.down_proj", [h, inter], p.mlp_bias, "mlp_bias"),
        ];
        for (base, shape, enabled, flag) in linears {
            self.raw(&self.layer_name(layer, &format!("{base}.weight")), &shape)?;
            let bias = self.layer_name(layer, &format!("{base}.bias"));
            self.check_bias(&bias, shape[0], enabled, flag)?;
        }
        for (base, len) in [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)] {
            let bias = self.layer_name(layer, &format!("self_attn.{base}.bias"));
            self.check_bias(&bias, len, p.attention_bias, "attention_bias")?;
        }
        Ok(())
    }

    /// The full name of a per-layer tensor from its suffix (e.g. `mlp.up_proj.weight`).
    pub fn layer_name(&self, layer: usize, suffix: &str) -> String {
        format!(
            "{}{layer}.{suffix}",
            self.checkpoint.config.arch.layer_prefix
        )
    }

    /// The linear map of weight `name` `[out, in]` with an optional bias.
    pub fn linear(
        &self,
        name: &str,
        out: usize,
        input: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<Linear> {
        let values = self.values(name, &[out, input])?;
        Ok(Linear::from_row_major(&values, out, input, bias))
    }

    /// A per-layer linear map by suffix (`mlp.gate_proj`), with its `.bias` when `bias_enabled`.
    pub fn layer_linear(
        &self,
        layer: usize,
        base: &str,
        out: usize,
        input: usize,
        bias_enabled: bool,
        flag: &str,
    ) -> Result<Linear> {
        let bias = self.bias(
            &self.layer_name(layer, &format!("{base}.bias")),
            out,
            bias_enabled,
            flag,
        )?;
        self.linear(
            &self.layer_name(layer, &format!("{base}.weight")),
            out,
            input,
            bias,
        )
    }

    /// The linear map of an attention projection tensor by role, with its shape from
    /// [`crate::model::config::ModelConfig::attention_tensors`].
    fn role_linear(&self, layer: usize, role: Role, bias: Option<Vec<f32>>) -> Result<Linear> {
        let c = &self.checkpoint.config;
        let shape = c
            .attention_tensors(layer)
            .into_iter()
            .find(|(r, _)| *r == role)
            .map(|(_, s)| s)
            .ok_or_else(|| {
                Error::invalid(
                    self.checkpoint.dir.join(crate::model::layout::CONFIG_FILE),
                    format!("layer {layer}: no {role:?} tensor in this layout"),
                )
            })?;
        let name = c.arch.layer_tensor_name(layer, role).ok_or_else(|| {
            Error::invalid(&self.checkpoint.dir, format!("no tensor name for {role:?}"))
        })?;
        self.linear(&name, shape[0], shape[1], bias)
    }

    /// Whether the layer's layout (from `config.json`) has a tensor of `role`.
    fn has(&self, layer: usize, role: Role) -> bool {
        self.checkpoint
            .config
            .attention_tensors(layer)
            .iter()
            .any(|(r, _)| *r == role)
    }

    /// The attention bias of projection `base` (`self_attn.q_proj`), `len` values.
    fn attention_bias(&self, layer: usize, base: &str, len: usize) -> Result<Option<Vec<f32>>> {
        let name = self.layer_name(layer, &format!("self_attn.{base}.bias"));
        self.bias(&name, len, self.params.attention_bias, "attention_bias")
    }

    /// One query/key/value projection: dense under `dense`, else factored as `down`, `up`.
    fn projection(
        &self,
        layer: usize,
        dense: Role,
        down: Factor,
        up: Factor,
        bias: Option<Vec<f32>>,
    ) -> Result<Projection> {
        if self.has(layer, dense) {
            return Ok(Projection::Dense(self.role_linear(layer, dense, bias)?));
        }
        Ok(Projection::Factored {
            down: self.role_linear(layer, Role::Factor(down), None)?,
            up: self.role_linear(layer, Role::Factor(up), bias)?,
        })
    }

    /// The query projection and the key/value pair of `layer`.
    pub fn attention(&self, layer: usize) -> Result<(Projection, KeyValue)> {
        let c = &self.checkpoint.config;
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let q_bias = self.attention_bias(layer, "q_proj", q_dim)?;
        let k_bias = self.attention_bias(layer, "k_proj", kv_dim)?;
        let v_bias = self.attention_bias(layer, "v_proj", kv_dim)?;
        let q = self.projection(layer, Role::Query, Factor::QDown, Factor::QUp, q_bias)?;
        let kv = if self.has(layer, Role::Factor(Factor::KvDown)) {
            KeyValue::Shared {
                down: self.role_linear(layer, Role::Factor(Factor::KvDown), None)?,
                k_up: self.role_linear(layer, Role::Factor(Factor::KUp), k_bias)?,
                v_up: self.role_linear(layer, Role::Factor(Factor::VUp), v_bias)?,
            }
        } else {
            KeyValue::Separate {
                k: self.projection(layer, Role::Key, Factor::KDown, Factor::KUp, k_bias)?,
                v: self.projection(layer, Role::Value, Factor::VDown, Factor::VUp, v_bias)?,
            }
        };
        Ok((q, kv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_float_type() {
        assert_eq!(decode_f32(FloatType::F32, &1.5f32.to_le_bytes()), vec![1.5]);
        assert_eq!(
            decode_f32(FloatType::F16, &[0x00, 0x3c, 0x00, 0xc0]),
            vec![1.0, -2.0]
        );
        assert_eq!(
            decode_f32(FloatType::BF16, &[0x80, 0x3f, 0x20, 0x40]),
            vec![1.0, 2.5]
        );
    }
}
