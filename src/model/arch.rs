//! The per-architecture tensor-name table: every Hugging Face tensor name this tool knows lives here.
//!
//! A name is either global (`model.embed_tokens.weight`) or per layer
//! (`model.layers.{N}.self_attn.k_proj.weight`). Each has a [`Role`]: the three projections the
//! surgery may rewrite, the factors of the factored form (`--emit factored`, see
//! `docs/factored-format.md`), and every tensor copied as it is (norms, MLP, embeddings, head,
//! biases). A tensor matching no entry is an error. The forward pass, the planner and the
//! synthetic checkpoints build every name from this table.

/// What a tensor is: every tensor of an architecture has one role, and every name is built from
/// the table by role ([`Architecture::layer_tensor_name`], [`Architecture::global_tensor_name`]).
/// Only the attention projections (and the factored form's factors) are ever rewritten; every
/// other role is copied byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The attention query projection weight `[heads * head_dim, hidden]`.
    Query,
    /// The attention key projection weight `[kv_heads * head_dim, hidden]`.
    Key,
    /// The attention value projection weight `[kv_heads * head_dim, hidden]`.
    Value,
    /// The attention output projection `[hidden, heads * head_dim]`: copied, but read by the
    /// activation-aware fit (V errors are weighted through it) and the forward pass.
    Output,
    /// The bias of one attention projection (`attention_bias`), `[rows]`.
    AttentionBias(AttentionProjection),
    /// The rotary embedding's `inv_freq` buffer some exports carry (never read).
    RotaryInvFreq,
    /// The MLP's gate projection `[intermediate, hidden]`.
    MlpGate,
    /// The MLP's up projection `[intermediate, hidden]`.
    MlpUp,
    /// The MLP's down projection `[hidden, intermediate]`.
    MlpDown,
    /// The bias of one MLP projection (`mlp_bias`).
    MlpBias(Mlp),
    /// The RMSNorm before attention, `[hidden]`.
    InputNorm,
    /// The RMSNorm before the MLP, `[hidden]`.
    PostAttentionNorm,
    /// The token embedding `[vocab, hidden]`.
    Embedding,
    /// The final RMSNorm `[hidden]`.
    FinalNorm,
    /// The output head `[vocab, hidden]` (absent with tied embeddings).
    LmHead,
    /// One factor of a factored projection.
    Factor(Factor),
}

impl Role {
    /// The role of this projection's bias, for the attention projections.
    pub fn bias(self) -> Option<Role> {
        let projection = match self {
            Role::Query => AttentionProjection::Query,
            Role::Key => AttentionProjection::Key,
            Role::Value => AttentionProjection::Value,
            Role::Output => AttentionProjection::Output,
            _ => return None,
        };
        Some(Role::AttentionBias(projection))
    }
}

/// The four attention projections, for their biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttentionProjection {
    /// `q_proj`.
    Query,
    /// `k_proj`.
    Key,
    /// `v_proj`.
    Value,
    /// `o_proj`.
    Output,
}

/// The three MLP projections, for their biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mlp {
    /// `gate_proj`.
    Gate,
    /// `up_proj`.
    Up,
    /// `down_proj`.
    Down,
}

/// The tensors of the factored form: `W' = b @ a`, `a` the down-projection to the latent, `b` the
/// up-projection from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Factor {
    /// `q_a_proj` `[Lq, hidden]`.
    QDown,
    /// `q_b_proj` `[q_dim, Lq]`.
    QUp,
    /// `kv_a_proj` `[L, hidden]`: the latent shared by K and V.
    KvDown,
    /// `k_a_proj` `[Lk, hidden]` (K fitted alone).
    KDown,
    /// `k_b_proj` `[kv_dim, L or Lk]` (from the shared or the K latent).
    KUp,
    /// `v_a_proj` `[Lv, hidden]` (V fitted alone).
    VDown,
    /// `v_b_proj` `[kv_dim, L or Lv]`.
    VUp,
}

