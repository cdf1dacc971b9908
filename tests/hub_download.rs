//! Downloading `--in org/name` from a Hugging Face hub: a server on loopback, started by each test,
//! answers the calls `hf-hub` makes as the hub does (revision info, `resolve` with `ETag`,
//! `X-Repo-Commit` and `Content-Range`, ranged bodies; see `docs/hub-protocol.md`), and the real
//! binary is pointed at it with `HF_ENDPOINT`. Every case checks the exit status, the one-line
//! message and what the cache holds afterwards.

mod common;
mod hub_server;

use common::*;
use hub_server::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn downloads_a_repo_then_converts_it_and_a_rerun_asks_nothing() {
    for fixture_name in ["tiny-f32-gqa", "tiny-bf16-sharded"] {
        let tmp = tempfile::tempdir().unwrap();
        let hub = Hub::start(fixture_name, Behaviour::default());
        let home = tmp.path().join("hf-home");
        let out = tmp.path().join("out");
        let o = run_against(&hub, &home, &args(&convert_args(&out)), &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The same output as the local fixture's.
        let local = tmp.path().join("local");
        run_ok(&[
            "--in",
            &format!("fixtures/{fixture_name}"),
            "--out",
            local.to_str().unwrap(),
            "--shared-kv",
            "0.5",
        ]);
        assert_eq!(read_tensors(&out), read_tensors(&local), "{fixture_name}");
        let r = report(&out);
        assert_eq!(r["input"]["source"], "hub");
        assert_eq!(r["input"]["commit"], COMMIT);
        // The cache as huggingface_hub lays it out: every file in the snapshot, the ref.
        let repo = repo_dir(&home);
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            COMMIT
        );
        for (name, bytes) in read_files(&fixture(fixture_name)) {
            let linked = repo.join("snapshots").join(COMMIT).join(&name);
            assert_eq!(std::fs::read(&linked).unwrap(), bytes, "{name}");
        }
        // Every request carried the revision info first, then only resolve calls.
        let seen = hub.seen();
        assert_eq!(
            seen[0].path,
            format!("/api/models/{REPO}/revision/main"),
            "{seen:?}"
        );
        // Files are asked for at the listed commit, as huggingface_hub's snapshot_download does.
        assert!(seen[1..]
            .iter()
            .all(|s| s.path.contains(&format!("/resolve/{COMMIT}/"))));
        // A second run finds everything cached: not one request.
        let again = tmp.path().join("again");
        let before = hub.seen().len();
        let o = run_against(&hub, &home, &args(&convert_args(&again)), &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(hub.seen().len(), before, "the re-run downloaded nothing");
        println!(
            "{fixture_name}: downloaded with {before} requests, converted; re-run: 0 requests"
        );
    }
}

#[test]
fn a_revision_by_commit_is_downloaded_under_that_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start("tiny-f32-gqa", Behaviour::default());
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let mut a = convert_args(&out);
    a.extend(["--revision".to_string(), COMMIT.to_string()]);
    let o = run_against(&hub, &home, &args(&a), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(hub
        .seen()
        .iter()
        .all(|s| s.path.contains(COMMIT) || s.path.ends_with("/revision/main")));
    assert!(repo_dir(&home)
        .join("snapshots")
        .join(COMMIT)
        .join("config.json")
        .is_file());
    assert_eq!(report(&out)["input"]["revision"], COMMIT);
}

#[test]
fn a_revision_by_branch_is_downloaded_and_its_ref_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start("tiny-f32-gqa", Behaviour::default());
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let mut a = convert_args(&out);
    a.extend(["--revision".to_string(), BRANCH.to_string()]);
    let o = run_against(&hub, &home, &args(&a), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen = hub.seen();
    assert_eq!(
        seen[0].path,
        format!("/api/models/{REPO}/revision/{BRANCH}")
    );
    assert!(seen[1..]
        .iter()
        .all(|s| s.path.contains(&format!("/resolve/{COMMIT}/"))));
    // As huggingface_hub: the branch's ref names the commit, the files sit under the commit.
    let repo = repo_dir(&home);
    assert_eq!(
        std::fs::read_to_string(repo.join("refs").join(BRANCH)).unwrap(),
        COMMIT
    );
    assert!(!repo.join("refs/main").exists());
    assert!(repo
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors")
        .is_file());
    let r = report(&out);
    assert_eq!(
        (
            r["input"]["revision"].as_str(),
            r["input"]["commit"].as_str()
        ),
        (Some(BRANCH), Some(COMMIT))
    );
    // Offline, the branch now resolves from the cache alone.
    let again = tmp.path().join("again");
    let before = hub.seen().len();
    let mut a = convert_args(&again);
    a.extend(["--revision".to_string(), BRANCH.to_string()]);
    let o = run_against(&hub, &home, &args(&a), &[("HF_HUB_OFFLINE", "1")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hub.seen().len(), before);
}

#[test]
fn a_missing_revision_is_one_line_and_leaves_no_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start("tiny-f32-gqa", Behaviour::default());
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let mut a = convert_args(&out);
    a.extend(["--revision".to_string(), "no-such-branch".to_string()]);
    let o = run_against(&hub, &home, &args(&a), &[]);
    assert_eq!(o.status.code(), Some(1));
    let line = error_line(&o);
    assert!(
        line.contains("--in tiny-org/tiny-llama")
            && line.contains("revision `no-such-branch`")
            && line.contains("404"),
        "{line}"
    );
    assert!(!repo_dir(&home).join("snapshots").exists());
    assert!(!out.exists());
}

#[test]
fn a_gated_repo_asks_for_a_token_and_hf_token_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let behaviour = Behaviour {
        token: Some("hf_test_token".into()),
        ..Behaviour::default()
    };
    let hub = Hub::start("tiny-f32-gqa", behaviour);
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let o = run_against(&hub, &home, &args(&convert_args(&out)), &[]);
    assert_eq!(o.status.code(), Some(1));
    let line = error_line(&o);
    assert!(line.contains("401") && line.contains("HF_TOKEN"), "{line}");
    assert!(!out.exists());
    let o = run_against(
        &hub,
        &home,
        &args(&convert_args(&out)),
        &[("HF_TOKEN", "hf_test_token")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen = hub.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.authorization.as_deref(), Some("Bearer hf_test_token"));
}

#[test]
fn a_dropped_download_is_never_taken_as_complete_and_the_next_run_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let behaviour = Behaviour {
        drop_once: Some("model.safetensors".into()),
        ..Behaviour::default()
    };
    let hub = Hub::start("tiny-f32-gqa", behaviour);
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let o = run_against(&hub, &home, &args(&convert_args(&out)), &[]);
    assert_eq!(o.status.code(), Some(1));
    let line = error_line(&o);
    assert!(line.contains("cannot download model.safetensors"), "{line}");
    let weights = repo_dir(&home)
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    assert!(!weights.exists(), "a partial file is never linked");
    assert!(!out.exists());
    // Offline, the incomplete snapshot is refused, not converted.
    let o = run_against(
        &hub,
        &home,
        &args(&convert_args(&out)),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(error_line(&o).contains("HF_HUB_OFFLINE"));
    // Online again: the download resumes and completes.
    let o = run_against(&hub, &home, &args(&convert_args(&out)), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        std::fs::read(fixture("tiny-f32-gqa").join("model.safetensors")).unwrap()
    );
    let resumed = hub
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("model.safetensors"))
        .any(|s| {
            s.range
                .as_deref()
                .is_some_and(|r| r != "bytes=0-" && r != "bytes=0-0")
        });
    println!("dropped download: resumed with a Range request: {resumed}");
}

