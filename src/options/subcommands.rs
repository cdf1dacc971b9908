//! The options of `eval`, `expand`, `inspect` and `sweep`, validated.

use super::{Allocation, CalibrateMode, Calibration, CommandLine, TextWindow, DEFAULT_COMPENSATE};
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::model::bos::BosPolicy;
use crate::plan::{Compensate, LayerSharing, Share, Surgery};
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// `eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The checkpoint as given.
    pub model: String,
    /// Hub revision.
    pub revision: String,
    /// What to score.
    pub window: TextWindow,
}

/// `expand`.
#[derive(Debug, Clone)]
pub struct ExpandOptions {
    /// The factored checkpoint as given.
    pub input: String,
    /// Hub revision.
    pub revision: String,
    /// Output directory.
    pub out: PathBuf,
    /// Print the plan only.
    pub dry_run: bool,
    /// Replace an existing output.
    pub force: bool,
    /// Print nothing on success.
    pub quiet: bool,
}

impl ExpandOptions {
    /// The command that reproduces this output (add `--out DIR`).
    pub fn reproduce_command(&self) -> String {
        let mut c = CommandLine::new(["expand", self.input.as_str()]);
        c.revision(&self.revision);
        c.finish()
    }
}

/// `inspect`.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    /// The checkpoint as given.
    pub model: String,
    /// Hub revision.
    pub revision: String,
    /// Where to draw the curves, if anywhere.
    pub svg: Option<PathBuf>,
    /// JSON on stdout instead of the table.
    pub json: bool,
    /// Group sizes to count one basis shared by adjacent layers for (no duplicates).
    pub share_layers: Vec<NonZeroUsize>,
}

/// One conversion of a sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepConfig {
    /// `--shared-kv` SPEC, if that list was given.
    pub shared_kv: Option<Spec>,
    /// `--q` SPEC, if that list was given.
    pub q: Option<Spec>,
    /// The fit.
    pub fit: Fit,
    /// Cross-layer sharing of the shared K/V fit (`--share-layers` above 1).
    pub sharing: Option<LayerSharing>,
    /// How fit `act` is calibrated (one-shot for the other fits).
    pub mode: CalibrateMode,
    /// What fit `act` refits besides the fitted projections (none for the other fits).
    pub compensate: Option<Compensate>,
    /// How a `budget:F` SPEC of fit `act` spends its budget (spectra otherwise).
    pub allocation: Allocation,
}

impl SweepConfig {
    /// The surgery a conversion with these options performs.
    pub fn surgery(&self) -> Surgery {
        Surgery {
            q: self.q,
            k: None,
            v: None,
            shared_kv: self.shared_kv,
            fit: self.fit,
            sharing: self.sharing,
            compensate: self.compensate,
        }
    }

    /// The conversion options, as on the command line: `--shared-kv 0.9 --q 0.5 --fit pca`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.shared_kv {
            parts.push(format!("--shared-kv {s}"));
        }
        if let Some(s) = self.q {
            parts.push(format!("--q {s}"));
        }
        parts.push(format!("--fit {}", self.fit.name()));
        if let Some(sharing) = self.sharing {
            parts.push(format!(
                "--share-layers {} --share {}",
                sharing.layers,
                sharing.share.name()
            ));
        }
        if self.mode == CalibrateMode::Sequential {
            parts.push(format!("--calibrate-mode {}", self.mode.name()));
        }
        if self.fit == Fit::Act && self.compensate != DEFAULT_COMPENSATE {
            let value = self.compensate.map_or("none", Compensate::name);
            parts.push(format!("--compensate {value}"));
        }
        if self.allocation == Allocation::Sensitivity {
            parts.push(format!("--budget-allocation {}", self.allocation.name()));
        }
        parts.join(" ")
    }
}

/// `sweep`.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The checkpoint as given.
    pub input: String,
    /// Hub revision.
    pub revision: String,
    /// What to score.
    pub window: TextWindow,
    /// The `--shared-kv` list (no duplicates).
    pub shared_kv: Vec<Spec>,
    /// The `--q` list (no duplicates).
    pub q: Vec<Spec>,
    /// The `--fit` list (not empty, no duplicates).
    pub fits: Vec<Fit>,
    /// The `--share-layers` list (no duplicates; empty: 1 only).
    pub share_layers: Vec<NonZeroUsize>,
    /// The `--share` list (no duplicates; empty: latent only).
    pub shares: Vec<Share>,
    /// The `--calibrate-mode` list (not empty, no duplicates), combined with the act fits.
    pub modes: Vec<CalibrateMode>,
    /// The `--compensate` list (not empty, no duplicates; `None` is `none`), combined with the
    /// act fits.
    pub compensations: Vec<Option<Compensate>>,
    /// The `--budget-allocation` list (not empty, no duplicates), combined with the act fits of a
    /// `budget:F` SPEC.
    pub allocations: Vec<Allocation>,
    /// Present exactly when `fits` holds `act` (its `mode` is not read: see `modes`).
    pub calibration: Option<Calibration>,
    /// Output directory.
    pub out: PathBuf,
    /// Replace an existing output.
    pub force: bool,
    /// Print nothing on success.
    pub quiet: bool,
}

