//! One tensor of the input as every stage sees it ([`TensorEntry`]), and where a part of a fused
//! tensor lies in the tensor the file stores ([`FusedPart`]). `checkpoint` builds them and
//! re-exports both; `fused` splits a fused entry into its parts.

use crate::error::Error;
use crate::model::arch::{Classified, Role};
use safetensors::Dtype;
use std::ops::Range;
use std::path::Path;

/// One tensor of the input.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Hugging Face name.
    pub name: String,
    /// Index into [`Checkpoint::shards`](crate::input::checkpoint::Checkpoint::shards).
    pub shard: usize,
    /// Storage type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range inside the shard file.
    pub range: Range<usize>,
    /// Its place in the architecture's name table.
    pub class: Classified,
    /// For a part of a fused tensor: the tensor the file stores and the part's rows in it.
    pub fused: Option<FusedPart>,
}

/// Where a part of a fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`) lies in the tensor the file
/// stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedPart {
    /// The stored tensor's name.
    pub name: String,
    /// The part's rows in it.
    pub rows: Range<usize>,
}

impl TensorEntry {
    /// The name the file stores this tensor's bytes under: its own, or its fused tensor's.
    pub fn stored_name(&self) -> &str {
        self.fused.as_ref().map_or(&self.name, |f| &f.name)
    }

    /// An [`Error::Tensor`] about this tensor as `path` holds it: a part of a fused tensor is named
    /// by the fused tensor, with the part's rows and short name before `message`.
    pub fn error(&self, path: &Path, message: impl std::fmt::Display) -> Error {
        match &self.fused {
            None => Error::tensor(path, &self.name, message.to_string()),
            Some(f) => Error::tensor(
                path,
                &f.name,
                format!(
                    "rows {}..{} (its {} part): {message}",
                    f.rows.start,
                    f.rows.end,
                    part_label(self.class.role)
                ),
            ),
        }
    }
}

/// The short name of a part.
pub(crate) fn part_label(role: Role) -> &'static str {
    match role {
        Role::Query => "q_proj",
        Role::Key => "k_proj",
        Role::Value => "v_proj",
        Role::MlpGate => "gate_proj",
        Role::MlpUp => "up_proj",
        _ => "part",
    }
}
