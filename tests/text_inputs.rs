//! Text files given to `--calibrate`, `--check-text` and `--text` (convert, eval, sweep): a FIFO,
//! a device or a file over `--max-text-size` is refused at once in one line, with nothing
//! written; a large file is read with bounded memory, and only its first tokens are used; a
//! signal stops the read.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_surgery-convert");
/// The fixture every command here runs on.
const MODEL: &str = "tiny-f32-gqa";

/// Waits for `child`, killing it and failing after 60 seconds (the old behaviour on a FIFO was
/// to block forever); `peak` gets the most resident memory seen (`VmHWM`), in bytes.
fn wait(mut child: Child, args: &[String], peak: Option<&mut u64>) -> Output {
    let started = Instant::now();
    let mut hwm = 0;
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("surgery-convert {args:?} still running after 60 s: killed");
        }
        hwm = hwm.max(high_water(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(peak) = peak {
        *peak = hwm;
    }
    child.wait_with_output().unwrap()
}

/// The peak resident memory of process `pid` so far, in bytes.
fn high_water(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn spawn(args: &[String]) -> Child {
    Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `args` under the watchdog.
fn run_watched(args: &[String]) -> Output {
    wait(spawn(args), args, None)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Each command that reads a text file, with `file` as that text, writing under `tmp`: the
/// option, the arguments.
fn commands(file: &Path, tmp: &Path) -> Vec<(&'static str, Vec<String>)> {
    let model = fixture(MODEL).to_string_lossy().into_owned();
    let file = file.to_string_lossy().into_owned();
    let out = |name: &str| tmp.join(name).to_string_lossy().into_owned();
    let convert = |extra: &[&str]| {
        let mut a = strings(&["--in", &model, "--out", &out("o"), "--shared-kv", "0.5"]);
        a.extend(strings(extra));
        a
    };
    vec![
        (
            "--calibrate",
            convert(&["--fit", "act", "--calibrate", &file, "--no-check"]),
        ),
        ("--check-text", convert(&["--check-text", &file])),
        ("--text", strings(&["eval", &model, "--text", &file])),
        (
            "--text",
            strings(&[
                "sweep",
                "--in",
                &model,
                "--out",
                &out("s"),
                "--shared-kv",
                "0.5",
                "--text",
                &file,
            ]),
        ),
        (
            "--calibrate",
            strings(&[
                "sweep",
                "--in",
                &model,
                "--out",
                &out("s"),
                "--shared-kv",
                "0.5",
                "--fit",
                "act",
                "--calibrate",
                &file,
            ]),
        ),
    ]
}

/// Every command refuses `file` at once with one line holding `needle` (and the option), exit
/// code 2, and writes nothing.
fn refused_everywhere(file: &Path, extra: &[&str], needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    for (option, mut args) in commands(file, tmp.path()) {
        args.extend(strings(extra));
        let r = run_watched(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "surgery-convert: error: {option}: `{}`",
                file.display()
            )) && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(r.stdout.is_empty(), "{args:?}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("text.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // Nothing ever writes to it: opening it for reading would block.
    refused_everywhere(
        &fifo,
        &[],
        "is not a regular file (a FIFO); give a text file",
    );
}

#[test]
fn a_device_or_a_directory_is_refused() {
    refused_everywhere(
        Path::new("/dev/zero"),
        &[],
        "is not a regular file (a character device); give a text file",
    );
    let tmp = tempfile::tempdir().unwrap();
    refused_everywhere(tmp.path(), &[], "is not a regular file (a directory)");
}

#[test]
fn a_file_over_the_limit_is_refused_naming_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("two-kib.txt");
    std::fs::write(&file, "tok5 tok17\n".repeat(187)).unwrap();
    refused_everywhere(
        &file,
        &["--max-text-size", "1KiB"],
        "is 2057 bytes, more than --max-text-size 1 KiB: give a smaller file, or raise the limit (e.g. --max-text-size 1GiB)",
    );
    // The limit raised, the same file is read.
    let model = fixture(MODEL);
    let at_limit = [
        "--text",
        file.to_str().unwrap(),
        "--tokens",
        "64",
        "--ctx",
        "64",
    ];
    eval_json(
        &model,
        &[&at_limit[..], &["--max-text-size", "2057"]].concat(),
    );
    // The option without a file to limit is refused.
    let r = run(&["eval", model.to_str().unwrap(), "--max-text-size", "1GiB"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("surgery-convert: error: --max-text-size: no text file is read"),
        "{stderr}"
    );
}

/// `path` filled with the fixtures' evaluation text repeated to at least `bytes`.
fn repeated_text(path: &Path, bytes: usize) -> String {
    let unit = std::fs::read_to_string(fixture("eval/text.txt")).unwrap() + "\n";
    let text = unit.repeat(bytes / unit.len() + 1);
    std::fs::write(path, &text).unwrap();
    text
}

#[test]
fn a_large_file_is_read_with_bounded_memory_and_only_its_first_tokens_are_used() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.txt");
    let text = repeated_text(&big, 30_000_000);
    // Its first 64 KB alone (a whole line: the tokenizer splits at spaces).
    let small = tmp.path().join("small.txt");
    let cut = text[..64_000].rfind('\n').unwrap() + 1;
    std::fs::write(&small, &text[..cut]).unwrap();
    let model = fixture(MODEL);
    let args = |file: &PathBuf| {
        strings(&[
            "eval",
            model.to_str().unwrap(),
            "--text",
            file.to_str().unwrap(),
            "--offset",
            "1000",
            "--tokens",
            "512",
            "--ctx",
            "64",
        ])
    };
    let mut peak = 0;
    let r = wait(spawn(&args(&big)), &args(&big), Some(&mut peak));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let want = eval_json(
        &model,
        &args(&small)[2..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    for key in [
        "perplexity",
        "tokens",
        "windows",
        "offset",
        "unknown_tokens",
    ] {
        assert_eq!(got[key], want[key], "{key}");
    }
    // The record names the whole file.
    let sha = surgery_convert::digest::sha256_hex(text.as_bytes());
    assert_eq!(got["text_sha256"], sha.as_str());
    // Tokenizing the whole file took about 70 bytes per byte of text (2 GB here); streamed, a
    // window at a time, the run stays far below the file's own size.
    assert!(peak < 256 << 20, "peak resident memory {peak} bytes");

    // Calibration on the large file: the same output as on its first 64 KB.
    let convert = |file: &Path, out: &str| {
        let out = tmp.path().join(out);
        run_ok(&[
            "--in",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shared-kv",
            "0.5",
            "--fit",
            "act",
            "--calibrate",
            file.to_str().unwrap(),
            "--calib-offset",
            "100",
            "--calib-tokens",
            "600",
            "--calib-ctx",
            "64",
            "--no-check",
        ]);
        out
    };
    let (from_big, from_small) = (convert(&big, "big"), convert(&small, "small"));
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(weights(&from_big) == weights(&from_small));
    assert_eq!(
        report(&from_big)["options"]["calibration"]["sha256"],
        sha.as_str()
    );
}

#[test]
fn a_signal_stops_the_read() {
    // A file that takes a while to read through (it is hashed whole); SIGINT as soon as the
    // process has it open.
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.txt");
    repeated_text(&big, 100_000_000);
    let model = fixture(MODEL);
    let args = strings(&[
        "eval",
        model.to_str().unwrap(),
        "--text",
        big.to_str().unwrap(),
        "--max-text-size",
        "1GiB",
    ]);
    let child = spawn(&args);
    let fd_dir = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let started = Instant::now();
    let has_open = || {
        std::fs::read_dir(&fd_dir)
            .map(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).ok() == Some(big.clone()))
            })
            .unwrap_or(false)
    };
    while !has_open() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let r = wait(child, &args, None);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
}
