//! The subcommands' arguments (`eval`, `expand`, `inspect`, `sweep`) and their resolution into
//! the [`crate::options`] types.

use super::calibration::{BosArg, CalibrationArgs, TextSizeArgs};
use super::convert::{parse_fit_item, ShareArg};
use super::parse::{parse_spec_item, refuse_duplicates};
use super::FitArg;
use crate::error::{Error, Result};
use crate::fit::decompose::Fit;
use crate::fit::spec::Spec;
use crate::input::text::{Builtin, TextSource};
use crate::options::{
    CalibrateMode, Calibration, EvalOptions, ExpandOptions, InspectOptions, SweepOptions,
    TextWindow, CHECK_TOKENS,
};
use crate::plan::Share;
use clap::Args;
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// `--tokens` on a file.
const DEFAULT_TOKENS: NonZeroUsize = NonZeroUsize::MIN.saturating_add(4095);

/// The text `eval` and `sweep` score, and which of its tokens.
#[derive(Debug, Clone, Args)]
pub struct TextWindowArgs {
    /// UTF-8 text file to score (a regular file of at most --max-text-size; tokenized without
    /// special tokens as a whole, though only as far as the tokens scored). Default: the built-in
    /// held-out sample (English Wikipedia, about 8 KB), what a conversion's quality check scores.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,

    /// Tokens to evaluate, from --offset on (rounded down to whole --ctx windows) [default: 4096,
    /// or 1024 on the built-in sample].
    #[arg(long, value_name = "N")]
    pub tokens: Option<NonZeroUsize>,

    /// Window length in tokens; windows do not overlap and do not see each other.
    #[arg(long, value_name = "N", default_value = "512")]
    pub ctx: NonZeroUsize,

    /// Tokens of the text to skip before the first window.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub offset: usize,

    /// Whether every window starts with a BOS token: auto (as the model is used: when its
    /// tokenizer's post-processor adds one), always (the tokenizer's bos_token), never; with a BOS
    /// a window holds --ctx - 1 text tokens, every one of them scored [default: auto].
    #[arg(long, value_enum, value_name = "WHEN", default_value_t)]
    pub bos: BosArg,

    /// The limit on text files.
    #[command(flatten)]
    pub text_size: TextSizeArgs,
}

impl TextWindowArgs {
    /// The validated window.
    fn resolve(&self) -> TextWindow {
        let (text, default_tokens) = match &self.text {
            Some(path) => (TextSource::File(self.text_size.file(path)), DEFAULT_TOKENS),
            None => (TextSource::Builtin(Builtin::Check), CHECK_TOKENS),
        };
        TextWindow {
            text,
            tokens: self.tokens.unwrap_or(default_tokens),
            ctx: self.ctx,
            offset: self.offset,
            bos: self.bos.policy(),
        }
    }
}

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The checkpoint: a local directory, or a repo id resolved from the Hugging Face cache.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// The text to score.
    #[command(flatten)]
    pub window: TextWindowArgs,

    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// Arguments of `expand`.
#[derive(Debug, Args)]
pub struct ExpandArgs {
    /// The factored checkpoint: a local directory, or a repo id resolved from the Hugging Face cache.
    #[arg(value_name = "FACTORED")]
    pub input: String,

    /// Output directory (created atomically; must not exist unless --force; if it appears during
    /// the run, it is left alone and the run fails, keeping its output as DIR.surgery-kept-PID).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Hub revision (branch, tag or commit) when FACTORED is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Print the plan; write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Replace an existing --out, only once the new output is complete, and only if it is an
    /// earlier output of surgery-convert (every file listed in its SHA256SUMS, or a sweep's three
    /// files) or an empty directory, and still the one that was there when the run started;
    /// anything else is refused (remove it yourself).
    #[arg(long)]
    pub force: bool,

    /// Print nothing on success.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The checkpoint: a local directory, or a repo id resolved from the Hugging Face cache.
    #[arg(value_name = "MODEL")]
    pub model: String,

    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Draw the cumulative explained-variance curves (one panel per layer) into this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// Print the counts as JSON on stdout instead of the table on stderr.
    #[arg(long)]
    pub json: bool,

    /// Also count, for groups of G adjacent layers (comma-separated sizes, e.g. 2,4; the last
    /// group may be shorter), the components ONE basis for the group's stacked K/V rows needs,
    /// against the sum of the per-layer counts: how far the layers' K/V spaces overlap.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub share_layers: Vec<NonZeroUsize>,

    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// Arguments of `sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Input checkpoint: a local directory, or a Hugging Face repo id resolved from the local cache.
    #[arg(long = "in", value_name = "MODEL")]
    pub input: String,

