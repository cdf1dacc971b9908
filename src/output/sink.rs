//! The interface between the executor and the writer: the executor produces bytes in plan order,
//! a sink stores them ([`super::writer::ShardWriter`] on disk; tests keep them in memory).

use crate::error::Result;
use crate::plan::{ShardPlan, TensorPlan};

/// Where the executor sends output bytes: shards in plan order, each a sequence of tensors, each
/// tensor's bytes in one or more parts.
pub trait TensorSink {
    /// A new output file starts.
    fn begin_shard(&mut self, shard: &ShardPlan) -> Result<()>;
    /// The next tensor in plan order starts.
    fn begin_tensor(&mut self, tensor: &TensorPlan) -> Result<()>;
    /// The next bytes of the current tensor.
    fn write_part(&mut self, bytes: &[u8]) -> Result<()>;
    /// The current tensor is complete (its planned length must have been written).
    fn end_tensor(&mut self) -> Result<()>;
    /// The current file is complete.
    fn finish_shard(&mut self) -> Result<()>;
}
