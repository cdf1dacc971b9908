//! The stage on the bundled fixtures: every kind of run tokenizes its text once, and the `o_proj`
//! refit from what the one-shot pass kept is, byte for byte, what a second and third pass (the
//! original stream, and a compressed stream restarted from it at every segment) compute.

use super::compensation::compensate_output;
use super::refit::{refitted_layers, segment};
use super::substitute::Substitution;
use super::text::tokenized_on_this_thread;
use super::*;
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::forward::PassState;
use crate::input::text::{TextFile, TextSource};
use crate::options::{BosSink, CalibrateMode};
use crate::plan::{Compensate, LayerSharing, Share, Surgery};
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::Path;

fn fixture(name: &str) -> Checkpoint {
    Checkpoint::open(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name),
    )
    .unwrap()
}

fn calibration(mode: CalibrateMode, allocation: Allocation) -> Calibration {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/eval/text.txt");
    Calibration {
        text: TextSource::File(TextFile::new(text)),
        tokens: NonZeroUsize::new(300).unwrap(),
        offset: 3,
        ctx: NonZeroUsize::new(64).unwrap(),
        weighting: Default::default(),
        mode,
        allocation,
        bos: Default::default(),
        sink: BosSink::default(),
    }
}

fn surgery(spec: Spec, sharing: Option<LayerSharing>) -> Surgery {
    Surgery {
        q: None,
        k: None,
        v: None,
        shared_kv: Some(spec),
        fit: Fit::Act,
        sharing,
        compensate: Some(Compensate::OProj),
    }
}

fn latent_pairs() -> Option<LayerSharing> {
    Some(LayerSharing {
        layers: NonZeroUsize::new(2).unwrap(),
        share: Share::Latent,
    })
}

/// The passes a run started, in order, each checked to cross its layers.
#[derive(Default)]
struct Recorder {
    passes: std::sync::Mutex<Vec<&'static str>>,
    layers: std::sync::Mutex<(usize, usize)>,
}

impl progress::Progress for Recorder {
    fn start(&self, pass: &'static str, layers: usize, _tokens: usize) {
        self.passes.lock().unwrap().push(pass);
        *self.layers.lock().unwrap() = (layers, 0);
    }

    fn layer(&self) {
        self.layers.lock().unwrap().1 += 1;
    }

    fn finish(&self) {
        let (expected, done) = *self.layers.lock().unwrap();
        assert_eq!(done, expected, "{:?}", self.passes.lock().unwrap().last());
    }
}

#[test]
fn every_kind_of_run_tokenizes_its_text_once_and_runs_its_passes() {
    let checkpoint = fixture("tiny-f32-gqa");
    use super::progress::names::*;
    let sequential = |one_shot_first| Passes::Sequential { one_shot_first };
    let runs: [(Passes, Allocation, &[&str]); 4] = [
        (Passes::OneShot, Allocation::Spectra, &[ONE_SHOT]),
        (
            Passes::OneShotRefit,
            Allocation::Sensitivity,
            &[ONE_SHOT, PROBES, REFIT],
        ),
        (
            sequential(true),
            Allocation::Sensitivity,
            &[ONE_SHOT, PROBES, SEQUENTIAL],
        ),
        (sequential(false), Allocation::Spectra, &[SEQUENTIAL]),
    ];
    for (passes, allocation, expected) in runs {
        let mode = match passes {
            Passes::Sequential { .. } => CalibrateMode::Sequential,
            _ => CalibrateMode::OneShot,
        };
        let spec = match passes {
            Passes::Sequential {
                one_shot_first: false,
            } => Spec::Rank(3),
            _ => Spec::Budget(0.5),
        };
        let c = calibration(mode, allocation);
        let mut groups = crate::plan::groups(&checkpoint, &surgery(spec, None));
        let before = tokenized_on_this_thread();
        let record = Recorder::default();
        let inputs = calibrate(&checkpoint, Some((&c, passes)), &mut groups, &record).unwrap();
        assert_eq!(tokenized_on_this_thread() - before, 1, "{passes:?}");
        assert_eq!(
            record.passes.lock().unwrap().as_slice(),
            expected,
            "{passes:?}"
        );
        assert!(inputs.calibration.is_some(), "{passes:?}");
        let refits = !inputs.compensated.is_empty();
        assert_eq!(refits, passes != Passes::OneShot, "{passes:?}");
    }
}