    /// Hub revision (branch, tag or commit) when --in is a repo id.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// The text to score.
    #[command(flatten)]
    pub window: TextWindowArgs,

    /// Comma-separated SPECs for the shared K/V fit, one configuration each (e.g. 0.9,0.5,budget:0.25).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_spec_item)]
    pub shared_kv: Vec<Spec>,

    /// Comma-separated SPECs for q_proj's own fit, combined with every --shared-kv SPEC.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_spec_item)]
    pub q: Vec<Spec>,

    /// Comma-separated fits, each combined with every SPEC: pca, seed, svd, act (act
    /// calibrates on --calibrate, or the built-in text).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fit_item, default_value = "pca")]
    pub fit: Vec<FitArg>,

    /// Comma-separated group sizes for cross-layer sharing of the --shared-kv fit, combined with
    /// every other entry (e.g. 1,2,4; 1 fits every layer on its own) [default: 1].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub share_layers: Vec<NonZeroUsize>,

    /// Comma-separated shares for --share-layers above 1: latent (combined with the act fits
    /// only), basis [default: latent].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_enum)]
    pub share: Vec<ShareArg>,

    /// Calibration for the act fits (the one-shot pass runs once per sweep; each configuration
    /// calibrated sequentially runs its own). --calibrate-mode takes a list here: one-shot,sequential
    /// combines both with every act configuration (sequential not with --share basis).
    #[command(flatten)]
    pub calibration: CalibrationArgs,

    /// Output directory for sweep.json, sweep.md and sweep.svg (created atomically; must not exist
    /// unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Replace an existing --out, only once the new output is complete, and only if it is an
    /// earlier output of surgery-convert (every file listed in its SHA256SUMS, or a sweep's three
    /// files) or an empty directory, and still the one that was there when the run started;
    /// anything else is refused (remove it yourself).
    #[arg(long)]
    pub force: bool,

    /// Print nothing on success.
    #[arg(long, short)]
    pub quiet: bool,

    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

impl EvalArgs {
    /// The validated options.
    pub fn resolve(self) -> Result<EvalOptions> {
        self.window
            .text_size
            .refuse_unused(self.window.text.is_some())?;
        Ok(EvalOptions {
            model: self.model,
            revision: self.revision,
            window: self.window.resolve(),
        })
    }
}

impl ExpandArgs {
    /// The validated options.
    pub fn resolve(self) -> ExpandOptions {
        ExpandOptions {
            input: self.input,
            revision: self.revision,
            out: self.out,
            dry_run: self.dry_run,
            force: self.force,
            quiet: self.quiet,
        }
    }
}

impl InspectArgs {
    /// The validated options.
    pub fn resolve(self) -> Result<InspectOptions> {
        refuse_duplicates("--share-layers", &self.share_layers)?;
        Ok(InspectOptions {
            model: self.model,
            revision: self.revision,
            svg: self.svg,
            json: self.json,
            share_layers: self.share_layers,
        })
    }
}

impl SweepArgs {
    /// The validated options: at least one SPEC list and one fit, no entry twice, calibration
    /// exactly when a fit `act` is listed.
    pub fn resolve(self) -> Result<SweepOptions> {
        if self.shared_kv.is_empty() && self.q.is_empty() {
            return Err(Error::usage(
                "--shared-kv",
                "no surgery requested: give --shared-kv LIST and/or --q LIST (e.g. --shared-kv 0.9,0.5,budget:0.25)",
            ));
        }
        if self.fit.is_empty() {
            return Err(Error::usage(
                "--fit",
                "no fit given: give comma-separated fits, e.g. pca,svd",
            ));
        }
        refuse_duplicates("--shared-kv", &self.shared_kv)?;
        refuse_duplicates("--q", &self.q)?;
        let fits: Vec<Fit> = self.fit.iter().map(|f| f.fit()).collect();
        refuse_duplicates("--fit", &fits.iter().map(|f| f.name()).collect::<Vec<_>>())?;
        let (share_layers, shares) = self.sharing()?;
        // The modes are a grid dimension (`modes`): the calibration itself is one-shot.
        let calibration = self
            .calibration
            .resolve(
                self.fit.contains(&FitArg::Act),
                true,
                self.window.bos.policy(),
                &self.window.text_size,
            )?
            .map(|c| Calibration {
                mode: CalibrateMode::OneShot,
                ..c
            });
        let modes = match self.calibration.modes()? {
            list if list.is_empty() => vec![CalibrateMode::OneShot],
            list => list,
        };
        let compensations = self.calibration.compensations()?;
        let allocations = self.calibration.allocations()?;
        let window = self.window.resolve();
        let calibrates_on_file = calibration
            .as_ref()
            .is_some_and(|c| c.text.file().is_some());
        self.window
            .text_size
            .refuse_unused(window.text.file().is_some() || calibrates_on_file)?;
        if calibration.as_ref().is_some_and(|c| c.overlaps(&window)) {
            return Err(Error::usage(
                "--text",
                format!(
                    "{}: the tokens scored overlap the calibration tokens; never evaluate on calibration text (move --offset or --calib-offset)",
                    window.text
                ),
            ));
        }
        Ok(SweepOptions {
            input: self.input,
            revision: self.revision,
            window,
            shared_kv: self.shared_kv,
            q: self.q,
            fits,
            share_layers,
            shares,
            modes,
            compensations,
            allocations,
            calibration,
            out: self.out,
            force: self.force,
            quiet: self.quiet,
        })
    }

