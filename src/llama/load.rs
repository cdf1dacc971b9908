//! Reading the forward pass's weights from a memory-mapped [`Checkpoint`]: each tensor looked up by
//! name, its shape checked against the config, decoded from F32/F16/BF16 to `f32`, and its pages
//! released. Builds the linear maps of one layer, dense or factored as `config.json` says.

use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::llama::linear::{KeyValue, Linear, Projection};
use crate::llama::params::LlamaParams;
use crate::model::arch::{AttentionProjection, Factor, Mlp, Role};
use crate::model::dtype::FloatType;
use crate::model::latent::Share;

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
        let ty = FloatType::of_tensor(t.dtype, path, name, "evaluated")?;
        Ok((ty, ckpt.bytes(t)))
    }

    /// Tensor `name` of `shape`, decoded to `f32` (row-major), its pages released afterwards.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (ty, bytes) = self.raw(name, shape)?;
        let values = ty.decode_f32(bytes);
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
        let h = p.hidden_size;
        let q_dim = p.attention.num_heads * p.attention.head_dim;
        let kv_dim = p.attention.num_kv_heads * p.attention.head_dim;
        for norm in [Role::InputNorm, Role::PostAttentionNorm] {
            self.raw(&self.layer_name(layer, norm)?, &[h])?;
        }
        for (weight, bias, shape) in self.linears() {
            let (enabled, flag) = self.bias_flag(bias);
            self.raw(&self.layer_name(layer, weight)?, &shape)?;
            let bias = self.layer_name(layer, bias)?;
            self.check_bias(&bias, shape[0], enabled, flag)?;
        }
        for (projection, len) in [
            (AttentionProjection::Query, q_dim),
            (AttentionProjection::Key, kv_dim),
            (AttentionProjection::Value, kv_dim),
        ] {
            let bias = self.layer_name(layer, Role::AttentionBias(projection))?;
            self.check_bias(&bias, len, p.attention_bias, "attention_bias")?;
        }
        Ok(())
    }

    /// The dense linear maps of a layer besides q/k/v: weight role, bias role, `[out, in]`.
    fn linears(&self) -> [(Role, Role, [usize; 2]); 4] {
        let p = self.params;
        let (h, inter) = (p.hidden_size, p.intermediate_size);
        let q_dim = p.attention.num_heads * p.attention.head_dim;
        [
            (
                Role::Output,
                Role::AttentionBias(AttentionProjection::Output),
                [h, q_dim],
            ),
            (Role::MlpGate, Role::MlpBias(Mlp::Gate), [inter, h]),
            (Role::MlpUp, Role::MlpBias(Mlp::Up), [inter, h]),
            (Role::MlpDown, Role::MlpBias(Mlp::Down), [h, inter]),
        ]
    }

    /// Whether a bias role is enabled by the config, and the config key that says so.
    fn bias_flag(&self, bias: Role) -> (bool, &'static str) {
        match bias {
            Role::MlpBias(_) => (self.params.mlp_bias, "mlp_bias"),
            _ => (self.params.attention_bias, "attention_bias"),
        }
    }

    /// The name of a per-layer tensor, from the architecture's table.
    pub fn layer_name(&self, layer: usize, role: Role) -> Result<String> {
        let arch = self.checkpoint.config.arch;
        arch.layer_tensor_name(layer, role)
            .ok_or_else(|| Error::bug(format!("the {} name table has no {role:?}", arch.family)))
    }

    /// The name of a global tensor, from the architecture's table.
    pub fn global_name(&self, role: Role) -> Result<&'static str> {
        let arch = self.checkpoint.config.arch;
        arch.global_tensor_name(role)
            .ok_or_else(|| Error::bug(format!("the {} name table has no {role:?}", arch.family)))
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

    /// The layer's dense linear maps besides q/k/v, with their biases where the config enables
    /// them: `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    pub fn layer_linears(&self, layer: usize) -> Result<[Linear; 4]> {
        let [o, gate, up, down] = self.linears().map(|(weight, bias, [out, input])| {
            let (enabled, flag) = self.bias_flag(bias);
            let bias = self.bias(&self.layer_name(layer, bias)?, out, enabled, flag)?;
            self.linear(&self.layer_name(layer, weight)?, out, input, bias)
        });
        Ok([o?, gate?, up?, down?])
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
        self.linear(&self.layer_name(layer, role)?, shape[0], shape[1], bias)
    }

    /// Whether the layer's layout (from `config.json`) has a tensor of `role`.
    fn has(&self, layer: usize, role: Role) -> bool {
        self.checkpoint
            .config
            .attention_tensors(layer)
            .iter()
            .any(|(r, _)| *r == role)
    }

    /// The attention bias of `projection`, `len` values.
    fn attention_bias(
        &self,
        layer: usize,
        projection: AttentionProjection,
        len: usize,
    ) -> Result<Option<Vec<f32>>> {
        let name = self.layer_name(layer, Role::AttentionBias(projection))?;
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
        let q_bias = self.attention_bias(layer, AttentionProjection::Query, q_dim)?;
        let k_bias = self.attention_bias(layer, AttentionProjection::Key, kv_dim)?;
        let v_bias = self.attention_bias(layer, AttentionProjection::Value, kv_dim)?;
        let q = self.projection(layer, Role::Query, Factor::QDown, Factor::QUp, q_bias)?;
        let sharing = c.latent.as_ref().and_then(|l| l.kv_sharing.as_ref());
        let kv = if let Some(sharing) = sharing {
            let source = sharing.source_of(layer);
            let k_up = self.role_linear(layer, Role::Factor(Factor::KUp), k_bias)?;
            let v_up = self.role_linear(layer, Role::Factor(Factor::VUp), v_bias)?;
            let down = || self.role_linear(source, Role::Factor(Factor::KvDown), None);
            match (sharing.share, source == layer) {
                (Share::Basis, _) => KeyValue::Shared {
                    down: down()?,
                    k_up,
                    v_up,
                },
                (Share::Latent, true) => KeyValue::Source {
                    down: down()?,
                    k_up,
                    v_up,
                },
                (Share::Latent, false) => KeyValue::FromSource { k_up, v_up },
            }
        } else if self.has(layer, Role::Factor(Factor::KvDown)) {
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
        assert_eq!(FloatType::F32.decode_f32(&1.5f32.to_le_bytes()), vec![1.5]);
        assert_eq!(
            FloatType::F16.decode_f32(&[0x00, 0x3c, 0x00, 0xc0]),
            vec![1.0, -2.0]
        );
        assert_eq!(
            FloatType::BF16.decode_f32(&[0x80, 0x3f, 0x20, 0x40]),
            vec![1.0, 2.5]
        );
    }
}
