//! Activation buffers reused from layer to layer. Every layer of the pass makes the same
//! `[tokens, width]` matrices (normed inputs, projections, the MLP's `[tokens, intermediate]`
//! gate), tens of megabytes each; allocated afresh, each one costs page faults and zeroing (the
//! allocator hands large blocks back to the system on free), which measured 15-20% of an `eval`.
//! Kept here, a layer's buffers are the previous layer's.

use faer::Mat;

/// Buffers kept at most (a layer uses about eight at once; more are dropped oldest first).
const KEPT: usize = 12;

/// A pool of `f32` matrices, matched by shape.
#[derive(Debug, Default)]
pub struct Buffers {
    free: Vec<Mat<f32>>,
}

impl Buffers {
    /// A `[rows, cols]` matrix whose contents are unspecified (a buffer given back earlier, or
    /// zeros): for a result that overwrites every entry.
    pub fn take(&mut self, rows: usize, cols: usize) -> Mat<f32> {
        match self
            .free
            .iter()
            .rposition(|m| m.nrows() == rows && m.ncols() == cols)
        {
            Some(i) => self.free.swap_remove(i),
            None => Mat::zeros(rows, cols),
        }
    }

    /// Gives `m` back for a later [`Buffers::take`] of its shape.
    pub fn give(&mut self, m: Mat<f32>) {
        if m.nrows() == 0 || m.ncols() == 0 {
            return;
        }
        if self.free.len() >= KEPT {
            self.free.remove(0);
        }
        self.free.push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_for_its_shape_only() {
        let mut b = Buffers::default();
        let mut m = b.take(3, 2);
        assert_eq!((m.nrows(), m.ncols(), m[(2, 1)]), (3, 2, 0.0));
        m[(2, 1)] = 7.0;
        b.give(m);
        // Another shape is a fresh (zeroed) matrix; the same shape is the buffer given back.
        assert_eq!(b.take(2, 3)[(1, 2)], 0.0);
        assert_eq!(b.take(3, 2)[(2, 1)], 7.0);
        assert_eq!(b.take(3, 2)[(2, 1)], 0.0);
        // At most KEPT are kept, oldest dropped first.
        for i in 0..KEPT + 2 {
            let mut m = b.take(1, 1 + i);
            m[(0, 0)] = i as f32 + 1.0;
            b.give(m);
        }
        assert_eq!(b.free.len(), KEPT);
        assert_eq!(b.take(1, 1)[(0, 0)], 0.0, "the oldest was dropped");
        assert_eq!(b.take(1, KEPT + 2)[(0, 0)], (KEPT + 2) as f32);
    }
}
