//! The shape every tensor of a checkpoint must have, from `config.json`: one function for every
//! role of the name table ([`ModelConfig::expected_shape`]), read by the checks of an opened
//! checkpoint (`input::checkpoint`, every tensor, copied ones included), by the split of fused
//! tensors (`input::fused`, by head counts) and by the forward pass (`forward::load`), so they cannot
//! disagree. Also which tensors every layer and every checkpoint must hold.

use crate::model::arch::{AttentionProjection, Factor, Fusion, Mlp, Role};
use crate::model::config::ModelConfig;
use crate::model::latent::KvMode;

/// The sizes a shape is made of besides those [`ModelConfig`] always has: `intermediate_size` and
/// `vocab_size`, as `config.json` gives them or, where it does not, as the checkpoint's own
/// tensors do (the first `gate_proj`, the embedding), so that every tensor still agrees with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The MLP's width.
    pub intermediate: usize,
    /// The vocabulary: rows of the embedding and the head.
    pub vocab: usize,
}

impl ModelConfig {
    /// The shape a tensor of `role` (in `layer`, `None` for a global tensor) must have; `None`
    /// where `config.json` implies none (the rotary `inv_freq` buffer, never read), for a factor
    /// `config.json`'s `latent_attention` does not place in this layer (refused by the caller as
    /// unexpected), or where a dimension overflows.
    pub fn expected_shape(
        &self,
        sizes: Sizes,
        layer: Option<usize>,
        role: Role,
    ) -> Option<Vec<usize>> {
        let (h, q, kv) = (self.hidden_size, self.q_dim(), self.kv_dim());
        let inter = sizes.intermediate;
        let shape = match role {
            Role::Query | Role::Key | Role::Value | Role::Factor(_) => {
                let listed = layer.and_then(|l| {
                    self.attention_tensors(l)
                        .into_iter()
                        .find(|&(r, _)| r == role)
                        .map(|(_, s)| s.to_vec())
                });
                return listed.or(match role {
                    Role::Query => Some(vec![q, h]),
                    Role::Key | Role::Value => Some(vec![kv, h]),
                    _ => None,
                });
            }
            Role::Output => vec![h, q],
            Role::MlpGate | Role::MlpUp => vec![inter, h],
            Role::MlpDown => vec![h, inter],
            Role::MlpBias(Mlp::Gate | Mlp::Up) => vec![inter],
            Role::MlpBias(Mlp::Down) => vec![h],
            Role::InputNorm
            | Role::PostAttentionNorm
            | Role::PreFeedforwardNorm
            | Role::PostFeedforwardNorm
            | Role::FinalNorm => vec![h],
            Role::Embedding | Role::LmHead => vec![sizes.vocab, h],
            Role::AttentionBias(_) | Role::FactorBias(_) | Role::QueryNorm | Role::KeyNorm => {
                vec![self.vector_len(role)?]
            }
            Role::Fused(Fusion::Qkv) => vec![q.checked_add(kv.checked_mul(2)?)?, h],
            Role::Fused(Fusion::GateUp) => vec![inter.checked_mul(2)?, h],
            Role::RotaryInvFreq => return None,
        };
        Some(shape)
    }

    /// Whether every layer must hold a tensor of `role` (when the family's table names it):
    /// `o_proj`, the MLP, the norms and the per-head norms. The attention projections are checked
    /// apart (dense or factored, [`Self::attention_tensors`]); biases depend on flags only the
    /// forward pass reads.
    pub fn required_in_every_layer(role: Role) -> bool {
        matches!(
            role,
            Role::Output
                | Role::MlpGate
                | Role::MlpUp
                | Role::MlpDown
                | Role::InputNorm
                | Role::PostAttentionNorm
                | Role::PreFeedforwardNorm
                | Role::PostFeedforwardNorm
                | Role::QueryNorm
                | Role::KeyNorm
        )
    }

    /// The global tensors every checkpoint must hold: the embedding, the final norm, and the head
    /// unless it is tied to the embedding.
    pub fn required_globals(&self) -> Vec<Role> {
        let mut roles = vec![Role::Embedding, Role::FinalNorm];
        if !self.tie_word_embeddings {
            roles.push(Role::LmHead);
        }
        roles
    }

    /// The length of a one-dimensional attention tensor of `role`: a projection's bias (on its
    /// dense or up-projection), or a per-head norm; `None` for other roles.
    pub fn vector_len(&self, role: Role) -> Option<usize> {
        use AttentionProjection as P;
        match role {
            Role::AttentionBias(P::Query) | Role::FactorBias(Factor::QUp) => Some(self.q_dim()),
            Role::AttentionBias(P::Key | P::Value)
            | Role::FactorBias(Factor::KUp | Factor::VUp) => Some(self.kv_dim()),
            Role::AttentionBias(P::Output) => Some(self.hidden_size),
            Role::QueryNorm | Role::KeyNorm => Some(self.head_dim),
            _ => None,
        }
    }