/// The one-shot refit as two more passes compute it: the original stream through every layer,
/// and at every segment a compressed stream restarted from the original one. The refits' bytes
/// by layer.
#[allow(clippy::needless_range_loop)] // Layers are indices into the kept streams and the model alike.
fn refits_by_two_streams(
    checkpoint: &Checkpoint,
    c: &Calibration,
    groups: &[GroupPlan],
    inputs: &FitInputs,
) -> BTreeMap<usize, Vec<u8>> {
    let llama = Llama::new(checkpoint).unwrap();
    let text = CalibrationText::load(checkpoint, c).unwrap();
    let ctx = text.ctx();
    let layers = llama.params().num_layers;
    let refitted = refitted_layers(&llama, groups);
    let scratch = Scratch::new().unwrap();
    // The original stream's input and heads' outputs at every layer.
    let (mut h, mut state) = (llama.embed(&text.ids).unwrap(), PassState::default());
    let (mut hs, mut zs) = (Vec::new(), Vec::new());
    for index in 0..layers {
        let layer = llama.layer(index).unwrap();
        hs.push(h.clone());
        let z = layer.attention_heads(h.as_ref(), ctx, &mut state).unwrap();
        let o = layer.attention_output(z.as_ref(), &mut state);
        zs.push(o.clone());
        layer.finish_output(&mut h, o, &mut state);
    }
    let mut substitution = Substitution::new(checkpoint, groups);
    let mut out = BTreeMap::new();
    let mut inputs = inputs.clone();
    let mut start = 0;
    while start < layers {
        let end = segment(groups, start, layers);
        let (mut compressed, mut state) = (hs[start].clone(), PassState::default());
        for index in start..end {
            let mut layer = llama.layer(index).unwrap();
            substitution.apply(&mut layer, &inputs).unwrap();
            let z = layer
                .attention_heads(compressed.as_ref(), ctx, &mut state)
                .unwrap();
            if refitted.contains(&index) {
                let (p, o) =
                    compensate_output(checkpoint, &layer, zs[index].as_ref(), z.as_ref(), &scratch)
                        .unwrap();
                layer.o = o;
                out.insert(index, p.bytes.load().unwrap());
                inputs.compensated.insert(index, p);
            }
            layer.finish(&mut compressed, z.as_ref(), &mut state);
        }
        start = end;
    }
    out
}

#[test]
fn the_refit_from_the_kept_activations_is_what_two_more_passes_compute() {
    // Queries kept (K/V alone, one layer each); not kept: q_proj fitted too, or a latent shared
    // across layers.
    for (fixture_name, sharing, fit_q, queries_kept) in [
        ("tiny-f32-gqa", None, false, true),
        ("tiny-bf16-sharded", None, false, true),
        ("tiny-f32-gqa", None, true, false),
        ("tiny-f32-gqa", latent_pairs(), false, false),
    ] {
        let checkpoint = fixture(fixture_name);
        let c = calibration(CalibrateMode::OneShot, Allocation::Spectra);
        let mut plan = surgery(Spec::Rank(3), sharing);
        if fit_q {
            plan.q = Some(Spec::Rank(4));
        }
        let mut groups = crate::plan::groups(&checkpoint, &plan);
        let llama = Llama::new(&checkpoint).unwrap();
        let keep = super::refit::keep_for(&llama, &groups);
        assert_eq!(keep.queries == keep.heads, queries_kept, "{fixture_name}");
        assert_eq!(keep.queries.is_empty(), !queries_kept, "{fixture_name}");
        let silent = &progress::Silent;
        let inputs = calibrate(
            &checkpoint,
            Some((&c, Passes::OneShotRefit)),
            &mut groups,
            silent,
        )
        .unwrap();
        let mut one_shot = inputs.clone();
        one_shot.compensated.clear();
        let expected = refits_by_two_streams(&checkpoint, &c, &groups, &one_shot);
        let layers = checkpoint.config.num_layers;
        assert_eq!(
            expected.len(),
            layers,
            "{fixture_name}: every layer refitted"
        );
        for (layer, bytes) in expected {
            let got = inputs.compensated[&layer].bytes.load().unwrap();
            assert!(
                got == bytes,
                "{fixture_name} {sharing:?}: layer {layer}'s o_proj differs"
            );
        }
    }
}

#[test]
fn the_kept_spectra_give_the_fits_computed_afresh_and_only_one_shot_keeps_them() {
    let checkpoint = fixture("tiny-f32-gqa");
    let c = calibration(CalibrateMode::OneShot, Allocation::Spectra);
    let mut groups = crate::plan::groups(&checkpoint, &surgery(Spec::Budget(0.5), None));
    let passes = Some((&c, Passes::OneShotRefit));
    let inputs = calibrate(&checkpoint, passes, &mut groups, &progress::Silent).unwrap();
    // The budgets' spectra computed every group's, once.
    assert_eq!(inputs.spectra.len(), groups.len());
    let afresh = FitInputs {
        spectra: crate::execute::KeptSpectra::default(),
        ..inputs.clone()
    };
    for group in &groups {
        let fit = |inputs: &FitInputs| {
            crate::execute::fit_and_encode(&checkpoint, group, crate::plan::Emit::Factored, inputs)
                .unwrap()
                .1
        };
        assert_eq!(fit(&inputs), fit(&afresh), "layer {}", group.layer);
    }
    assert_eq!(afresh.spectra.len(), 0);

    let c = calibration(CalibrateMode::Sequential, Allocation::Spectra);
    let mut groups = crate::plan::groups(&checkpoint, &surgery(Spec::Rank(3), None));
    let passes = Some((
        &c,
        Passes::Sequential {
            one_shot_first: false,
        },
    ));
    let inputs = calibrate(&checkpoint, passes, &mut groups, &progress::Silent).unwrap();
    assert_eq!(inputs.spectra.len(), 0);
}
