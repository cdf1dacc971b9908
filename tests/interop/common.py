"""Shared measurement code for the interop tests: tokenization of the fixed text slices, perplexity
and logits with transformers, and a cache of loaded models."""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Evaluation slice: the first EVAL_TOKENS tokens of the wiki text, non-overlapping windows, no BOS.
EVAL_TOKENS = 4096
WINDOW = 512
# Logit batch: 2 sequences of 128 tokens taken after the evaluation slice.
LOGIT_OFFSET = 20_000
LOGIT_BATCH = (2, 128)
PROMPT = "What is the capital of France?"
NEW_TOKENS = 64

torch.set_num_threads(max(1, torch.get_num_threads()))


def record(**fields) -> None:
    """Appends a measured figure to INTEROP_WORK/results.jsonl (scripts/interop prints them)."""
    with open(os.path.join(os.environ["INTEROP_WORK"], "results.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(fields) + "\n")


@lru_cache(maxsize=None)
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


@lru_cache(maxsize=2)
def text_ids(model_dir: str, text_path: str) -> tuple[int, ...]:
    text = Path(text_path).read_text(encoding="utf-8")
    return tuple(tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1)
def load(model_dir: str):
    """Loads a checkpoint, failing on any missing, unexpected or mismatched key."""
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    assert not problems, f"{model_dir} does not load cleanly: {problems}"
    return model.eval()


def perplexity(model_dir: str, text_path: str, tokens: int = EVAL_TOKENS, first: int = 0) -> float:
    """Perplexity over non-overlapping WINDOW-token windows, scoring the predictions made from
    position `first` on (0: every position; WINDOW // 2: llama-perplexity's scoring)."""
    model = load(model_dir)
    ids = text_ids(model_dir, text_path)[:tokens]
    n = len(ids) // WINDOW
    x = torch.tensor(ids[: n * WINDOW], dtype=torch.long).view(n, WINDOW)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n):
            w = x[i : i + 1]
            logits = model(input_ids=w, use_cache=False).logits[0, first:-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[0, first + 1 :], reduction="sum"))
            count += WINDOW - 1 - first
    return math.exp(nll / count)


def logits(model_dir: str, text_path: str) -> torch.Tensor:
    model = load(model_dir)
    b, t = LOGIT_BATCH
    ids = text_ids(model_dir, text_path)[LOGIT_OFFSET : LOGIT_OFFSET + b * t]
    with torch.inference_mode():
        return model(input_ids=torch.tensor(ids).view(b, t), use_cache=False).logits.float()


def generate(model_dir: str, use_cache: bool = True) -> list[int]:
    model = load(model_dir)
    tok = tokenizer(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            use_cache=use_cache, pad_token_id=tok.pad_token_id,
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()