/// One architecture family's names.
#[derive(Debug)]
pub struct Architecture {
    /// Family name for messages.
    pub family: &'static str,
    /// `architectures[0]` values in `config.json` that use this table.
    pub class_names: &'static [&'static str],
    /// Prefix of per-layer names, followed by the layer index and a dot.
    pub layer_prefix: &'static str,
    /// Per-layer name suffixes and their roles.
    pub layer_tensors: &'static [(&'static str, Role)],
    /// Global names and their roles.
    pub global_tensors: &'static [(&'static str, Role)],
}

/// Where a tensor name sits in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// The layer index for per-layer tensors.
    pub layer: Option<usize>,
    /// The tensor's role.
    pub role: Role,
}

/// Llama and the families that share its tensor names exactly (Mistral; SmolLM and TinyLlama are
/// `LlamaForCausalLM`).
pub static LLAMA: Architecture = Architecture {
    family: "llama",
    class_names: &["LlamaForCausalLM", "MistralForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[
        ("self_attn.q_proj.weight", Role::Query),
        ("self_attn.k_proj.weight", Role::Key),
        ("self_attn.v_proj.weight", Role::Value),
        ("self_attn.o_proj.weight", Role::Output),
        ("self_attn.q_a_proj.weight", Role::Factor(Factor::QDown)),
        ("self_attn.q_b_proj.weight", Role::Factor(Factor::QUp)),
        ("self_attn.kv_a_proj.weight", Role::Factor(Factor::KvDown)),
        ("self_attn.k_a_proj.weight", Role::Factor(Factor::KDown)),
        ("self_attn.k_b_proj.weight", Role::Factor(Factor::KUp)),
        ("self_attn.v_a_proj.weight", Role::Factor(Factor::VDown)),
        ("self_attn.v_b_proj.weight", Role::Factor(Factor::VUp)),
        (
            "self_attn.q_proj.bias",
            Role::AttentionBias(AttentionProjection::Query),
        ),
        (
            "self_attn.k_proj.bias",
            Role::AttentionBias(AttentionProjection::Key),
        ),
        (
            "self_attn.v_proj.bias",
            Role::AttentionBias(AttentionProjection::Value),
        ),
        (
            "self_attn.o_proj.bias",
            Role::AttentionBias(AttentionProjection::Output),
        ),
        ("self_attn.rotary_emb.inv_freq", Role::RotaryInvFreq),
        ("mlp.gate_proj.weight", Role::MlpGate),
        ("mlp.up_proj.weight", Role::MlpUp),
        ("mlp.down_proj.weight", Role::MlpDown),
        ("mlp.gate_proj.bias", Role::MlpBias(Mlp::Gate)),
        ("mlp.up_proj.bias", Role::MlpBias(Mlp::Up)),
        ("mlp.down_proj.bias", Role::MlpBias(Mlp::Down)),
        ("input_layernorm.weight", Role::InputNorm),
        ("post_attention_layernorm.weight", Role::PostAttentionNorm),
    ],
    global_tensors: &[
        ("model.embed_tokens.weight", Role::Embedding),
        ("model.norm.weight", Role::FinalNorm),
        ("lm_head.weight", Role::LmHead),
    ],
};

/// All supported architectures.
pub static ARCHITECTURES: &[&Architecture] = &[&LLAMA];

/// The table for a `config.json` `architectures[0]` value.
pub fn find(class_name: &str) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.class_names.contains(&class_name))
}

/// Every supported class name, for error messages.
pub fn supported_class_names() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.class_names.iter().copied())
        .collect()
}

impl Architecture {
    /// Looks a tensor name up; `None` when the name is not in the table.
    pub fn classify(&self, name: &str) -> Option<Classified> {
        if let Some(rest) = name.strip_prefix(self.layer_prefix) {
            let (index, suffix) = rest.split_once('.')?;
            if index.is_empty()
                || !index.bytes().all(|b| b.is_ascii_digit())
                || (index.len() > 1 && index.starts_with('0'))
            {
                return None;
            }
            let layer: usize = index.parse().ok()?;
            let role = self
                .layer_tensors
                .iter()
                .find(|(s, _)| *s == suffix)
                .map(|(_, r)| *r)?;
            return Some(Classified {
                layer: Some(layer),
                role,
            });
        }
        self.global_tensors
            .iter()
            .find(|(s, _)| *s == name)
            .map(|(_, role)| Classified {
                layer: None,
                role: *role,
            })
    }

