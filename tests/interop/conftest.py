"""Interop suite: real SmolLM2-135M-Instruct converted by surgery-convert, checked in transformers
and llama.cpp. Driven by scripts/interop, which provides through the environment:

  SURGERY_BIN        the release surgery-convert binary
  SURGERY_DEV_BIN    the release surgery-dev binary (developer tools: the forward pass's logits)
  SMOLLM2_DIR        the checkpoint from scripts/fetch-smollm2
  GEMMA3_DIR         the Gemma 3 270M checkpoint from scripts/fetch-gemma3 (test_gemma3.py)
  WIKI_TEXT          the text from scripts/fetch-wikitext
  LLAMA_CPP_BIN      llama.cpp's bin/ directory (llama-perplexity, llama-simple / llama-cli)
  LLAMA_CPP_CONVERT  llama.cpp's convert_hf_to_gguf.py
  INTEROP_WORK       a scratch directory (outputs are kept there for inspection)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Output name -> surgery-convert options. Full-rank outputs must reproduce the original exactly.
CONFIGS: dict[str, list[str]] = {
    "kv10-pca": ["--shared-kv", "1.0", "--fit", "pca"],
    "kv10-svd": ["--shared-kv", "1.0", "--fit", "svd"],
    "sep10-svd": ["--separate", "1.0", "--fit", "svd"],
    "kv10-pca-resharded": ["--shared-kv", "1.0", "--fit", "pca", "--max-shard-size", "200MB"],
    "kv03": ["--shared-kv", "0.3"],
    "kv09-q09-seed": ["--shared-kv", "0.9", "--q", "0.9", "--fit", "seed"],
}
FULL_RANK = ["kv10-pca", "kv10-svd", "sep10-svd", "kv10-pca-resharded"]
COMPRESSED = ["kv03", "kv09-q09-seed"]

# --emit factored outputs -> the dense output of the same options they are compared with. They load
# only with trust_remote_code=True, so they stay out of CONFIGS (whose tests load every output as a
# plain Llama); see the factored_outputs fixture.
FACTORED: dict[str, str] = {"kv03-factored": "kv03", "kv09-factored": "kv09"}
# Dense twins not in CONFIGS, converted with the factored outputs.
EXTRA_DENSE: dict[str, list[str]] = {"kv09": ["--shared-kv", "0.9"]}
EXPANDED = {"kv03-expanded": "kv03-factored"}  # `surgery-convert expand` output -> its input


def env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the suite through scripts/interop")
    return Path(value)


@pytest.fixture(scope="session")
def surgery_bin() -> Path:
    return env_path("SURGERY_BIN")


@pytest.fixture(scope="session")
def original() -> Path:
    return env_path("SMOLLM2_DIR")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return env_path("GEMMA3_DIR")


@pytest.fixture(scope="session")
def wiki_text() -> Path:
    return env_path("WIKI_TEXT")


@pytest.fixture(scope="session")
def work() -> Path:
    path = env_path("INTEROP_WORK")
    path.mkdir(parents=True, exist_ok=True)
    return path


def convert(surgery_bin: Path, original: Path, out: Path, options: list[str]) -> None:
    subprocess.run(
        [str(surgery_bin), "--in", str(original), "--out", str(out), "--force", "--quiet", *options],
        check=True,
    )


@pytest.fixture(scope="session")
def outputs(surgery_bin: Path, original: Path, work: Path) -> dict[str, Path]:
    """Every configuration converted once per session."""
    result = {}
    for name, options in CONFIGS.items():
        out = work / name
        convert(surgery_bin, original, out, options)
        result[name] = out
    return result


@pytest.fixture(scope="session")
def factored_outputs(surgery_bin: Path, original: Path, work: Path, outputs: dict[str, Path]) -> dict[str, Path]:
    """The FACTORED outputs (each twin's options plus --emit factored), the EXTRA_DENSE twins and
    the EXPANDED outputs, converted once per session; with `outputs`, every twin by name."""
    result = dict(outputs)
    for name, options in EXTRA_DENSE.items():
        convert(surgery_bin, original, work / name, options)
        result[name] = work / name
    dense_options = {**CONFIGS, **EXTRA_DENSE}
    for name, twin in FACTORED.items():
        convert(surgery_bin, original, work / name, [*dense_options[twin], "--emit", "factored"])
        result[name] = work / name
    for name, source in EXPANDED.items():
        subprocess.run([str(surgery_bin), "expand", str(result[source]), "--out", str(work / name), "--force", "--quiet"], check=True)
        result[name] = work / name
    return result
