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
    /// `post_attention_layernorm`, `[hidden]`: the RMSNorm before the MLP (Llama, Qwen), or Gemma's
    /// norm of the attention block's output.
    PostAttentionNorm,
    /// Gemma's RMSNorm before the MLP, `[hidden]`.
    PreFeedforwardNorm,
    /// Gemma's RMSNorm of the MLP's output, `[hidden]`.
    PostFeedforwardNorm,
    /// The token embedding `[vocab, hidden]`.
    Embedding,
    /// The final RMSNorm `[hidden]`.
    FinalNorm,
    /// The output head `[vocab, hidden]` (absent with tied embeddings).
    LmHead,
    /// One factor of a factored projection.
    Factor(Factor),
    /// The bias of a factored projection, on its up-projection (`q_b`, `k_b`, `v_b`), `[rows]`.
    FactorBias(Factor),
    /// Qwen3's per-head RMSNorm of the queries, `[head_dim]`.
    QueryNorm,
    /// Qwen3's per-head RMSNorm of the keys, `[head_dim]`.
    KeyNorm,
    /// Several roles' rows stacked in one stored tensor (Phi-3's `qkv_proj`, `gate_up_proj`).
    /// Opening a checkpoint splits it into its parts (each a row range of the stored bytes, under
    /// the part's own name), and a dense output writes the parts back fused.
    Fused(Fusion),
}

/// A stored tensor holding the rows of several roles, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fusion {
    /// `qkv_proj`: `q_proj`, `k_proj` and `v_proj` rows, in that order.
    Qkv,
    /// `gate_up_proj`: `gate_proj` then `up_proj` rows.
    GateUp,
}

impl Fusion {
    /// The roles whose rows the fused tensor holds, top to bottom.
    pub fn parts(self) -> &'static [Role] {
        match self {
            Fusion::Qkv => &[Role::Query, Role::Key, Role::Value],
            Fusion::GateUp => &[Role::MlpGate, Role::MlpUp],
        }
    }
}

impl Factor {
    /// The projection whose bias up-projection `self` carries (the inverse of [`Factor::up_of`]).
    pub fn biased_projection(self) -> Option<AttentionProjection> {
        match self {
            Factor::QUp => Some(AttentionProjection::Query),
            Factor::KUp => Some(AttentionProjection::Key),
            Factor::VUp => Some(AttentionProjection::Value),
            _ => None,
        }
    }

    /// The up-projection of the factored projection that replaces `bias`'s projection, which
    /// carries that bias (`None` for `o_proj`, never factored).
    pub fn up_of(bias: AttentionProjection) -> Option<Factor> {
        match bias {
            AttentionProjection::Query => Some(Factor::QUp),
            AttentionProjection::Key => Some(Factor::KUp),
            AttentionProjection::Value => Some(Factor::VUp),
            AttentionProjection::Output => None,
        }
    }
}

