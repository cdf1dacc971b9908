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
"""

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


def bench(name, src, args, repeat, runner, exe, out, clear):
    """Runs both variants on `src`; returns their medians with the time split."""
    rows = {}
    for label, extra in [v for v in VARIANTS if v[0] in args.calibrated_variants.split(",")]:
        cmd = [str(exe), "--in", str(src), "--out", str(out), *SPEC, *extra]
        r = repeat(runner, f"calibrated, compensate {label}", cmd, args.runs, before=clear)
        splits = [split(e) for e in r.pop("stderrs")]
        for key in ("calibration", "fits", "write", "check"):
            r[key] = statistics.median(s[key] for s in splits)
        rows[label] = r
    clear()
    return {"input": str(src), "rows": rows}


def markdown(results, fmt_bytes):
    lines = [
        "Calibrated conversions: `surgery-convert --shared-kv budget:0.5 --fit act --calib-tokens 8192`"
        " (built-in calibration text, 512-token windows), with the default `--compensate o_proj` and with"
        " `--compensate none`. Calibration is the forward passes and moments; the fits run inside the"
        " write pass (their seconds summed over threads).",
        "",
        "| workload | compensate | wall s | calibration s | write pass s | fits s (thread-s) | check s | CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        for label, r in res["rows"].items():
            lines.append(
                f"| {name} ({fmt_bytes(res['input_bytes'])} GB) | {label} | {r['wall']:.1f} | {r['calibration']:.1f}"
                f" | {r['write']:.1f} | {r['fits']:.1f} | {r['check']:.1f} | {r['cpu']:.1f} | {r['maxrss_kib'] / 1024:.0f} |"
            )
    return "\n".join(lines) + "\n"
