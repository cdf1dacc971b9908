//! The checks [`Checkpoint::open`] runs once every shard is read: every tensor a layer and the
//! model need is present, the attention projections (dense or factored) are those `config.json`
//! describes and in a float type, and every tensor, copied ones included, has the shape
//! `config.json` implies ([`ModelConfig::expected_shape`], the one source the forward pass reads
//! too). A fused tensor was checked whole when it was split (`input::fused`).

use super::Checkpoint;
use crate::error::{Error, Result};
use crate::model::arch::Role;
use crate::model::config::ModelConfig;
use crate::model::layout::{INDEX_FILE, SINGLE_FILE};
use crate::model::shapes::{disagreement, Sizes};

impl Checkpoint {
    /// Runs every check, in this order: the attention projections, the other tensors every
    /// checkpoint needs, then every tensor's shape (in file order).
    pub(super) fn check_tensors(&self) -> Result<()> {
        self.check_projections()?;
        self.check_required()?;
        self.check_shapes()
    }

    /// Every layer must have its attention projections (q, k and v, or for a factored checkpoint the
    /// factors `config.json` describes), with their shapes (layer by layer, before any other
    /// tensor's), in a float type, and no others.
    fn check_projections(&self) -> Result<()> {
        let c = &self.config;
        for layer in 0..c.num_layers {
            for (role, shape) in c.attention_tensors(layer) {
                let Some(name) = c.arch.layer_tensor_name(layer, role) else {
                    continue;
                };
                let Some(t) = self.tensor(&name) else {
                    // A family that stores the part fused is missing the fused tensor.
                    let fused = c
                        .arch
                        .fusion_of(role)
                        .filter(|_| c.latent.is_none())
                        .and_then(|f| c.arch.layer_tensor_name(layer, Role::Fused(f)));
                    return Err(match (fused, &c.latent) {
                        (Some(fused), _) => self.missing(&fused, "every layer needs it"),
                        (None, Some(_)) => self.missing(
                            &name,
                            "config.json's latent_attention says this layer has it",
                        ),
                        (None, None) => {
                            self.missing(&name, "every layer needs q_proj, k_proj and v_proj")
                        }
                    });
                };
                if t.shape != shape {
                    return Err(self.tensor_error(t, disagreement(&t.shape, &shape)));
                }
                self.float_type(t, "decomposed")?;
            }
        }
        for t in &self.tensors {
            let attention = matches!(
                t.class.role,
                Role::Query | Role::Key | Role::Value | Role::Factor(_)
            );
            let expected = t.class.layer.is_some_and(|layer| {
                c.attention_tensors(layer)
                    .iter()
                    .any(|&(role, _)| role == t.class.role)
            });
            if attention && !expected {
                let why = match (&c.latent, t.class.role) {
                    (None, _) => "a factor of the factored form, but config.json does not describe one (latent_attention missing)",
                    (Some(_), Role::Factor(_)) => "a factor config.json's latent_attention does not describe",
                    (Some(_), _) => "a dense projection that config.json's latent_attention says is factored",
                };
                return Err(self.tensor_error(t, why));
            }
        }
        Ok(())
    }

    /// Every layer must hold the tensors the forward pass reads besides its attention projections
    /// (`o_proj`, the MLP, the family's norms; a fused one as the fused tensor), and the model its
    /// embedding, final norm and (unless tied) head.
    fn check_required(&self) -> Result<()> {
        let c = &self.config;
        for layer in 0..c.num_layers {
            for (_, role) in c.arch.layer_entries() {
                if !ModelConfig::required_in_every_layer(role) {
                    continue;
                }
                let Some(name) = c.arch.layer_tensor_name(layer, role) else {
                    continue;
                };
                if self.tensor(&name).is_none() {
                    let fused = c
                        .arch
                        .fusion_of(role)
                        .and_then(|f| c.arch.layer_tensor_name(layer, Role::Fused(f)));
                    return Err(self.missing(&fused.unwrap_or(name), "every layer needs it"));
                }
            }
        }
        for role in c.required_globals() {
            let Some(name) = c.arch.global_tensor_name(role) else {
                continue;
            };
            if self.tensor(name).is_none() {
                let reason = match role {
                    Role::LmHead => {
                        "config.json's tie_word_embeddings is false: the head is not the embedding"
                    }
                    _ => "every model needs it",
                };
                return Err(self.missing(name, reason));
            }
        }
        Ok(())
    }

    /// Every tensor must have the shape `config.json` implies.
    fn check_shapes(&self) -> Result<()> {
        let sizes = self.sizes();
        for t in &self.tensors {
            let Some(want) = self
                .config
                .expected_shape(sizes, t.class.layer, t.class.role)
            else {
                continue;
            };
            if t.shape != want {
                return Err(self.tensor_error(t, disagreement(&t.shape, &want)));
            }
        }
        Ok(())
    }

    /// `intermediate_size` and `vocab_size` as `config.json` gives them or, where it does not, as
    /// the first `gate_proj` and the embedding have them (both checked present before).
    fn sizes(&self) -> Sizes {
        let rows = |role: Role| {
            self.tensors
                .iter()
                .find(|t| t.class.role == role)
                .and_then(|t| t.shape.first().copied())
        };
        Sizes {
            intermediate: self
                .config
                .intermediate_size
                .or_else(|| rows(Role::MlpGate))
                .unwrap_or(0),
            vocab: self
                .config
                .vocab_size
                .or_else(|| rows(Role::Embedding))
                .unwrap_or(0),
        }
    }

    /// The error for tensor `name`, which no shard holds, because `reason`: against the one weight
    /// file, or for a sharded checkpoint against its index, which lists every tensor's shard (and
    /// does not list this one: [`Checkpoint::open`] checked every name it lists).
    fn missing(&self, name: &str, reason: &str) -> Error {
        if self.indexed {
            Error::tensor(
                self.dir.join(INDEX_FILE),
                name,
                format!("missing: in no shard, and not listed here ({reason})"),
            )
        } else {
            Error::tensor(
                self.dir.join(SINGLE_FILE),
                name,
                format!("missing ({reason})"),
            )
        }
    }
}