    /// The rows of each part of a fused tensor, top to bottom, by head counts (`q_proj`:
    /// `num_attention_heads * head_dim`, `k_proj` and `v_proj`: `num_key_value_heads * head_dim`)
    /// or by `intermediate_size` (`None`: `config.json` does not give it, for `gate_up_proj`).
    pub fn fused_rows(&self, fusion: Fusion) -> Option<Vec<usize>> {
        match fusion {
            Fusion::Qkv => Some(vec![self.q_dim(), self.kv_dim(), self.kv_dim()]),
            Fusion::GateUp => self.intermediate_size.map(|n| vec![n, n]),
        }
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
            (Some(KvMode::Shared), Some(r)) => {
                // With cross-layer sharing only a group's source layer holds the down-projection.
                let source = l.kv_sharing.as_ref().map_or(layer, |s| s.source_of(layer));
                if source == layer {
                    out.push((Role::Factor(Factor::KvDown), [r, h]));
                }
                out.extend([
                    (Role::Factor(Factor::KUp), [kv, r]),
                    (Role::Factor(Factor::VUp), [kv, r]),
                ]);
            }
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
}

/// `shape [4, 8] disagrees with config.json, which implies [8, 8]`.
pub fn disagreement(found: &[usize], want: &[usize]) -> String {
    format!("shape {found:?} disagrees with config.json, which implies {want:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Classified;
    use serde_json::json;
    use std::path::Path;

    fn parse(v: serde_json::Value) -> ModelConfig {
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    const SIZES: Sizes = Sizes {
        intermediate: 16,
        vocab: 32,
    };

    /// The shape of `name` in `config`.
    fn shape(config: &ModelConfig, name: &str) -> Option<Vec<usize>> {
        let Classified { layer, role } = config.arch.classify(name).unwrap();
        config.expected_shape(SIZES, layer, role)
    }

    #[test]
    fn every_role_has_the_shape_config_json_implies() {
        // Hidden 8, 2 heads of 6 (explicit head_dim), 1 KV head: q 12 rows, k and v 6.
        let c = parse(
            json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6,
            "num_hidden_layers": 2}),
        );
        let l = "model.layers.1.";
        for (suffix, want) in [
            ("self_attn.q_proj.weight", vec![12, 8]),
            ("self_attn.k_proj.weight", vec![6, 8]),
            ("self_attn.v_proj.weight", vec![6, 8]),
            ("self_attn.o_proj.weight", vec![8, 12]),
            ("self_attn.q_proj.bias", vec![12]),
            ("self_attn.k_proj.bias", vec![6]),
            ("self_attn.o_proj.bias", vec![8]),
            ("self_attn.q_norm.weight", vec![6]),
            ("self_attn.k_norm.weight", vec![6]),
            ("mlp.gate_proj.weight", vec![16, 8]),
            ("mlp.up_proj.weight", vec![16, 8]),
            ("mlp.down_proj.weight", vec![8, 16]),
            ("input_layernorm.weight", vec![8]),
            ("post_attention_layernorm.weight", vec![8]),
        ] {
            assert_eq!(shape(&c, &format!("{l}{suffix}")), Some(want), "{suffix}");
        }
        assert_eq!(shape(&c, "model.embed_tokens.weight"), Some(vec![32, 8]));
        assert_eq!(shape(&c, "lm_head.weight"), Some(vec![32, 8]));
        assert_eq!(shape(&c, "model.norm.weight"), Some(vec![8]));
        assert_eq!(
            shape(&c, &format!("{l}self_attn.rotary_emb.inv_freq")),
            None
        );
    }

    #[test]
    fn fused_tensors_stack_their_parts_by_head_counts() {
        let c = parse(
            json!({"architectures": ["Phi3ForCausalLM"], "hidden_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
            "intermediate_size": 16}),
        );
        let l = "model.layers.0.";
        assert_eq!(
            shape(&c, &format!("{l}self_attn.qkv_proj.weight")),
            Some(vec![16, 8])
        );
        assert_eq!(
            shape(&c, &format!("{l}mlp.gate_up_proj.weight")),
            Some(vec![32, 8])
        );
        assert_eq!(c.fused_rows(Fusion::Qkv), Some(vec![8, 4, 4]));
        assert_eq!(c.fused_rows(Fusion::GateUp), Some(vec![16, 16]));
        let huge = Sizes {
            intermediate: usize::MAX,
            vocab: 1,
        };
        assert_eq!(
            c.expected_shape(huge, Some(0), Role::Fused(Fusion::GateUp)),
            None
        );
    }

    #[test]
    fn factors_take_their_widths_from_latent_attention() {
        let c = parse(
            json!({"architectures": ["SurgeryLlamaForCausalLM"], "hidden_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
            "latent_attention": {"format_version": 1, "kv": "shared", "kv_rank": [3, 5],
                "original_architectures": ["LlamaForCausalLM"]}}),
        );
        assert_eq!(
            shape(&c, "model.layers.1.self_attn.kv_a_proj.weight"),
            Some(vec![5, 8])
        );
        assert_eq!(
            shape(&c, "model.layers.0.self_attn.k_b_proj.weight"),
            Some(vec![4, 3])
        );
        // A factor the description does not place has no shape (it is refused as unexpected).
        assert_eq!(shape(&c, "model.layers.0.self_attn.q_a_proj.weight"), None);
        assert_eq!(
            shape(&c, "model.layers.0.self_attn.q_proj.weight"),
            Some(vec![8, 8])
        );
    }

    #[test]
    fn required_tensors() {
        let c = parse(
            json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
            "num_attention_heads": 2, "num_hidden_layers": 2, "tie_word_embeddings": true}),
        );
        assert_eq!(c.required_globals(), [Role::Embedding, Role::FinalNorm]);
        assert!(ModelConfig::required_in_every_layer(Role::MlpDown));
        assert!(!ModelConfig::required_in_every_layer(Role::Query));
        assert!(!ModelConfig::required_in_every_layer(Role::MlpBias(
            Mlp::Up
        )));
    }
}
