//! The math: how many components to keep ([`spec`], [`budget`]), the weight-only fits
//! ([`decompose`]: `pca`, `seed`, `svd`) and the activation-aware fit ([`act`]). Fits take matrices
//! and statistics and return factors: no files, no tensor names, no imports of the crate's other
//! stages.

pub mod act;
pub(crate) mod budget;
pub mod decompose;
pub mod shared;
pub mod spec;
