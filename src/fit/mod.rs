//! The math: how many components to keep ([`spec`], [`budget`]), the weight-only fits
//! ([`decompose`]: `pca`, `seed`, `svd`, their decomposing half in [`basis`]), the activation-aware fit ([`act`], the weighted spectrum it computes once in [`weighted`]), its shared forms
//! ([`shared`]), directions they keep exactly ([`pinned`]: the attention sink) and the
//! least-squares refit of sequential calibration ([`compensate`]). Fits take matrices
//! and statistics and return factors: no files, no tensor names, no imports of the crate's other
//! stages.

pub mod act;
pub mod basis;
pub(crate) mod budget;
pub(crate) mod common;
pub mod compensate;
pub mod decompose;
pub mod pinned;
pub mod shared;
pub mod spec;
pub mod weighted;
