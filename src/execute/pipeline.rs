//! Fits run ahead of their consumer: a [`Pipeline`] fits groups on the thread pool in the order
//! the write pass needs them ([`need_order`]), a bounded number in flight, and [`Pipelined`] serves
//! the dense write pass from it.

use super::group::{run_group, GroupOutput};
use super::{FitInputs, GroupReport, PieceSource};
use crate::error::{Error, Result};
use crate::input::checkpoint::Checkpoint;
use crate::plan::{Emit, GroupPlan, Op, Plan};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};

/// Fits run ahead of their consumer: groups are fitted in `order` on the thread pool, at most
/// [`window`] of them computed or waiting at a time, and handed over in any order; the consumer
/// takes them by index and says when it is done with one, which lets the next start. So the
/// fits of the next layers overlap the writing of this one, and memory stays bounded.
pub struct Pipeline {
    results: Receiver<(usize, Result<GroupOutput>)>,
    tokens: Receiver<()>,
    ready: HashMap<usize, Result<GroupOutput>>,
}

/// Groups in flight at once: twice the worker threads, so that every worker has a next group
/// while the consumer drains the last.
fn window() -> usize {
    2 * rayon::current_num_threads().max(1)
}

impl Pipeline {
    /// Waits for group `g`'s output (each group is taken once); `dir` names the checkpoint in the
    /// internal error of a group that never comes.
    pub(crate) fn get(&mut self, g: usize, dir: &Path) -> Result<GroupOutput> {
        loop {
            if let Some(r) = self.ready.remove(&g) {
                return r;
            }
            crate::interrupt::check()?;
            match self
                .results
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                Ok((i, r)) => {
                    self.ready.insert(i, r);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::bug(format!(
                        "{}: the fit of group {g} was never produced",
                        dir.display()
                    )))
                }
            }
        }
    }

    /// The consumer is done with one group: one more may start.
    pub(crate) fn done(&mut self) {
        let _ = self.tokens.recv();
    }
}

/// Runs `consume` with a [`Pipeline`] fitting `order` (group indices into `groups`) in `emit` form.
pub fn with_pipeline<R>(
    checkpoint: &Checkpoint,
    groups: &[GroupPlan],
    order: &[usize],
    emit: Emit,
    inputs: &FitInputs,
    consume: impl FnOnce(&mut Pipeline) -> Result<R>,
) -> Result<R> {
    let cancel = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (results_tx, results) = mpsc::channel();
        let (tokens_tx, tokens) = mpsc::sync_channel::<()>(window());
        let cancel = &cancel;
        scope.spawn(move || {
            rayon::in_place_scope(|s| {
                for &g in order {
                    if cancel.load(Ordering::Relaxed)
                        || crate::interrupt::requested()
                        || tokens_tx.send(()).is_err()
                    {
                        break;
                    }
                    let results_tx = results_tx.clone();
                    s.spawn(move |_| {
                        if cancel.load(Ordering::Relaxed) || crate::interrupt::requested() {
                            return;
                        }
                        let r = run_group(checkpoint, &groups[g], emit, inputs);
                        let _ = results_tx.send((g, r));
                    });
                }
            });
        });
        let mut pipeline = Pipeline {
            results,
            tokens,
            ready: HashMap::new(),
        };
        let out = consume(&mut pipeline);
        cancel.store(true, Ordering::Relaxed);
        drop(pipeline);
        out
    })
}

/// The groups in the order the plan's writes first need them.
pub fn need_order(plan: &Plan) -> Vec<usize> {
    let mut seen = vec![false; plan.groups.len()];
    let mut order = Vec::with_capacity(plan.groups.len());
    for shard in &plan.shards {
        for op in shard.tensors.iter().flat_map(|t| t.op.leaves()) {
            if let Op::Computed { group, .. } = *op {
                if !std::mem::replace(&mut seen[group], true) {
                    order.push(group);
                }
            }
        }
    }
    order
}

/// Dense output through a [`Pipeline`]: groups are fitted ahead of the write pass, in the order it
/// needs them.
pub struct Pipelined<'p> {
    pipeline: &'p mut Pipeline,
    reports: Vec<Option<GroupReport>>,
    pending: HashMap<usize, Vec<Option<Vec<u8>>>>,
}

impl<'p> Pipelined<'p> {
    /// Serves the outputs of `groups` groups from `pipeline`.
    pub fn new(pipeline: &'p mut Pipeline, groups: usize) -> Self {
        Pipelined {
            pipeline,
            reports: vec![None; groups],
            pending: HashMap::new(),
        }
    }

    /// The reports of every group computed, in group order.
    pub fn into_reports(self) -> Vec<GroupReport> {
        self.reports.into_iter().flatten().collect()
    }
}

impl PieceSource for Pipelined<'_> {
    fn take(
        &mut self,
        checkpoint: &Checkpoint,
        _plan: &Plan,
        group: usize,
        piece: usize,
    ) -> Result<Vec<u8>> {
        if self.reports.get(group).is_some_and(Option::is_none) {
            let out = self.pipeline.get(group, &checkpoint.dir)?;
            self.reports[group] = Some(out.report);
            self.pending.insert(group, out.pieces);
        }
        let bytes = self
            .pending
            .get_mut(&group)
            .and_then(|m| m.get_mut(piece))
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::bug(format!("group {group} piece {piece}: output taken twice"))
            })?;
        if self
            .pending
            .get(&group)
            .is_some_and(|m| m.iter().all(Option::is_none))
        {
            self.pending.remove(&group);
            self.pipeline.done();
        }
        Ok(bytes)
    }
}