#[test]
fn offline_with_the_files_cached_asks_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start("tiny-f32-gqa", Behaviour::default());
    let home = tmp.path().join("hf-home");
    let first = tmp.path().join("first");
    let o = run_against(&hub, &home, &args(&convert_args(&first)), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = hub.seen().len();
    let out = tmp.path().join("out");
    let o = run_against(
        &hub,
        &home,
        &args(&convert_args(&out)),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hub.seen().len(), before);
    // Offline and nothing cached: one line naming the setting, nothing asked.
    let empty = tmp.path().join("empty-home");
    let o = run_against(
        &hub,
        &empty,
        &args(&convert_args(&tmp.path().join("x"))),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(error_line(&o).contains("HF_HUB_OFFLINE is set"));
    assert_eq!(hub.seen().len(), before);
}

#[test]
fn large_files_through_a_cdn_redirect_download_like_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let behaviour = Behaviour {
        lfs_redirect: true,
        ..Behaviour::default()
    };
    let hub = Hub::start("tiny-bf16-sharded", behaviour);
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let o = run_against(&hub, &home, &args(&convert_args(&out)), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (name, bytes) in read_files(&fixture("tiny-bf16-sharded")) {
        let linked = repo_dir(&home).join("snapshots").join(COMMIT).join(&name);
        assert_eq!(std::fs::read(&linked).unwrap(), bytes, "{name}");
    }
    let cdn = hub
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .count();
    assert!(
        cdn >= 2,
        "the weights came from the redirect target ({cdn} requests)"
    );
}

#[test]
fn a_stalled_hub_is_a_clear_error_in_bounded_time() {
    let tmp = tempfile::tempdir().unwrap();
    let behaviour = Behaviour {
        stall: true,
        ..Behaviour::default()
    };
    let hub = Hub::start("tiny-f32-gqa", behaviour);
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    let mut cmd = command_against(
        &hub,
        &home,
        &args(&convert_args(&out)),
        &[("HF_HUB_DOWNLOAD_TIMEOUT", "1")],
    );
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // A safety net for CI, not a speed check: the timeout is 1 s; a hang is killed after 60.
    let mut waited = 0;
    while child.try_wait().unwrap().is_none() {
        assert!(
            waited < 600,
            "still running after 60 s: the stall was not detected"
        );
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let line = error_line(&o);
    assert!(
        line.contains("sent nothing for 1 s") && line.contains("HF_HUB_DOWNLOAD_TIMEOUT"),
        "{line}"
    );
    assert!(!out.exists());
    let o = run_against(
        &hub,
        &home,
        &args(&convert_args(&out)),
        &[("HF_HUB_DOWNLOAD_TIMEOUT", "soon")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(error_line(&o).contains("HF_HUB_DOWNLOAD_TIMEOUT: `soon` is not a positive number"));
}

/// `command` run under a pseudo-terminal (util-linux `script`), so that stderr is a terminal;
/// returns what the terminal showed.
fn on_a_terminal(command: Command) -> (bool, String) {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut line = vec![quote(command.get_program())];
    line.extend(command.get_args().map(quote));
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-f", "-c", &line.join(" "), "/dev/null"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null());
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let o = cmd
        .output()
        .expect("util-linux `script` runs the command under a terminal");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn download_progress_shows_on_a_terminal_and_not_under_quiet() {
    for quiet in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let hub = Hub::start("tiny-bf16-sharded", Behaviour::default());
        let home = tmp.path().join("hf-home");
        let out = tmp.path().join("out");
        let mut a = convert_args(&out);
        if quiet {
            a.push("--quiet".into());
        }
        let (ok, shown) = on_a_terminal(command_against(&hub, &home, &args(&a), &[]));
        assert!(ok, "{shown}");
        // hf-hub shortens long names from the left: `..del-00001-of-00002.safetensors`.
        let shard = "00001-of-00002.safetensors [";
        if quiet {
            assert_eq!(shown, "", "--quiet shows nothing");
        } else {
            // hf-hub's bar names each file as it downloads it; the summary follows.
            assert!(shown.contains(shard), "no progress for {shard}: {shown:?}");
            assert!(shown.contains("117.71 KiB/117.71 KiB"), "{shown:?}");
            assert!(shown.contains("wrote "), "{shown:?}");
        }
        assert!(out.join("model-00002-of-00002.safetensors").exists());
    }
}