impl SweepOptions {
    /// The sharings to combine with a `--shared-kv` SPEC and `fit`, in order: every group size,
    /// within it every share (one configuration for size 1; `latent` only with fit `act`).
    fn sharings(&self, fit: Fit) -> Vec<Option<LayerSharing>> {
        let sizes = match self.share_layers.as_slice() {
            [] => vec![NonZeroUsize::MIN],
            list => list.to_vec(),
        };
        let shares = match self.shares.as_slice() {
            [] => vec![Share::Latent],
            list => list.to_vec(),
        };
        let mut out = Vec::new();
        for layers in sizes {
            if layers.get() == 1 {
                out.push(None);
                continue;
            }
            for &share in &shares {
                if share == Share::Basis || fit == Fit::Act {
                    out.push(Some(LayerSharing { layers, share }));
                }
            }
        }
        out
    }

    /// The calibration modes to combine with `fit` and `sharing`: every mode for fit `act`
    /// (sequential not with a shared basis), one-shot otherwise.
    fn modes_for(&self, fit: Fit, sharing: Option<LayerSharing>) -> Vec<CalibrateMode> {
        if fit != Fit::Act {
            return vec![CalibrateMode::OneShot];
        }
        let basis = sharing.is_some_and(|s| s.share == Share::Basis);
        self.modes
            .iter()
            .copied()
            .filter(|&m| !(basis && m == CalibrateMode::Sequential))
            .collect()
    }

    /// The compensations to combine with `fit`: every one for fit `act`, none otherwise.
    fn compensations_for(&self, fit: Fit) -> &[Option<Compensate>] {
        match fit {
            Fit::Act => &self.compensations,
            _ => &[None],
        }
    }

    /// The allocations to combine with `fit` and `specs`: every one for fit `act` with a
    /// `budget:F` SPEC, spectra otherwise.
    fn allocations_for(&self, fit: Fit, specs: [Option<Spec>; 2]) -> &[Allocation] {
        let budgeted = specs.iter().any(|s| matches!(s, Some(Spec::Budget(_))));
        match (fit, budgeted) {
            (Fit::Act, true) => &self.allocations,
            _ => &[Allocation::Spectra],
        }
    }

    /// The configurations, in order: every `--shared-kv` SPEC, within it every `--q` SPEC, within
    /// that every fit, within that every sharing (`--share-layers`, `--share`), within that every calibration mode, within that
    /// every compensation, within that every allocation.
    pub fn configs(&self) -> Vec<SweepConfig> {
        let or_none = |list: &[Spec]| -> Vec<Option<Spec>> {
            if list.is_empty() {
                vec![None]
            } else {
                list.iter().copied().map(Some).collect()
            }
        };
        let mut out = Vec::new();
        for &shared_kv in &or_none(&self.shared_kv) {
            for &q in &or_none(&self.q) {
                for &fit in &self.fits {
                    let sharings = match shared_kv {
                        Some(_) => self.sharings(fit),
                        None => vec![None],
                    };
                    for sharing in sharings {
                        for mode in self.modes_for(fit, sharing) {
                            for &compensate in self.compensations_for(fit) {
                                for &allocation in self.allocations_for(fit, [shared_kv, q]) {
                                    out.push(SweepConfig {
                                        shared_kv,
                                        q,
                                        fit,
                                        sharing,
                                        mode,
                                        compensate,
                                        allocation,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The command that reproduces the sweep (add `--out DIR`).
    pub fn reproduce_command(&self) -> String {
        let w = &self.window;
        let mut c = CommandLine::new(["sweep", "--in", self.input.as_str()]);
        c.revision(&self.revision)
            .optional("--text", w.text.file().map(|p| p.display()))
            .flag("--tokens", w.tokens)
            .flag("--offset", w.offset)
            .flag("--ctx", w.ctx);
        if w.bos != BosPolicy::Auto {
            c.flag("--bos", w.bos.name());
        }
        c.list("--shared-kv", &self.shared_kv).list("--q", &self.q);
        let fits: Vec<&str> = self.fits.iter().map(|f| f.name()).collect();
        c.list("--fit", &fits);
        c.list("--share-layers", &self.share_layers);
        let shares: Vec<&str> = self.shares.iter().map(|s| s.name()).collect();
        c.list("--share", &shares);
        if let Some(calibration) = &self.calibration {
            calibration.add_to(&mut c);
            if self.modes != [CalibrateMode::OneShot] {
                let modes: Vec<&str> = self.modes.iter().map(|m| m.name()).collect();
                c.list("--calibrate-mode", &modes);
            }
            if self.compensations != [DEFAULT_COMPENSATE] {
                let list: Vec<&str> = self
                    .compensations
                    .iter()
                    .map(|c| c.map_or("none", Compensate::name))
                    .collect();
                c.list("--compensate", &list);
            }
            if self.allocations != [Allocation::Spectra] {
                let list: Vec<&str> = self.allocations.iter().map(|a| a.name()).collect();
                c.list("--budget-allocation", &list);
            }
        }
        c.finish()
    }
}
