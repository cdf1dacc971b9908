//! A hostile or broken hub (issue 32): every answer a download gets is untrusted input. Each case
//! runs the real binary against the loopback hub of `hub_server` misbehaving one way, and checks
//! the one-line error, that nothing entered the cache unverified, and, by listing every path under
//! the sandbox root, that nothing was created outside `HF_HOME` and `--out`.

mod common;
mod hub_server;

use hub_server::*;
use std::path::{Path, PathBuf};

/// A sandbox: `root/hf-home` the cache, `root/out` the output.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn root(&self) -> &Path {
        self.tmp.path()
    }
    fn home(&self) -> PathBuf {
        self.root().join("hf-home")
    }
    fn out(&self) -> PathBuf {
        self.root().join("out")
    }

    /// Converts from `hub` into `out`, with `env`.
    fn convert(&self, hub: &Hub, env: &[(&str, &str)]) -> std::process::Output {
        run_against(hub, &self.home(), &args(&convert_args(&self.out())), env)
    }

    /// Asserts every path under the root is inside `HF_HOME` or `--out`; returns those in the cache.
    fn contained(&self) -> Vec<PathBuf> {
        let all = paths_under(self.root());
        for p in &all {
            assert!(
                p.starts_with("hf-home") || p.starts_with("out"),
                "created outside HF_HOME and --out: {}",
                p.display()
            );
        }
        all
    }

    /// The files in the repo's `blobs/`.
    fn blobs(&self) -> Vec<String> {
        std::fs::read_dir(repo_dir(&self.home()).join("blobs"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A failed run: exit 1, one line, nothing at `--out`; returns the line.
fn refused(sandbox: &Sandbox, o: &std::process::Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!sandbox.out().exists());
    error_line(o)
}

#[test]
fn file_names_that_leave_the_repo_are_refused_before_anything_is_written() {
    let probe = Sandbox::new();
    let absolute = format!("{}/outside/dir/f.json", probe.root().display());
    for (name, why) in [
        (absolute.as_str(), "an absolute path"),
        ("x/../../../../../../escaped.txt", "a `..` component"),
        ("../../escaped.txt", "a `..` component"),
        ("a\u{1}b.json", "a control character"),
    ] {
        let sandbox = if name == absolute {
            &probe
        } else {
            &Sandbox::new()
        };
        let hub = Hub::start(
            "tiny-f32-gqa",
            Behaviour {
                extra_names: vec![name.to_string()],
                ..Behaviour::default()
            },
        );
        let line = refused(sandbox, &sandbox.convert(&hub, &[]));
        assert!(
            line.contains("unsafe file name") && line.contains(why),
            "{name}: {line}"
        );
        // Nothing was asked for after the listing, and nothing written anywhere.
        assert_eq!(hub.seen().len(), 1, "{name}");
        assert_eq!(sandbox.contained(), Vec::<PathBuf>::new(), "{name}");
        println!("{name:?}: {line}");
    }
}

#[test]
fn a_commit_that_is_not_a_hash_or_not_the_listed_one_is_refused() {
    let other = "0123456789abcdef0123456789abcdef01234567";
    for (behaviour, expect) in [
        (
            Behaviour {
                listing_sha: Some("../../../../../../escaped".into()),
                ..Behaviour::default()
            },
            "not 40 hex digits",
        ),
        (
            Behaviour {
                commit_header: Some("../../../../escaped".into()),
                ..Behaviour::default()
            },
            "not 40 hex digits",
        ),
        (
            Behaviour {
                commit_header: Some(other.into()),
                ..Behaviour::default()
            },
            "answered for commit",
        ),
    ] {
        let sandbox = Sandbox::new();
        let hub = Hub::start("tiny-f32-gqa", behaviour);
        let line = refused(&sandbox, &sandbox.convert(&hub, &[]));
        assert!(line.contains(expect), "{line}");
        let paths = sandbox.contained();
        assert!(
            !paths
                .iter()
                .any(|p| p.to_string_lossy().contains("escaped")
                    || p.to_string_lossy().contains(other)),
            "{paths:?}"
        );
        assert!(sandbox.blobs().is_empty(), "{:?}", sandbox.blobs());
    }
}

#[test]
fn the_token_never_goes_to_another_host() {
    let sandbox = Sandbox::new();
    // The storage the hub redirects large files to: another host name for this machine.
    let cdn = Hub::start("tiny-bf16-sharded", Behaviour::default());
    let hub = Hub::start(
        "tiny-bf16-sharded",
        Behaviour {
            token: Some("hf_secret".into()),
            lfs_redirect: true,
            cdn_host: Some(format!("localhost:{}", cdn.port)),
            ..Behaviour::default()
        },
    );
    let o = sandbox.convert(&hub, &[("HF_TOKEN", "hf_secret")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let at_cdn = cdn.seen();
    assert!(
        at_cdn.len() >= 2,
        "the shards came from the other host: {at_cdn:?}"
    );
    assert!(
        at_cdn.iter().all(|s| s.authorization.is_none()),
        "the token went to another host: {at_cdn:?}"
    );
    assert!(hub
        .seen()
        .iter()
        .all(|s| s.authorization.as_deref() == Some("Bearer hf_secret")));
    sandbox.contained();
}

#[test]
fn a_body_that_is_not_what_the_hub_declared_never_enters_the_cache() {
    let weights = "model.safetensors";
    for (behaviour, expect) in [
        (
            Behaviour {
                corrupt: Some(weights.into()),
                ..Behaviour::default()
            },
            "SHA-256",
        ),
        (
            Behaviour {
                short: Some(weights.into()),
                ..Behaviour::default()
            },
            "holds",
        ),
        (
            Behaviour {
                long: Some(weights.into()),
                ..Behaviour::default()
            },
            "holds",
        ),
    ] {
        let sandbox = Sandbox::new();
        let hub = Hub::start("tiny-f32-gqa", behaviour);
        let line = refused(&sandbox, &sandbox.convert(&hub, &[]));
        assert!(
            line.contains(&format!("cannot download {weights}")),
            "{line}"
        );
        assert!(line.contains(expect), "{line}");
        let snapshot = repo_dir(&sandbox.home()).join("snapshots").join(COMMIT);
        assert!(!snapshot.join(weights).exists());
        // Only the verified config (and its kin) are blobs; no partial file is kept.
        let weights_etag =
            sha256_hex(&std::fs::read(common::fixture("tiny-f32-gqa").join(weights)).unwrap());
        assert!(
            !sandbox.blobs().iter().any(|b| b.starts_with(&weights_etag)),
            "{:?}",
            sandbox.blobs()
        );
        // The next run asks again rather than reusing a bad blob, and fails the same way.
        let before = hub.seen().len();
        let again = refused(&sandbox, &sandbox.convert(&hub, &[]));
        assert!(
            hub.seen().len() > before && again.contains(expect),
            "{again}"
        );
        sandbox.contained();
        println!("{line}");
    }
}

#[test]
fn a_huge_declared_size_is_refused_before_a_byte_is_written() {
    let sandbox = Sandbox::new();
    let hub = Hub::start(
        "tiny-f32-gqa",
        Behaviour {
            huge: Some("config.json".into()),
            ..Behaviour::default()
        },
    );
    let line = refused(&sandbox, &sandbox.convert(&hub, &[]));
    assert!(
        line.contains("cannot download config.json") && line.contains("2147483648 bytes, over"),
        "{line}"
    );
    let asked: Vec<_> = hub
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("/config.json"))
        .collect();
    assert!(
        asked
            .iter()
            .all(|s| s.range.as_deref() == Some("bytes=0-0")),
        "the body was asked for: {asked:?}"
    );
    assert!(sandbox.blobs().is_empty(), "{:?}", sandbox.blobs());
    sandbox.contained();
}

#[test]
fn a_redirect_loop_ends_after_a_bounded_number_of_requests() {
    let sandbox = Sandbox::new();
    let hub = Hub::start(
        "tiny-f32-gqa",
        Behaviour {
            redirect_loop: true,
            ..Behaviour::default()
        },
    );
    let line = refused(&sandbox, &sandbox.convert(&hub, &[]));
    assert!(line.contains("redirected more than 10 times"), "{line}");
    let n = hub.seen().len();
    assert!(n <= 12, "{n} requests");
    sandbox.contained();
}

#[test]
fn a_revision_that_would_leave_refs_is_refused_before_any_request() {
    let sandbox = Sandbox::new();
    let hub = Hub::start("tiny-f32-gqa", Behaviour::default());
    for revision in ["../../../../escaped", "/abs", "a/../../b"] {
        let mut a = convert_args(&sandbox.out());
        a.extend(["--revision".to_string(), revision.to_string()]);
        let o = run_against(&hub, &sandbox.home(), &args(&a), &[]);
        assert_eq!(o.status.code(), Some(2), "{revision}");
        assert!(error_line(&o).contains("--revision"), "{revision}");
    }
    assert!(hub.seen().is_empty());
    assert_eq!(sandbox.contained(), Vec::<PathBuf>::new());
}
