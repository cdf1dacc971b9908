//! Reading the forward pass's weights from a memory-mapped [`Checkpoint`]: each tensor looked up by
//! name, its shape checked against the config, decoded from F32/F16/BF16 to `f32`, and its pages
//! released. Builds the linear maps of one layer, dense or factored as `config.json` says.

use crate::error::{Error, Result};
use crate::forward::layer::OutputNorms;
use crate::forward::linear::{KeyValue, Linear, Projection};
use crate::forward::params::LlamaParams;
use crate::input::checkpoint::Checkpoint;
use crate::model::arch::{AttentionProjection, Factor, Mlp, Role};
use crate::model::dtype::FloatType;
use crate::model::latent::Share;
use crate::model::shapes::{disagreement, Sizes};

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
        if t.shape != shape {
            return Err(ckpt.tensor_error(t, disagreement(&t.shape, shape)));
        }
        let ty = ckpt.float_type(t, "evaluated")?;
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

    /// Checks every tensor [`crate::forward::Llama::layer`] reads for `layer` besides the attention
    /// projections (which [`Checkpoint::open`] checked): names, shapes, dtypes and biases; no data
    /// is decoded.
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        let p = self.params;
        let c = &self.checkpoint.config;
        let qk_norms: &[Role] = if p.family.qk_norm {
            &[Role::QueryNorm, Role::KeyNorm]
        } else {
            &[]
        };
        for &norm in self.norm_roles().iter().chain(qk_norms) {
            let shape = self.shape(Some(layer), norm)?;
            self.raw(&self.layer_name(layer, norm)?, &shape)?;
        }
        for (weight, bias, shape) in self.linears()? {
            self.raw(&self.layer_name(layer, weight)?, &shape)?;
            self.check_bias_role(layer, bias, shape[0])?;
        }
        for (projection, len) in [
            (AttentionProjection::Query, c.q_dim()),
            (AttentionProjection::Key, c.kv_dim()),
            (AttentionProjection::Value, c.kv_dim()),
        ] {
            // A factored projection's bias sits on its up-projection; the dense name must be absent.
            let (dense, stored) = (
                Role::AttentionBias(projection),
                self.stored_bias(layer, projection),
            );
            self.check_bias_role(layer, stored, len)?;
            if stored != dense {
                self.check_bias_absent(layer, dense)?;
            }
        }
        Ok(())
    }

    /// Checks the bias of `role` (`len` values) against the config, by its name in the table.
    fn check_bias_role(&self, layer: usize, role: Role, len: usize) -> Result<()> {
        let (enabled, flag) = self.bias_flag(role);
        match self.bias_name(layer, role)? {
            Some(name) => self.check_bias(&name, len, enabled, flag),
            None => Ok(()),
        }
    }

    /// The name of the bias of `role`; `None` when the family's table has none (the checkpoint's
    /// names were checked at open), which for an enabled bias is a bug.
    fn bias_name(&self, layer: usize, role: Role) -> Result<Option<String>> {
        match self.checkpoint.config.arch.layer_tensor_name(layer, role) {
            None if self.bias_flag(role).0 => {
                Err(Error::bug(format!("no name for the enabled bias {role:?}")))
            }
            name => Ok(name),
        }
    }

    /// A bias the layout replaces must not be present.
    fn check_bias_absent(&self, layer: usize, role: Role) -> Result<()> {
        let Some(name) = self.checkpoint.config.arch.layer_tensor_name(layer, role) else {
            return Ok(());
        };
        match self.checkpoint.tensor(&name) {
            Some(t) => Err(Error::tensor(
                &self.checkpoint.shards[t.shard].path,
                &name,
                "present, but the projection is factored (its bias belongs on the up-projection)",
            )),
            None => Ok(()),
        }
    }

    /// The role `projection`'s bias is stored under in this layer's layout: on the up-projection
    /// when the projection is factored and the family's factored form carries biases, else under
    /// its dense name.
    fn stored_bias(&self, layer: usize, projection: AttentionProjection) -> Role {
        let dense = Role::AttentionBias(projection);
        let factored = dense
            .projection()
            .is_some_and(|role| !self.has(layer, role));
        match Factor::up_of(projection) {
            Some(up) if factored && self.checkpoint.config.arch.factored_biases() => {
                Role::FactorBias(up)
            }
            _ => dense,
        }
    }

    /// The dense linear maps of a layer besides q/k/v: weight role, bias role, `[out, in]`.
    fn linears(&self) -> Result<[(Role, Role, [usize; 2]); 4]> {
        let [o, gate, up, down] = [
            (
                Role::Output,
                Role::AttentionBias(AttentionProjection::Output),
            ),
            (Role::MlpGate, Role::MlpBias(Mlp::Gate)),
            (Role::MlpUp, Role::MlpBias(Mlp::Up)),
            (Role::MlpDown, Role::MlpBias(Mlp::Down)),
        ]
        .map(|(weight, bias)| {
            let shape = self.shape(None, weight)?;
            let shape = <[usize; 2]>::try_from(shape)
                .map_err(|s| Error::bug(format!("{weight:?}: shape {s:?} is not a matrix")))?;
            Ok::<_, Error>((weight, bias, shape))
        });
        Ok([o?, gate?, up?, down?])
    }

    /// The shape of a tensor of `role` (in `layer`; `None` for a global one or a role whose shape
    /// is the same in every layer), from the one source every check reads
    /// ([`crate::model::config::ModelConfig::expected_shape`]).
    pub fn shape(&self, layer: Option<usize>, role: Role) -> Result<Vec<usize>> {
        let sizes = Sizes {
            intermediate: self.params.intermediate_size,
            vocab: self.params.vocab_size,
        };
        self.checkpoint
            .config
            .expected_shape(sizes, layer, role)
            .ok_or_else(|| Error::bug(format!("no shape for {role:?}")))
    }

    /// Whether a bias role is enabled by the config, and what says so.
    fn bias_flag(&self, bias: Role) -> (bool, &'static str) {
        let b = &self.params.family.biases;
        match bias {
            Role::MlpBias(_) => (self.params.mlp_bias, "mlp_bias"),
            Role::AttentionBias(AttentionProjection::Output) => (b.o, b.reason),
            _ => (b.qkv, b.reason),
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
        let (ty, bytes) = self.raw(name, &[out, input])?;
        let linear = Linear::decode(ty, bytes, out, input, bias);
        if let Some(t) = self.checkpoint.tensor(name) {
            self.checkpoint.release(t);
        }
        Ok(linear)
    }

    /// The layer's dense linear maps besides q/k/v, with their biases where the config enables
    /// them: `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    pub fn layer_linears(&self, layer: usize) -> Result<[Linear; 4]> {
        let [o, gate, up, down] = self.linears()?.map(|(weight, bias, [out, input])| {
            let bias = self.bias_values(layer, bias, out)?;
            self.linear(&self.layer_name(layer, weight)?, out, input, bias)
        });
        Ok([o?, gate?, up?, down?])
    }

    /// The values of the bias of `role` (`len`), when the config enables it.
    fn bias_values(&self, layer: usize, role: Role, len: usize) -> Result<Option<Vec<f32>>> {
        let (enabled, flag) = self.bias_flag(role);
        match self.bias_name(layer, role)? {
            Some(name) => self.bias(&name, len, enabled, flag),
            None => Ok(None),
        }
    }

    /// The per-head query and key norms of `layer` (Qwen3, Gemma 3; `None` for other families).
    pub fn qk_norms(&self, layer: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !self.params.family.qk_norm {
            return Ok(None);
        }
        let d = self.params.attention.head_dim;
        let q = self.norm(layer, Role::QueryNorm, d)?;
        let k = self.norm(layer, Role::KeyNorm, d)?;
        Ok(Some((q, k)))
    }

    /// The layer norms every layer has: Llama's two, or Gemma's four.
    fn norm_roles(&self) -> &'static [Role] {
        match self.params.family.gemma {
            None => &[Role::InputNorm, Role::PostAttentionNorm],
            Some(_) => &[
                Role::InputNorm,
                Role::PostAttentionNorm,
                Role::PreFeedforwardNorm,
                Role::PostFeedforwardNorm,
            ],
        }
    }

    /// A norm's effective weight, `len` values: as stored, or for Gemma `1 + w` (its RMSNorm
    /// scales by one plus the stored weight, in `f32`).
    pub fn norm(&self, layer: usize, role: Role, len: usize) -> Result<Vec<f32>> {
        self.norm_named(&self.layer_name(layer, role)?, len)
    }

    /// [`Self::norm`] of the tensor called `name` (the final norm).
    pub fn norm_named(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let mut w = self.values(name, &[len])?;
        if self.params.family.gemma.is_some() {
            w.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(w)
    }

    /// A layer's norms: before attention, before the MLP, and Gemma's after each block.
    pub fn layer_norms(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>, Option<OutputNorms>)> {
        let h = self.params.hidden_size;
        let input = self.norm(layer, Role::InputNorm, h)?;
        if self.params.family.gemma.is_none() {
            return Ok((input, self.norm(layer, Role::PostAttentionNorm, h)?, None));
        }
        let mlp = self.norm(layer, Role::PreFeedforwardNorm, h)?;
        let output = OutputNorms {
            attention: self.norm(layer, Role::PostAttentionNorm, h)?,
            mlp: self.norm(layer, Role::PostFeedforwardNorm, h)?,
        };
        Ok((input, mlp, Some(output)))
    }

    /// The linear map of an attention projection tensor by role (dense or a factor), with its
    /// shape from [`crate::model::config::ModelConfig::attention_tensors`]; refused when it holds
    /// a NaN or an infinity, as a dense projection is before its fit.
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
        let name = self.layer_name(layer, role)?;
        let linear = self.linear(&name, shape[0], shape[1], bias)?;
        let bad = linear.non_finite();
        match self.checkpoint.tensor(&name) {
            Some(t) if bad > 0 => Err(self.checkpoint.tensor_error(
                t,
                format!("layer {layer}: {bad} non-finite values (NaN or infinite); the attention projections must be finite to be evaluated"),
            )),
            _ => Ok(linear),
        }
    }

    /// Whether the layer's layout (from `config.json`) has a tensor of `role`.
    fn has(&self, layer: usize, role: Role) -> bool {
        self.checkpoint
            .config
            .attention_tensors(layer)
            .iter()
            .any(|(r, _)| *r == role)
    }

    /// The attention bias of `projection`, `len` values: under its dense name, or for a factored
    /// projection under its up-projection's name where the family has one.
    fn attention_bias(
        &self,
        layer: usize,
        projection: AttentionProjection,
        len: usize,
    ) -> Result<Option<Vec<f32>>> {
        self.bias_values(layer, self.stored_bias(layer, projection), len)
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
