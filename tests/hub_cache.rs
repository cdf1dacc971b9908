//! Resolving `--in org/name` from a Hugging Face cache laid out as `huggingface_hub` lays it out
//! (blobs, snapshots of symlinks, refs), offline.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::path::Path;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays out `models--tiny-org--tiny-llama` under `hub` with the files of a fixture.
fn lay_out_cache(hub: &Path, fixture_name: &str) {
    let repo = hub.join("models--tiny-org--tiny-llama");
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (name, bytes) in read_files(&fixture(fixture_name)) {
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(blobs.join(&digest), &bytes).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&digest), snapshot.join(&name))
            .unwrap();
    }
}

#[test]
fn resolves_a_repo_id_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hf-home").join("hub");
    lay_out_cache(&hub, "tiny-bf16-sharded");
    let local = tmp.path().join("local");
    run_ok(&[
        "--in",
        "fixtures/tiny-bf16-sharded",
        "--out",
        local.to_str().unwrap(),
        "--shared-kv",
        "0.5",
    ]);

    let cases = [
        ("HF_HUB_CACHE", hub.clone()),
        ("HF_HOME", tmp.path().join("hf-home")),
    ];
    for (i, (var, value)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("hub{i}"));
        let o = run_env(
            &[
                "--in",
                "tiny-org/tiny-llama",
                "--out",
                out.to_str().unwrap(),
                "--shared-kv",
                "0.5",
            ],
            &[(var, value.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
        );
        assert!(
            o.status.success(),
            "{var}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            read_tensors(&out),
            read_tensors(&local),
            "{var}: hub input converts like the local copy"
        );
        let r = report(&out);
        assert_eq!(r["input"]["source"], "hub");
        assert_eq!(r["input"]["repo"], "tiny-org/tiny-llama");
        assert_eq!(r["input"]["commit"], COMMIT);
        // Non-weight files are copied as files (the cache's symlinks are followed).
        assert!(!std::fs::symlink_metadata(out.join("tokenizer.json"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    // A revision pinned by commit hash resolves too.
    let out = tmp.path().join("by-commit");
    let o = run_env(
        &[
            "--in",
            "tiny-org/tiny-llama",
            "--revision",
            COMMIT,
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.5",
        ],
        &[
            ("HF_HUB_CACHE", hub.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn offline_miss_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    lay_out_cache(&hub, "tiny-f32-gqa");
    for (repo, revision) in [
        ("tiny-org/other-model", "main"),
        ("tiny-org/tiny-llama", "v2"),
    ] {
        let out = tmp.path().join("o");
        let o = run_env(
            &[
                "--in",
                repo,
                "--revision",
                revision,
                "--out",
                out.to_str().unwrap(),
                "--shared-kv",
                "0.5",
            ],
            &[
                ("HF_HUB_CACHE", hub.to_str().unwrap()),
                ("HF_HUB_OFFLINE", "1"),
            ],
        );
        assert_eq!(o.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(repo) && stderr.contains("HF_HUB_OFFLINE"),
            "{stderr}"
        );
        assert!(!out.exists());
    }
}
