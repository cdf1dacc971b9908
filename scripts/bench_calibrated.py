"""scripts/bench's calibrated workloads (`calibrated:NAME`): the path the docs recommend,

    surgery-convert --in IN --out OUT --shared-kv budget:0.5 --fit act --calib-tokens 8192 \
        [--compensate none]

on NAME (`real-smollm2` or a synthetic shape; the synthetic ones carry a byte-level tokenizer of the
model's vocabulary size) with the built-in calibration text, once with the default `o_proj`
compensation and once without (`--calibrated-variants`). The conversion's default `--check`
(both models scored on the built-in sample) is part of it. The time is split as the conversion itself reports it on its
`time:` line: calibration (the forward passes and moments), the write pass, and the fits inside
it (summed over the threads that ran them). Peak RSS and CPU come from wait4(2), as for the other
workloads.

Beside them, one forward pass of the original model over the same calibration tokens and windows
(`surgery-dev bench-forward`, the same number of runs): its layers (what calibration runs) and the
output head apart, so the calibration's cost is stated in forward passes both ways.
"""

import json

import re
import statistics

SPEC = ["--shared-kv", "budget:0.5", "--fit", "act", "--calib-tokens", "8192"]
VARIANTS = [("o_proj", []), ("none", ["--compensate", "none"])]
TIME_LINE = re.compile(r"^time: (.*)$", re.M)


def split(stderr):
    """The seconds of the conversion's `time:` line, by part, and of its check line."""
    m = TIME_LINE.search(stderr)
    if not m:
        raise SystemExit(f"bench: no time line in the conversion's output:\n{stderr[-2000:]}")
    parts = {}
    for key, label in [("calibration", "calibration"), ("fits", "fits"), ("write", "write pass")]:
        hit = re.search(rf"{label} ([0-9.]+)s", m.group(1))
        parts[key] = float(hit.group(1)) if hit else 0.0
    check = re.search(r"\(checked in ([0-9.]+)s\)", stderr)
    parts["check"] = float(check.group(1)) if check else 0.0
    return parts


def forward(src, args, repeat, runner, dev):
    """Median seconds of one forward pass over the calibration tokens: layers, head."""
    cmd = [str(dev), "bench-forward", "--in", str(src), "--out", "/nonexistent", *SPEC]
    r = repeat(runner, "forward pass (layers, then head)", cmd, args.runs)
    parsed = [json.loads(s) for s in r["stdouts"]]
    return {
        "layers": statistics.median(p["forward_seconds"] for p in parsed),
        "head": statistics.median(p["head_seconds"] for p in parsed),
        "positions": parsed[0]["positions"],
    }


def bench(name, src, args, repeat, runner, exe, out, clear, dev=None):
    """Runs both variants on `src` (and the forward pass, given `dev`); returns their medians with
    the time split."""
    rows = {}
    for label, extra in [v for v in VARIANTS if v[0] in args.calibrated_variants.split(",")]:
        cmd = [str(exe), "--in", str(src), "--out", str(out), *SPEC, *extra]
        r = repeat(runner, f"calibrated, compensate {label}", cmd, args.runs, before=clear)
        splits = [split(e) for e in r.pop("stderrs")]
        for key in ("calibration", "fits", "write", "check"):
            r[key] = statistics.median(s[key] for s in splits)
        rows[label] = r
    clear()
    result = {"input": str(src), "rows": rows}
    if dev is not None:
        result["forward"] = forward(src, args, repeat, runner, dev)
    return result


def markdown(results, fmt_bytes):
    lines = [
        "Calibrated conversions: `surgery-convert --shared-kv budget:0.5 --fit act --calib-tokens 8192`"
        " (built-in calibration text, 512-token windows), with the default `--compensate o_proj` and with"
        " `--compensate none`. Calibration is the forward passes and moments; the fits run inside the"
        " write pass (their seconds summed over threads).",
        "",
        "| workload | compensate | wall s | calibration s | write pass s | fits s (thread-s) | check s | CPU s | peak RSS MiB | calibration / forward (layers; with head) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, res in results.items():
        f = res.get("forward")
        for label, r in res["rows"].items():
            ratio = ""
            if f:
                ratio = f"{r['calibration'] / f['layers']:.2f}x; {r['calibration'] / (f['layers'] + f['head']):.2f}x"
            lines.append(
                f"| {name} ({fmt_bytes(res['input_bytes'])} GB) | {label} | {r['wall']:.1f} | {r['calibration']:.1f}"
                f" | {r['write']:.1f} | {r['fits']:.1f} | {r['check']:.1f} | {r['cpu']:.1f} | {r['maxrss_kib'] / 1024:.0f} | {ratio} |"
            )
        if f:
            notes.append(
                f"- {name}: one forward pass over the same {f['positions']} positions (`surgery-dev bench-forward`,"
                f" median): layers {f['layers']:.1f} s, output head {f['head']:.1f} s."
            )
    return "\n".join(lines + [""] + notes) + "\n"
