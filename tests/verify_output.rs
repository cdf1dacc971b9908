//! `surgery-convert verify` and `sha256sum -c` on converted outputs, and detection of a flipped byte.

mod common;

use common::*;

#[test]
fn verify_passes_then_names_a_corrupted_shard() {
    let tmp = tempfile::tempdir().unwrap();
    for (fixture_name, args) in [
        ("tiny-f32-gqa", &["--shared-kv", "0.3"][..]),
        (
            "tiny-bf16-sharded",
            &["--separate", "0.9", "--max-shard-size", "100KB"][..],
        ),
    ] {
        let out = tmp.path().join(fixture_name);
        let mut full = vec!["--in", fixture_name, "--out", out.to_str().unwrap()];
        let input = format!("fixtures/{fixture_name}");
        full[1] = &input;
        full.extend_from_slice(args);
        run_ok(&full);

        let ok = run(&["verify", out.to_str().unwrap()]);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(String::from_utf8_lossy(&ok.stdout).starts_with("OK"));
        let sums = std::process::Command::new("sha256sum")
            .args(["-c", "--quiet", "SHA256SUMS"])
            .current_dir(&out)
            .output()
            .unwrap();
        assert!(
            sums.status.success(),
            "sha256sum -c: {}",
            String::from_utf8_lossy(&sums.stdout)
        );

        // Flip one byte in the middle of the first shard's data.
        let shard = entries(&out)
            .into_iter()
            .find(|n| n.ends_with(".safetensors"))
            .unwrap();
        let path = out.join(&shard);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let bad = run(&["verify", out.to_str().unwrap()]);
        assert_eq!(bad.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(
            stderr.contains(&format!("{shard}: checksum mismatch")),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn verify_reports_unlisted_and_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    run_ok(&[
        "--in",
        "fixtures/tiny-tied",
        "--out",
        out.to_str().unwrap(),
        "--q",
        "0.9",
    ]);
    std::fs::write(out.join("extra.txt"), "x").unwrap();
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    let bad = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("extra.txt: not listed in SHA256SUMS"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tokenizer.json: listed in SHA256SUMS but missing"),
        "{stderr}"
    );
}