    /// The name of a global (not per-layer) tensor.
    pub fn global_tensor_name(&self, role: Role) -> Option<&'static str> {
        self.global_tensors
            .iter()
            .find(|(_, r)| *r == role)
            .map(|(name, _)| *name)
    }

    /// The name of a per-layer tensor.
    pub fn layer_tensor_name(&self, layer: usize, role: Role) -> Option<String> {
        self.layer_tensors
            .iter()
            .find(|(_, r)| *r == role)
            .map(|(suffix, _)| format!("{}{layer}.{suffix}", self.layer_prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_llama_names() {
        let c = LLAMA
            .classify("model.layers.12.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(
            c,
            Classified {
                layer: Some(12),
                role: Role::Key
            }
        );
        let c = LLAMA.classify("model.layers.0.mlp.up_proj.weight").unwrap();
        assert_eq!(c.role, Role::MlpUp);
        assert_eq!(LLAMA.classify("lm_head.weight").unwrap().layer, None);
        assert!(LLAMA
            .classify("model.layers.x.self_attn.k_proj.weight")
            .is_none());
        assert!(LLAMA
            .classify("model.layers.01.self_attn.k_proj.weight")
            .is_none());
        assert!(LLAMA
            .classify("model.layers.0.self_attn.k_proj.scales")
            .is_none());
        assert!(LLAMA
            .classify("transformer.h.0.attn.c_attn.weight")
            .is_none());
    }

    #[test]
    fn names_round_trip() {
        let factors = [
            Factor::QDown,
            Factor::QUp,
            Factor::KvDown,
            Factor::KDown,
            Factor::KUp,
            Factor::VDown,
            Factor::VUp,
        ];
        let roles = [Role::Query, Role::Key, Role::Value]
            .into_iter()
            .chain(factors.into_iter().map(Role::Factor));
        for role in roles {
            let name = LLAMA.layer_tensor_name(3, role).unwrap();
            assert_eq!(
                LLAMA.classify(&name),
                Some(Classified {
                    layer: Some(3),
                    role
                })
            );
        }
    }

    #[test]
    fn every_name_is_found_by_its_role() {
        for &(suffix, role) in LLAMA.layer_tensors {
            let name = LLAMA.layer_tensor_name(7, role).unwrap();
            assert_eq!(name, format!("model.layers.7.{suffix}"));
            assert_eq!(LLAMA.classify(&name).unwrap().role, role);
        }
        for &(name, role) in LLAMA.global_tensors {
            assert_eq!(LLAMA.global_tensor_name(role), Some(name));
            assert_eq!(
                LLAMA.classify(name).unwrap(),
                Classified { layer: None, role }
            );
        }
        assert_eq!(LLAMA.global_tensor_name(Role::Query), None);
        assert_eq!(LLAMA.layer_tensor_name(0, Role::Embedding), None);
    }

    #[test]
    fn finds_supported_classes() {
        assert!(find("LlamaForCausalLM").is_some());
        assert!(find("MistralForCausalLM").is_some());
        assert!(find("GPT2LMHeadModel").is_none());
    }

    #[test]
    fn factored_names() {
        assert_eq!(
            LLAMA
                .layer_tensor_name(2, Role::Factor(Factor::KvDown))
                .unwrap(),
            "model.layers.2.self_attn.kv_a_proj.weight"
        );
        assert_eq!(
            LLAMA
                .layer_tensor_name(0, Role::Factor(Factor::VUp))
                .unwrap(),
            "model.layers.0.self_attn.v_b_proj.weight"
        );
    }
}