    /// `--share-layers` and `--share`: no duplicates, sharing only of a `--shared-kv` fit, a
    /// latent only with an act fit to learn it.
    fn sharing(&self) -> Result<(Vec<NonZeroUsize>, Vec<Share>)> {
        refuse_duplicates("--share-layers", &self.share_layers)?;
        let shares: Vec<Share> = self.share.iter().map(|s| s.share()).collect();
        refuse_duplicates(
            "--share",
            &shares.iter().map(|s| s.name()).collect::<Vec<_>>(),
        )?;
        let across = self.share_layers.iter().any(|g| g.get() > 1);
        if !across && !shares.is_empty() {
            return Err(Error::usage(
                "--share",
                "only with --share-layers sizes above 1 (e.g. --share-layers 1,2,4)",
            ));
        }
        if across && self.shared_kv.is_empty() {
            return Err(Error::usage(
                "--share-layers",
                "layers share the --shared-kv fit: add --shared-kv LIST",
            ));
        }
        let latent = across && (shares.is_empty() || shares.contains(&Share::Latent));
        if latent && !self.fit.contains(&FitArg::Act) {
            return Err(Error::usage(
                "--share",
                "latent is learnt from calibration: add act to --fit, or give --share basis",
            ));
        }
        Ok((self.share_layers.clone(), shares))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::options::{Calibration, SweepConfig};
    use clap::Parser;

    fn configs(a: &SweepArgs) -> Result<Vec<SweepConfig>> {
        a.clone().resolve().map(|o| o.configs())
    }

    fn calibration(a: &SweepArgs) -> Result<Option<Calibration>> {
        a.clone().resolve().map(|o| o.calibration)
    }

    /// The reproduce command (the calibration is the one `a` resolves to).
    fn command(a: &SweepArgs, calibration: Option<&Calibration>) -> String {
        let o = a.clone().resolve().unwrap();
        assert_eq!(o.calibration.as_ref(), calibration);
        o.reproduce_command()
    }

    fn args(extra: &[&str]) -> std::result::Result<SweepArgs, clap::Error> {
        let mut all = vec![
            "surgery-convert",
            "sweep",
            "--in",
            "m",
            "--text",
            "t.txt",
            "--out",
            "o",
        ];
        all.extend_from_slice(extra);
        match Cli::try_parse_from(all)?.command {
            Some(Command::Sweep(a)) => Ok(*a),
            other => panic!("not a sweep: {other:?}"),
        }
    }

    #[test]
    fn configs_are_the_product_in_order() {
        let a = args(&["--shared-kv", "0.9,budget:0.25", "--fit", "pca,svd"]).unwrap();
        let labels: Vec<String> = configs(&a).unwrap().iter().map(|c| c.label()).collect();
        assert_eq!(
            labels,
            [
                "--shared-kv 0.9 --fit pca",
                "--shared-kv 0.9 --fit svd",
                "--shared-kv budget:0.25 --fit pca",
                "--shared-kv budget:0.25 --fit svd",
            ]
        );
        let a = args(&["--shared-kv", "0.5", "--q", "0.9,rank:4"]).unwrap();
        let labels: Vec<String> = configs(&a).unwrap().iter().map(|c| c.label()).collect();
        assert_eq!(
            labels,
            [
                "--shared-kv 0.5 --q 0.9 --fit pca",
                "--shared-kv 0.5 --q rank:4 --fit pca",
            ]
        );
        let c = configs(&args(&["--q", "0.9"]).unwrap()).unwrap();
        assert_eq!(c[0].surgery().shared_kv, None);
        assert_eq!(c[0].surgery().q, Some(Spec::Threshold(0.9)));
        assert_eq!(
            command(&a, None),
            "surgery-convert sweep --in m --text t.txt --tokens 4096 --offset 0 --ctx 512 --shared-kv 0.5 --q 0.9,rank:4 --fit pca"
        );
    }

    #[test]
    fn bad_lists_are_refused_with_the_option_named() {
        let msg = |r: Result<Vec<SweepConfig>>| r.unwrap_err().to_string();
        assert!(msg(configs(&args(&[]).unwrap())).starts_with("--shared-kv: no surgery"));
        let m = msg(configs(&args(&["--shared-kv", "0.5,0.5"]).unwrap()));
        assert!(m.starts_with("--shared-kv: `0.5` is listed twice"), "{m}");
        let m = msg(configs(
            &args(&["--q", "0.5", "--fit", "pca,svd,pca"]).unwrap(),
        ));
        assert!(m.starts_with("--fit: `pca` is listed twice"), "{m}");
        let m = msg(configs(
            &args(&[
                "--shared-kv",
                "0.5",
                "--fit",
                "act",
                "--compensate",
                "none,o_proj,none",
            ])
            .unwrap(),
        ));
        assert!(m.starts_with("--compensate: `none` is listed twice"), "{m}");
        for bad in [
            &["--shared-kv", ""][..],
            &["--shared-kv", "0.5,,0.9"],
            &["--shared-kv", "0.5", "--fit", "pca,foo"],
            &["--shared-kv", "0.5", "--fit", ""],
            &["--shared-kv", "1.5"],
        ] {
            assert!(args(bad).is_err(), "{bad:?} should be refused");
        }
        let e = args(&["--shared-kv", "0.5", "--fit", "foo"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown fit `foo`"), "{e}");
    }

    #[test]
    fn act_calibrates_on_the_builtin_text_and_calibration_needs_act() {
        let a = args(&["--shared-kv", "0.5", "--fit", "pca,act"]).unwrap();
        let c = calibration(&a).unwrap().unwrap();
        assert_eq!(c.text, TextSource::Builtin(Builtin::Calibration));
        assert_eq!((c.tokens.get(), c.offset, c.ctx.get()), (8192, 0, 512));
        assert!(command(&a, Some(&c))
            .ends_with("--fit pca,act --calib-tokens 8192 --calib-offset 0 --calib-ctx 512"));
        for (option, value) in [("--calibrate", "c.txt"), ("--calib-tokens", "64")] {
            let a = args(&["--shared-kv", "0.5", option, value]).unwrap();
            let e = calibration(&a).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{option}: only --fit act uses calibration")),
                "{e}"
            );
        }
        let a = args(&[
            "--shared-kv",
            "0.5",
            "--fit",
            "act",
            "--calibrate",
            "c.txt",
            "--calib-tokens",
            "64",
        ])
        .unwrap();
        let c = calibration(&a).unwrap().unwrap();
        assert_eq!((c.tokens.get(), c.offset, c.ctx.get()), (64, 0, 512));
        assert!(command(&a, Some(&c)).ends_with(
            "--fit act --calibrate c.txt --calib-tokens 64 --calib-offset 0 --calib-ctx 512"
        ));
    }

    #[test]
    fn sharing_is_the_innermost_dimension() {
        let a = args(&[
            "--shared-kv",
            "0.5",
            "--fit",
            "pca,act",
            "--share-layers",
            "1,3",
            "--share",
            "latent,basis",
        ])
        .unwrap();
        let labels: Vec<String> = configs(&a).unwrap().iter().map(|c| c.label()).collect();
        assert_eq!(
            labels,
            [
                "--shared-kv 0.5 --fit pca",
                "--shared-kv 0.5 --fit pca --share-layers 3 --share basis",
                "--shared-kv 0.5 --fit act",
                "--shared-kv 0.5 --fit act --share-layers 3 --share latent",
                "--shared-kv 0.5 --fit act --share-layers 3 --share basis",
            ]
        );
        assert!(command(&a, calibration(&a).unwrap().as_ref())
            .contains("--fit pca,act --share-layers 1,3 --share latent,basis"));
        let msg = |extra: &[&str]| configs(&args(extra).unwrap()).unwrap_err().to_string();
        assert!(msg(&["--shared-kv", "0.5", "--share-layers", "2"])
            .starts_with("--share: latent is learnt"));
        assert!(
            msg(&["--q", "0.5", "--share-layers", "2", "--share", "basis"])
                .starts_with("--share-layers: layers share")
        );
        assert!(msg(&["--shared-kv", "0.5", "--share", "basis"]).starts_with("--share: only with"));
        assert!(msg(&[
            "--shared-kv",
            "0.5",
            "--share-layers",
            "2,2",
            "--share",
            "basis"
        ])
        .contains("listed twice"));
    }
}
