"""`surgery-convert eval`, the tool's own forward pass, against transformers on the real SmolLM2: the
same perplexity (common.perplexity's convention: EVAL_TOKENS tokens, WINDOW-token windows, no BOS)
within 0.5% for the original and a compressed output, both timed in this run from a cold start
(loading and tokenizing included); a factored output scores like its dense twin."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

import common

RTOL = 0.005  # required agreement with transformers (measured: about 1e-5)
FACTORED_RTOL = 1e-4  # factored vs dense twin, both in surgery-convert (float32 factors)


def rust_eval(surgery_bin: Path, model: Path, text: Path) -> dict:
    out = subprocess.run(
        [str(surgery_bin), "eval", str(model), "--text", str(text),
         "--tokens", str(common.EVAL_TOKENS), "--ctx", str(common.WINDOW)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def transformers_timed(model: Path, text: Path) -> tuple[float, float]:
    """common.perplexity from a cold start (model load and tokenization included), and its seconds."""
    common.load.cache_clear()
    common.text_ids.cache_clear()
    common.tokenizer.cache_clear()
    start = time.perf_counter()
    ppl = common.perplexity(str(model), str(text))
    return ppl, time.perf_counter() - start


@pytest.mark.parametrize("name", ["original", "kv03"])
def test_eval_matches_transformers(name, surgery_bin, original, outputs, wiki_text):
    model = original if name == "original" else outputs[name]
    report = rust_eval(surgery_bin, model, wiki_text)
    ppl, seconds = transformers_timed(model, wiki_text)
    assert report["text_sha256"] == hashlib.sha256(wiki_text.read_bytes()).hexdigest()
    assert report["windows"] == common.EVAL_TOKENS // common.WINDOW
    assert report["tokens"] == report["windows"] * (common.WINDOW - 1)
    assert math.isclose(report["perplexity"], math.exp(report["nll_mean"]), rel_tol=1e-12)
    rel = report["perplexity"] / ppl - 1
    common.record(runtime="surgery-convert eval", model=name, perplexity=report["perplexity"],
                  tokens=common.EVAL_TOKENS, seconds=report["seconds"], threads=report["threads"])
    for figure, value in [
        ("eval: transformers perplexity", ppl),
        ("eval: perplexity rel. diff vs transformers", rel),
        ("eval: seconds, surgery-convert eval", report["seconds"]),
        (f"eval: seconds, transformers ({torch.get_num_threads()} threads)", seconds),
    ]:
        common.record(runtime="surgery-convert eval", model=name, figure=figure, value=value)
    assert abs(rel) < RTOL, f"{name}: surgery-convert {report['perplexity']} vs transformers {ppl}"


def test_eval_of_factored_output_matches_its_dense_twin(surgery_bin, factored_outputs, wiki_text):
    dense = rust_eval(surgery_bin, factored_outputs["kv03"], wiki_text)
    factored = rust_eval(surgery_bin, factored_outputs["kv03-factored"], wiki_text)
    rel = factored["perplexity"] / dense["perplexity"] - 1
    common.record(runtime="surgery-convert eval", model="kv03-factored", perplexity=factored["perplexity"],
                  tokens=common.EVAL_TOKENS, seconds=factored["seconds"], threads=factored["threads"])
    assert abs(rel) < FACTORED_RTOL, f"factored {factored['perplexity']} vs dense {dense['perplexity']}"


def builtin_eval(surgery_bin: Path, model: Path) -> dict:
    """`eval MODEL` without --text: the built-in held-out sample, 1,024 tokens."""
    out = subprocess.run([str(surgery_bin), "eval", str(model)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_quality_check_figures_equal_eval(surgery_bin, original, tmp_path):
    """The check a conversion prints scores the input and the output on the tokens `eval` scores
    without --text: the same forward pass, so the same figures to the last bit."""
    out = tmp_path / "kv03-checked"
    run = subprocess.run(
        [str(surgery_bin), "--in", str(original), "--out", str(out), "--shared-kv", "0.3", "--check"],
        check=True, capture_output=True, text=True,
    )
    check = json.loads((out / "surgery.json").read_text())["check"]
    before, after = builtin_eval(surgery_bin, original), builtin_eval(surgery_bin, out)
    assert check["text"] == before["text"] == "built-in:check"
    assert check["tokens"] == before["tokens"] == 2 * 511
    assert check["input_perplexity"] == before["perplexity"]
    assert check["output_perplexity"] == after["perplexity"]
    line = next(l for l in run.stderr.splitlines() if l.startswith("perplexity on the built-in sample"))
    assert "the model is broken; try --fit act" in line, line
    seconds = float(line.rsplit("(checked in ", 1)[1].rstrip("s)"))
    for figure, value in [
        ("check: input perplexity (built-in sample)", check["input_perplexity"]),
        ("check: output perplexity", check["output_perplexity"]),
        ("check: seconds", seconds),
    ]:
        common.record(runtime="surgery-convert --check", model="kv03", figure=figure, value=value)
