"""llama.cpp: its own converter (convert_hf_to_gguf.py) turns the original, a full-rank output and a
compressed output into GGUF; llama-perplexity gives the full-rank output the original's perplexity,
and the compressed output loads and generates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common

CHUNKS = 8  # 8 non-overlapping 512-token windows (llama.cpp scores the second half of each)
THREADS = "2"


def llama_bin(name: str) -> str:
    path = Path(os.environ["LLAMA_CPP_BIN"]) / name
    assert path.is_file(), f"{path} missing: run scripts/build-llama-cpp"
    return str(path)




_ggufs: dict[Path, Path] = {}


def to_gguf(name: str, model_dir: Path, work: Path) -> Path:
    """Converts with llama.cpp's own converter (vendored gguf-py on PYTHONPATH); one GGUF per model folder.

    The cache is keyed by the folder, not the name: two modules may use the same name for different
    models (the tiny random "gemma3-original" of test_families and the real one of test_gemma3)."""
    key = model_dir.resolve()
    if key not in _ggufs:
        out = work / f"{name}-{len(_ggufs)}.gguf"
        env = dict(os.environ, PYTHONPATH=os.environ["LLAMA_CPP_GGUF_PY"])
        subprocess.run(
            [sys.executable, os.environ["LLAMA_CPP_CONVERT"], str(model_dir), "--outtype", "f32", "--outfile", str(out)],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _ggufs[key] = out
    return _ggufs[key]


def llama_perplexity(gguf: Path, text: Path) -> float:
    run = subprocess.run(
        [llama_bin("llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "512", "--chunks", str(CHUNKS), "-t", THREADS],
        capture_output=True, text=True, check=True,
    )
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    assert match, f"no perplexity in llama-perplexity output:\n{run.stderr[-2000:]}"
    return float(match.group(1))


def llama_generate(gguf: Path, prompt: str = "The capital of France is", tokens: int = 16) -> str:
    run = subprocess.run(
        [llama_bin("llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(tokens), "--temp", "0", "--seed", "1",
         "-no-cnv", "-t", THREADS],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    )
    return run.stdout


@pytest.fixture(scope="module")
def original_llama_ppl(original, wiki_text, work):
    ppl = llama_perplexity(to_gguf("original", original, work), wiki_text)
    common.record(runtime="llama.cpp", model="original", perplexity=ppl, chunks=CHUNKS)
    return ppl


def test_original_converts_loads_and_answers(original, work, wiki_text, original_llama_ppl):
    # Same tokens, same windows, llama.cpp's scoring (second half of each window) in transformers:
    # the two runtimes must agree, which pins the GGUF conversion of the original.
    reference = common.perplexity(str(original), str(wiki_text), tokens=CHUNKS * 512, first=256)
    common.record(runtime="transformers (llama.cpp scoring)", model="original", perplexity=reference, chunks=CHUNKS)
    assert abs(original_llama_ppl / reference - 1) < 0.005, f"llama.cpp {original_llama_ppl} vs transformers {reference}"
    assert 14 < original_llama_ppl < 21, f"original perplexity {original_llama_ppl} (measured 17.29)"
    text = llama_generate(to_gguf("original", original, work))
    assert "Paris" in text, text


def test_full_rank_output_has_the_original_perplexity(outputs, work, wiki_text, original_llama_ppl):
    ppl = llama_perplexity(to_gguf("kv10-pca", outputs["kv10-pca"], work), wiki_text)
    common.record(runtime="llama.cpp", model="kv10-pca", perplexity=ppl, chunks=CHUNKS)
    assert abs(ppl / original_llama_ppl - 1) < 0.005, f"{ppl} vs original {original_llama_ppl}"


def test_compressed_output_loads_and_generates(outputs, work, wiki_text, original_llama_ppl):
    gguf = to_gguf("kv09-q09-seed", outputs["kv09-q09-seed"], work)
    ppl = llama_perplexity(gguf, wiki_text)
    common.record(runtime="llama.cpp", model="kv09-q09-seed", perplexity=ppl, chunks=CHUNKS)
    assert ppl > original_llama_ppl
    prompt = "The capital of France is"
    text = llama_generate(gguf, prompt)
    assert text.startswith(prompt) and len(text) > len(prompt) + 4, text
