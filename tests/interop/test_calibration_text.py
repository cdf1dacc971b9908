"""The built-in calibration text as each real model reads it: its question/answer pairs written
through the model's chat template exactly as transformers' `apply_chat_template(messages,
tokenize=False)` writes them (SmolLM2-Instruct carries one), less a leading BOS string, or as two
paragraphs where the tokenizer has no template (the pretrained Gemma 3); pieces joined by a blank
line. The calibration record's SHA-256 (of the text tokenized) must be that text's."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import common

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "builtin" / "calibration.jsonl"


def built_in_text(model_dir: Path) -> tuple[str, str]:
    """The built-in calibration text for the tokenizer in `model_dir`, and how its dialogue was
    written."""
    tok = common.tokenizer(str(model_dir))
    template = tok.chat_template
    parts = []
    for line in CALIBRATION.read_text(encoding="utf-8").splitlines():
        piece = json.loads(line)
        if "text" in piece:
            parts.append(piece["text"])
        elif template:
            text = tok.apply_chat_template(piece["messages"], tokenize=False)
            bos = tok.bos_token or ""
            parts.append(text[len(bos):] if bos and text.startswith(bos) else text)
        else:
            parts.append("\n\n".join(m["content"] for m in piece["messages"]))
    return "\n\n".join(parts), "chat template" if template else "plain text"


def calibration_record(surgery_bin: Path, model: Path, work: Path) -> dict:
    """The calibration record of a dry run calibrated on the first 64 tokens of the built-in text."""
    run = subprocess.run(
        [str(surgery_bin), "--in", str(model), "--out", str(work / "unused"), "--shared-kv", "rank:8",
         "--fit", "act", "--calib-tokens", "64", "--dry-run", "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(run.stdout)["options"]["calibration"]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_builtin_dialogue_is_written_as_transformers_writes_it(which, surgery_bin, original, gemma3, work):
    model = original if which == "smollm2" else gemma3
    text, dialogue = built_in_text(model)
    record = calibration_record(surgery_bin, model, work)
    assert record["file"] == "built-in:calibration"
    assert record["dialogue"] == dialogue
    assert dialogue == ("chat template" if which == "smollm2" else "plain text")
    assert record["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    if which == "smollm2":
        assert "<|im_start|>assistant\n" in text
    common.record(runtime="surgery-convert", model=which, figure="built-in calibration dialogue",
                  value=dialogue)
