"""scripts/bench's `eval` workload: `surgery-convert eval` against transformers on the same model,
text, tokens and threads, runs interleaved (one of each, then again) so drift of the machine's speed
hits both alike.

Model: SmolLM2-135M-Instruct (scripts/fetch-smollm2); text: the WikiText-103 sample
(scripts/fetch-wikitext); 4,096 tokens in 512-token windows, float32, every core. Both print the
same three times: the whole process (`wall`), everything after start-up (`seconds`: loading,
tokenizing, forward; for Python, after its imports) and the forward pass with scoring alone.
"""

import json
import os
import statistics
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENS = 4096
CTX = 512


def inputs():
    model = subprocess.run([str(HERE / "fetch-smollm2")], capture_output=True, text=True, check=True).stdout
    text = subprocess.run([str(HERE / "fetch-wikitext")], capture_output=True, text=True, check=True).stdout
    return Path(model.strip().splitlines()[-1]), Path(text.strip().splitlines()[-1])


def bench(args, runner, exe, py, log):
    model, text = inputs()
    threads = str(os.cpu_count())
    window = ["--tokens", str(TOKENS), "--ctx", str(CTX)]
    commands = {"eval": [str(exe), "eval", str(model), "--text", str(text), *window, "--threads", threads]}
    if py:
        commands["transformers"] = [
            str(py), str(HERE / "bench_eval_transformers.py"), str(model), str(text), *window, "--threads", threads
        ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=threads)
    runs = {k: [] for k in commands}
    total = args.runs + (0 if args.no_warmup else 1)
    for i in range(total):
        for label, cmd in commands.items():
            r = runner.measure(cmd, env=env)
            report = json.loads(r.pop("stdout"))
            r.update(seconds=report["seconds"], forward_seconds=report["forward_seconds"],
                     perplexity=report["perplexity"])
            warm = not args.no_warmup and i == 0
            tag = "warm-up" if warm else f"run {i + (1 if args.no_warmup else 0)}"
            log(f"  {label} {tag}: "
                f"{r['wall']:.2f} s, in-process {r['seconds']:.2f} s, forward {r['forward_seconds']:.2f} s, "
                f"ppl {r['perplexity']:.6f}")
            if not warm:
                runs[label].append(r)
    rows = {}
    for label, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "maxrss_kib", "seconds", "forward_seconds")}
        med["perplexity"] = rs[0]["perplexity"]
        med["walls"] = [r["wall"] for r in rs]
        med["seconds_all"] = [r["seconds"] for r in rs]
        rows[label] = med
    return {"model": str(model), "text": str(text), "tokens": TOKENS, "ctx": CTX, "threads": int(threads), "rows": rows}


def markdown(res):
    rows = res["rows"]
    lines = [
        f"| `eval` workload: {Path(res['model']).name}, {res['tokens']:,} tokens in {res['ctx']}-token windows, "
        f"{res['threads']} threads | wall s (process) | after start-up s | forward + scoring s | CPU s | peak RSS MiB "
        f"| perplexity | transformers ÷ this (after start-up / forward) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"eval": "surgery-convert `eval`", "transformers": "transformers (sdpa, float32)"}
    base = rows.get("transformers")
    for label, r in rows.items():
        ratio = ""
        if base and label == "eval":
            ratio = f"{base['seconds'] / r['seconds']:.2f}x / {base['forward_seconds'] / r['forward_seconds']:.2f}x"
        lines.append(
            f"| {names[label]} | {r['wall']:.2f} | {r['seconds']:.2f} | {r['forward_seconds']:.2f} | {r['cpu']:.1f} "
            f"| {r['maxrss_kib'] / 1024:.0f} | {r['perplexity']:.6f} | {ratio} |"
        )
    if base:
        rel = rows["eval"]["perplexity"] / base["perplexity"] - 1
        lines.append(f"| perplexity, `eval` vs transformers | {rel:+.1e} relative | | | | | | |")
    return "\n".join(lines) + "\n"