impl Role {
    /// The projection an attention bias belongs to (the inverse of [`Role::bias`]).
    pub fn projection(self) -> Option<Role> {
        match self {
            Role::AttentionBias(AttentionProjection::Query) => Some(Role::Query),
            Role::AttentionBias(AttentionProjection::Key) => Some(Role::Key),
            Role::AttentionBias(AttentionProjection::Value) => Some(Role::Value),
            Role::AttentionBias(AttentionProjection::Output) => Some(Role::Output),
            _ => None,
        }
    }

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

/// The architecture families: what the config parser and the forward pass do differently
/// (`model::config`, `forward::params`) is keyed on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM`, `MistralForCausalLM`.
    Llama,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): q/k/v biases, optional sliding window.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head `q_norm`/`k_norm`, explicit `head_dim`.
    Qwen3,
    /// `Gemma2ForCausalLM`: sandwich norms with `(1 + w)`, scaled embeddings, GeLU-tanh MLP,
    /// `query_pre_attn_scalar`, attention and final logit soft-capping, alternating sliding layers.
    Gemma2,
    /// `Gemma3ForCausalLM` (text): Gemma 2 without soft-capping, plus `q_norm`/`k_norm` and a RoPE
    /// per layer type (local and global).
    Gemma3,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`, partial rotary where configured, a
    /// sliding window on every layer when configured.
    Phi3,
}

/// What a factored checkpoint of a family is called, and the module files that load it.
#[derive(Debug)]
pub struct FactoredClasses {
    /// `architectures[0]` of the factored checkpoint.
    pub class_name: &'static str,
    /// Its configuration class (named in `auto_map`).
    pub config_class: &'static str,
    /// Its `model_type`.
    pub model_type: &'static str,
    /// The module (file name without `.py`) holding both classes.
    pub module: &'static str,
    /// Every Python file written next to the checkpoint (the module and what it imports).
    pub files: &'static [&'static str],
}

/// One architecture family's names.
#[derive(Debug)]
pub struct Architecture {
    /// Family name for messages.
    pub family: &'static str,
    /// Which family this is.
    pub kind: Family,
    /// `architectures[0]` values in `config.json` that use this table.
    pub class_names: &'static [&'static str],
    /// Prefix of per-layer names, followed by the layer index and a dot.
    pub layer_prefix: &'static str,
    /// Per-layer name suffixes and their roles, in blocks shared between families.
    pub layer_tensors: &'static [&'static [(&'static str, Role)]],
    /// Global names and their roles.
    pub global_tensors: &'static [(&'static str, Role)],
    /// The factored form's classes.
    pub factored: FactoredClasses,
}

/// Where a tensor name sits in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// The layer index for per-layer tensors.
    pub layer: Option<usize>,
    /// The tensor's role.
    pub role: Role,
}

/// The attention projections and their factored replacements (every family).
const ATTENTION: &[(&str, Role)] = &[
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
    ("self_attn.rotary_emb.inv_freq", Role::RotaryInvFreq),
];

/// The biases of the query, key and value projections.
const QKV_BIASES: &[(&str, Role)] = &[
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
];

/// The output projection's bias.
const O_BIAS: &[(&str, Role)] = &[(
    "self_attn.o_proj.bias",
    Role::AttentionBias(AttentionProjection::Output),
)];

/// The biases of factored projections, carried by the up-projections (`docs/factored-format.md`).
const FACTOR_BIASES: &[(&str, Role)] = &[
    ("self_attn.q_b_proj.bias", Role::FactorBias(Factor::QUp)),
    ("self_attn.k_b_proj.bias", Role::FactorBias(Factor::KUp)),
    ("self_attn.v_b_proj.bias", Role::FactorBias(Factor::VUp)),
];

/// The SwiGLU MLP and the two norms of a Llama-style layer.
const MLP_AND_NORMS: &[(&str, Role)] = &[
    ("mlp.gate_proj.weight", Role::MlpGate),
    ("mlp.up_proj.weight", Role::MlpUp),
    ("mlp.down_proj.weight", Role::MlpDown),
    ("input_layernorm.weight", Role::InputNorm),
    ("post_attention_layernorm.weight", Role::PostAttentionNorm),
];

/// Llama's `mlp_bias`.
const MLP_BIASES: &[(&str, Role)] = &[
    ("mlp.gate_proj.bias", Role::MlpBias(Mlp::Gate)),
    ("mlp.up_proj.bias", Role::MlpBias(Mlp::Up)),
    ("mlp.down_proj.bias", Role::MlpBias(Mlp::Down)),
];

/// Gemma's MLP (no biases) and its four norms.
const GEMMA_MLP_AND_NORMS: &[(&str, Role)] = &[
    ("mlp.gate_proj.weight", Role::MlpGate),
    ("mlp.up_proj.weight", Role::MlpUp),
    ("mlp.down_proj.weight", Role::MlpDown),
    ("input_layernorm.weight", Role::InputNorm),
    ("post_attention_layernorm.weight", Role::PostAttentionNorm),
    ("pre_feedforward_layernorm.weight", Role::PreFeedforwardNorm),
    (
        "post_feedforward_layernorm.weight",
        Role::PostFeedforwardNorm,
    ),
];

/// Qwen3's (and Gemma 3's) per-head norms of queries and keys.
const QK_NORMS: &[(&str, Role)] = &[
    ("self_attn.q_norm.weight", Role::QueryNorm),
    ("self_attn.k_norm.weight", Role::KeyNorm),
];

/// Phi-3's fused projections (their parts' names come from [`ATTENTION`] and [`MLP_AND_NORMS`]).
const PHI3_FUSED: &[(&str, Role)] = &[
    ("self_attn.qkv_proj.weight", Role::Fused(Fusion::Qkv)),
    ("mlp.gate_up_proj.weight", Role::Fused(Fusion::GateUp)),
];

/// The global tensors of a Llama-style model.
const GLOBALS: &[(&str, Role)] = &[
    ("model.embed_tokens.weight", Role::Embedding),
    ("model.norm.weight", Role::FinalNorm),
    ("lm_head.weight", Role::LmHead),
];

/// The Python files a factored checkpoint of a family other than Llama carries: the families'
/// module and the Llama module it builds on.
const FAMILY_MODULE_FILES: &[&str] = &["modeling_surgery.py", "modeling_surgery_llama.py"];

/// Llama and the families that share its tensor names exactly (Mistral; SmolLM and TinyLlama are
/// `LlamaForCausalLM`).
pub static LLAMA: Architecture = Architecture {
    family: "llama",
    kind: Family::Llama,
    class_names: &["LlamaForCausalLM", "MistralForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[ATTENTION, QKV_BIASES, O_BIAS, MLP_AND_NORMS, MLP_BIASES],
    global_tensors: GLOBALS,
    factored: FactoredClasses {
        class_name: "SurgeryLlamaForCausalLM",
        config_class: "SurgeryLlamaConfig",
        model_type: "surgery_llama",
        module: "modeling_surgery_llama",
        files: &["modeling_surgery_llama.py"],
    },
};

/// Qwen2 and Qwen2.5: Llama's names, q/k/v biases always, no o_proj or MLP bias.
pub static QWEN2: Architecture = Architecture {
    family: "qwen2",
    kind: Family::Qwen2,
    class_names: &["Qwen2ForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[ATTENTION, QKV_BIASES, FACTOR_BIASES, MLP_AND_NORMS],
    global_tensors: GLOBALS,
    factored: FactoredClasses {
        class_name: "SurgeryQwen2ForCausalLM",
        config_class: "SurgeryQwen2Config",
        model_type: "surgery_qwen2",
        module: "modeling_surgery",
        files: FAMILY_MODULE_FILES,
    },
};

/// Qwen3: Llama's names plus `q_norm`/`k_norm`; biases on all four projections with
/// `attention_bias`.
pub static QWEN3: Architecture = Architecture {
    family: "qwen3",
    kind: Family::Qwen3,
    class_names: &["Qwen3ForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[
        ATTENTION,
        QK_NORMS,
        QKV_BIASES,
        O_BIAS,
        FACTOR_BIASES,
        MLP_AND_NORMS,
    ],
    global_tensors: GLOBALS,
    factored: FactoredClasses {
        class_name: "SurgeryQwen3ForCausalLM",
        config_class: "SurgeryQwen3Config",
        model_type: "surgery_qwen3",
        module: "modeling_surgery",
        files: FAMILY_MODULE_FILES,
    },
};

/// Gemma 2: Llama's attention names (biases with `attention_bias`), four norms per layer.
pub static GEMMA2: Architecture = Architecture {
    family: "gemma2",
    kind: Family::Gemma2,
    class_names: &["Gemma2ForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[
        ATTENTION,
        QKV_BIASES,
        O_BIAS,
        FACTOR_BIASES,
        GEMMA_MLP_AND_NORMS,
    ],
    global_tensors: GLOBALS,
    factored: FactoredClasses {
        class_name: "SurgeryGemma2ForCausalLM",
        config_class: "SurgeryGemma2Config",
        model_type: "surgery_gemma2",
        module: "modeling_surgery",
        files: FAMILY_MODULE_FILES,
    },
};

/// Gemma 3 (text): Gemma 2's names plus `q_norm`/`k_norm`.
pub static GEMMA3: Architecture = Architecture {
    family: "gemma3",
    kind: Family::Gemma3,
    class_names: &["Gemma3ForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[
        ATTENTION,
        QK_NORMS,
        QKV_BIASES,
        O_BIAS,
        FACTOR_BIASES,
        GEMMA_MLP_AND_NORMS,
    ],
    global_tensors: GLOBALS,
    factored: FactoredClasses {
        class_name: "SurgeryGemma3ForCausalLM",
        config_class: "SurgeryGemma3Config",
        model_type: "surgery_gemma3",
        module: "modeling_surgery",
        files: FAMILY_MODULE_FILES,
    },
};

/// Phi-3 (and Phi-3.5, Phi-4-mini): Llama's names, with q/k/v stored fused in `qkv_proj` and
/// gate/up in `gate_up_proj`; no biases. A factored checkpoint stores the parts it keeps dense
/// (`q_proj`) on their own, `gate_up_proj` fused.
pub static PHI3: Architecture = Architecture {
    family: "phi3",
    kind: Family::Phi3,
    class_names: &["Phi3ForCausalLM"],
    layer_prefix: "model.layers.",
    layer_tensors: &[ATTENTION, PHI3_FUSED, MLP_AND_NORMS],
    global_tensors: GLOBALS,
    factored: FactoredClasses {
        class_name: "SurgeryPhi3ForCausalLM",
        config_class: "SurgeryPhi3Config",
        model_type: "surgery_phi3",
        module: "modeling_surgery",
        files: FAMILY_MODULE_FILES,
    },
};

/// All supported architectures.
pub static ARCHITECTURES: &[&Architecture] = &[&LLAMA, &QWEN2, &QWEN3, &GEMMA2, &GEMMA3, &PHI3];

/// The table for a `config.json` `architectures[0]` value.
pub fn find(class_name: &str) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.class_names.contains(&class_name))
}

/// The table whose factored form is called `class_name` (a factored checkpoint's
/// `architectures[0]`).
pub fn find_factored(class_name: &str) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.factored.class_name == class_name)
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
                .layer_entries()
                .find(|(s, _)| *s == suffix)
                .map(|(_, r)| r)?;
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

    /// Whether this family's factored form carries the biases of factored projections (on their
    /// up-projections); Llama's has no bias terms.
    pub fn factored_biases(&self) -> bool {
        self.layer_entries()
            .any(|(_, role)| matches!(role, Role::FactorBias(_)))
    }

    /// The fused tensor of this family that stores `role`'s rows (`None`: stored on its own).
    pub fn fusion_of(&self, role: Role) -> Option<Fusion> {
        self.layer_entries().find_map(|(_, r)| match r {
            Role::Fused(f) if f.parts().contains(&role) => Some(f),
            _ => None,
        })
    }

    /// The fused tensors of this family (none for most).
    pub fn fusions(&self) -> impl Iterator<Item = Fusion> + '_ {
        self.layer_entries().filter_map(|(_, r)| match r {
            Role::Fused(f) => Some(f),
            _ => None,
        })
    }

    /// Every per-layer name suffix with its role, block after block.
    pub fn layer_entries(&self) -> impl Iterator<Item = (&'static str, Role)> + '_ {
        self.layer_tensors
            .iter()
            .flat_map(|block| block.iter().copied())
    }

    /// The name of a per-layer tensor.
    pub fn layer_tensor_name(&self, layer: usize, role: Role) -> Option<String> {
        self.layer_entries()
            .find(|(_, r)| *r == role)
            .map(|(suffix, _)| format!("{}{layer}.{suffix}", self.layer_prefix))
    }
}

#[cfg(test)]
mod tests;
