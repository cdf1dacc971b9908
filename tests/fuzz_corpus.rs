//! Replays the fuzzing corpus on stable Rust: every committed input of the `checkpoint` fuzz target
//! (`fuzz/seeds/`, the minimized corpus of the last long run in `fuzz/corpus-min/`, and any crash
//! found in `fuzz/regressions/`) goes through the same harness, and must come back as `Ok` or a
//! one-line error, never a panic. Their sections also feed the narrower entries (a factored
//! `config.json`, the split of fused tensors), which must not panic or report a bug either.

use std::path::{Path, PathBuf};
use surgery_convert::error::Error;
use surgery_convert::fuzzing::{
    factored_config, hub_answer, join, open_and_plan, sections, split_fused,
};

fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn every_corpus_input_is_handled_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("ckpt");
    let seeds = inputs("fuzz/seeds/checkpoint");
    assert!(seeds.len() >= 40, "seed corpus missing: run fuzz/seeds.py");
    let mut all = seeds.clone();
    all.extend(inputs("fuzz/corpus-min/checkpoint"));
    all.extend(inputs("fuzz/regressions/checkpoint"));
    for path in &all {
        let data = std::fs::read(path).unwrap();
        let result = std::panic::catch_unwind(|| open_and_plan(&data, &work));
        let Ok(result) = result else {
            panic!("{} panicked", path.display());
        };
        if let Err(e) = result {
            // Printed as one line whatever the input holds (names with newlines, escapes).
            let line = e.to_line();
            assert!(
                !line.chars().any(char::is_control),
                "{}: {line}",
                path.display()
            );
        }
    }
    // The intact seeds plan; every damaged one is refused.
    for path in &seeds {
        let name = path.file_name().unwrap().to_string_lossy();
        let result = open_and_plan(&std::fs::read(path).unwrap(), &work);
        let should_plan = name.starts_with("base")
            || name.starts_with("option-")
            || name == "dtype-i8-f8-copied"
            || name.starts_with("nan-inf");
        assert_eq!(result.is_ok(), should_plan, "{name}: {result:?}");
    }
}

#[test]
fn the_corpus_feeds_the_factored_config_and_fused_split_entries() {
    let mut all = inputs("fuzz/seeds/checkpoint");
    all.extend(inputs("fuzz/corpus-min/checkpoint"));
    all.extend(inputs("fuzz/regressions/checkpoint"));
    let mut split = 0;
    for path in &all {
        let data = std::fs::read(path).unwrap();
        let parts = sections(&data);
        let config = parts.first().copied().unwrap_or_default();
        let mut results = vec![std::panic::catch_unwind(|| factored_config(config))];
        for shard in parts.iter().skip(2) {
            let input = join(&[config, shard]);
            results.push(std::panic::catch_unwind(|| split_fused(&input)));
        }
        for result in results {
            let Ok(result) = result else {
                panic!("{} panicked", path.display());
            };
            match result {
                Err(e @ Error::Bug { .. }) => panic!("{}: {e}", path.display()),
                Ok(n) => split += usize::from(n > 0),
                Err(_) => {}
            }
        }
    }
    assert!(split > 0, "no corpus input got through");
}

#[test]
fn every_hub_corpus_input_is_handled_without_panicking() {
    let seeds = inputs("fuzz/seeds/hub");
    assert!(
        seeds.len() >= 6,
        "seed corpus missing: run fuzz/seeds.py --target hub"
    );
    let mut all = seeds.clone();
    all.extend(inputs("fuzz/corpus-min/hub"));
    all.extend(inputs("fuzz/regressions/hub"));
    for path in &all {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| hub_answer(&data)).is_err() {
            panic!("{} panicked", path.display());
        }
    }
    let accepted = |name: &str| {
        hub_answer(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fuzz/seeds/hub")
                    .join(name),
            )
            .unwrap(),
        )
    };
    // The valid answer: the listing and its 3 names, the ETag, both Content-Range reads, the
    // redirect; the hostile listings are refused whole.
    assert_eq!(accepted("valid"), 8);
    for hostile in ["traversal", "absolute", "bad-commit", "control"] {
        assert!(accepted(hostile) < 4, "{hostile}: {}", accepted(hostile));
    }
}

#[test]
fn the_factored_config_and_fused_split_targets_corpora_replay() {
    let read = |p: &PathBuf| std::fs::read(p).unwrap();
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    let mut configs = inputs("fuzz/seeds/factored_config");
    assert!(configs.len() >= 10, "run fuzz/seeds.py --target shapes");
    let factored_seeds = configs.clone();
    configs.extend(inputs("fuzz/corpus-min/factored_config"));
    configs.extend(inputs("fuzz/regressions/factored_config"));
    for path in &configs {
        let data = read(path);
        match std::panic::catch_unwind(|| factored_config(&data)) {
            Err(_) => panic!("{} panicked", path.display()),
            Ok(Err(e @ Error::Bug { .. })) => panic!("{}: {e}", path.display()),
            Ok(_) => {}
        }
    }
    for path in factored_seeds
        .iter()
        .filter(|p| name(p).starts_with("base-factored"))
    {
        assert!(factored_config(&read(path)).unwrap() > 0, "{}", name(path));
    }
    let mut fused = inputs("fuzz/seeds/fused_split");
    assert!(fused.len() >= 4, "run fuzz/seeds.py --target shapes");
    let fused_seeds = fused.clone();
    fused.extend(inputs("fuzz/corpus-min/fused_split"));
    fused.extend(inputs("fuzz/regressions/fused_split"));
    for path in &fused {
        let data = read(path);
        match std::panic::catch_unwind(|| split_fused(&data)) {
            Err(_) => panic!("{} panicked", path.display()),
            Ok(Err(e @ Error::Bug { .. })) => panic!("{}: {e}", path.display()),
            Ok(_) => {}
        }
    }
    // The whole Phi-3 splits into its parts; the ones whose fused rows do not fit are refused.
    for path in &fused_seeds {
        let result = split_fused(&read(path));
        match name(path).as_str() {
            "phi3" => assert!(result.unwrap() > 9),
            "phi3-qkv-rows-wrong" | "phi3-gate-up-odd" => {
                let e = result.unwrap_err().to_string();
                assert!(e.contains("qkv_proj") || e.contains("gate_up_proj"), "{e}");
            }
            _ => {}
        }
    }
}
