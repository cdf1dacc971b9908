//! `sweep`'s command line resolved: the configurations (the cartesian product of the SPEC lists and
//! the fit list, in that order), the calibration settings, and the command that reproduces the
//! sweep.

use crate::cli::{Calibration, FitArg, SweepArgs};
use crate::decompose::Fit;
use crate::error::{Error, Result};
use crate::plan::Surgery;
use crate::spec::Spec;

/// One conversion of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepConfig {
    /// `--shared-kv` SPEC, if that list was given.
    pub shared_kv: Option<Spec>,
    /// `--q` SPEC, if that list was given.
    pub q: Option<Spec>,
    /// The fit.
    pub fit: Fit,
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
        parts.join(" ")
    }
}

/// Refuses an entry listed twice in `option`'s list.
fn refuse_duplicates<T: ToString>(option: &str, items: &[T]) -> Result<()> {
    let names: Vec<String> = items.iter().map(ToString::to_string).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(Error::usage(
                option,
                format!("`{name}` is listed twice; give each entry once"),
            ));
        }
    }
    Ok(())
}

/// The configurations, in order: every `--shared-kv` SPEC, within it every `--q` SPEC, within that
/// every fit.
pub fn configs(args: &SweepArgs) -> Result<Vec<SweepConfig>> {
    if args.shared_kv.is_empty() && args.q.is_empty() {
        return Err(Error::usage(
            "--shared-kv",
            "no surgery requested: give --shared-kv LIST and/or --q LIST (e.g. --shared-kv 0.9,0.5,budget:0.25)",
        ));
    }
    if args.fit.is_empty() {
        return Err(Error::usage(
            "--fit",
            "no fit given: give comma-separated fits, e.g. pca,svd",
        ));
    }
    refuse_duplicates("--shared-kv", &args.shared_kv)?;
    refuse_duplicates("--q", &args.q)?;
    let fits: Vec<Fit> = args.fit.iter().map(|f| f.fit()).collect();
    refuse_duplicates("--fit", &fits.iter().map(|f| f.name()).collect::<Vec<_>>())?;
    let or_none = |list: &[Spec]| -> Vec<Option<Spec>> {
        if list.is_empty() {
            vec![None]
        } else {
            list.iter().copied().map(Some).collect()
        }
    };
    let mut out = Vec::new();
    for &shared_kv in &or_none(&args.shared_kv) {
        for &q in &or_none(&args.q) {
            for &fit in &fits {
                out.push(SweepConfig { shared_kv, q, fit });
            }
        }
    }
    Ok(out)
}

/// The calibration settings: present exactly when a fit `act` is listed, which needs
/// `--calibrate`.
pub fn calibration(args: &SweepArgs) -> Result<Option<Calibration>> {
    args.calibration.resolve(args.fit.contains(&FitArg::Act))
}

/// The command that reproduces the sweep (add `--out DIR`).
pub fn command(args: &SweepArgs, calibration: Option<&Calibration>) -> String {
    let list = |items: Vec<String>| items.join(",");
    let mut parts = vec!["surgery-convert sweep --in".to_string(), args.input.clone()];
    if args.revision != "main" {
        parts.extend(["--revision".into(), args.revision.clone()]);
    }
    parts.extend([
        "--text".into(),
        args.text.display().to_string(),
        "--tokens".into(),
        args.tokens.to_string(),
        "--offset".into(),
        args.offset.to_string(),
        "--ctx".into(),
        args.ctx.to_string(),
    ]);
    for (flag, specs) in [("--shared-kv", &args.shared_kv), ("--q", &args.q)] {
        if !specs.is_empty() {
            parts.extend([
                flag.to_string(),
                list(specs.iter().map(ToString::to_string).collect()),
            ]);
        }
    }
    parts.extend([
        "--fit".into(),
        list(
            args.fit
                .iter()
                .map(|f| f.fit().name().to_string())
                .collect(),
        ),
    ]);
    if let Some(c) = calibration {
        parts.extend(c.command_args());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

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
            Some(Command::Sweep(a)) => Ok(a),
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
    fn act_needs_calibration_and_calibration_needs_act() {
        let a = args(&["--shared-kv", "0.5", "--fit", "pca,act"]).unwrap();
        let m = calibration(&a).unwrap_err().to_string();
        assert!(m.starts_with("--fit act: needs calibration text"), "{m}");
        let a = args(&["--shared-kv", "0.5", "--calibrate", "c.txt"]).unwrap();
        assert!(calibration(&a)
            .unwrap_err()
            .to_string()
            .starts_with("--calibrate: only --fit act"));
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
}
