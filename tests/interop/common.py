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
def tokenizer(model_dir: str, trust_remote_code: bool = False):
    # A factored output's config names custom code: without trust_remote_code, AutoTokenizer asks
    # (on a terminal) whether to run it before falling back to the plain tokenizer.
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=2)
def text_ids(model_dir: str, text_path: str) -> tuple[int, ...]:
    text = Path(text_path).read_text(encoding="utf-8")
    return tuple(tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"])


def load_checked(model_dir: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                 attn_implementation: str | None = None):
    """Loads a checkpoint (uncached), failing on any missing, unexpected or mismatched key."""
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **extra
    )
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    assert not problems, f"{model_dir} does not load cleanly: {problems}"
    return model.eval()


@lru_cache(maxsize=1)
def load(model_dir: str):
    """A standard checkpoint in float32, checked by load_checked; the last one is kept."""
    return load_checked(model_dir)


@lru_cache(maxsize=1)
def load_remote(model_dir: str):
    """A checkpoint that ships its own modeling code (--emit factored), trust_remote_code=True,
    float32, checked by load_checked; kept apart from load's cache."""
    return load_checked(model_dir, trust_remote_code=True)


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


@lru_cache(maxsize=1)
def load_eager(model_dir: str):
    """A standard checkpoint in float32 with eager attention (the reference implementation, sliding
    windows included), checked by load_checked; the last one is kept, apart from load's cache."""
    return load_checked(model_dir, attn_implementation="eager")


def perplexity_bos(model_dir: str, text_path: str, text_tokens: int, ctx: int) -> float:
    """Perplexity by the convention of a model whose tokenizer adds a BOS (`surgery-convert eval`'s
    for such a model): the text's first windows * (ctx - 1) tokens (tokenized without special
    tokens; windows = text_tokens // (ctx - 1)) in chunks of ctx - 1, each window [BOS] + chunk,
    every text token scored (the first one predicted from the BOS): windows * (ctx - 1)
    predictions. Float32, eager attention, no cache."""
    tok = tokenizer(model_dir)
    bos = tok.bos_token_id
    assert bos is not None, f"{model_dir}: the tokenizer has no BOS"
    assert tok("x").input_ids[0] == bos, f"{model_dir}: the tokenizer does not add its BOS ({bos})"
    n = text_tokens // (ctx - 1)
    ids = text_ids(model_dir, text_path)[: n * (ctx - 1)]
    assert n > 0 and len(ids) == n * (ctx - 1), f"{text_path}: fewer than {max(n, 1) * (ctx - 1)} tokens"
    model = load_eager(model_dir)
    chunks = torch.tensor(ids, dtype=torch.long).view(n, ctx - 1)
    nll = 0.0
    with torch.inference_mode():
        for chunk in chunks:
            window = torch.cat([torch.tensor([bos], dtype=torch.long), chunk])[None]
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, chunk[:, None])
            nll -= float(logp.double().sum())
    return math.exp(nll / (n * (ctx - 1)))


def logit_ids(model_dir: str, text_path: str) -> torch.Tensor:
    """The logit batch's token ids, [LOGIT_BATCH]."""
    b, t = LOGIT_BATCH
    return torch.tensor(text_ids(model_dir, text_path)[LOGIT_OFFSET : LOGIT_OFFSET + b * t]).view(b, t)


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one forward without cache, in the model's dtype."""
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def logits(model_dir: str, text_path: str) -> torch.Tensor:
    return forward_logits(load(model_dir), logit_ids(model_dir, text_path)).float()


def prompt_ids(model_dir: str, remote: bool = False):
    """PROMPT in the chat template, tokenized (input_ids and attention_mask)."""
    tok = tokenizer(model_dir, remote)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False, return_tensors="pt")


def generate(model_dir: str, use_cache: bool = True, remote: bool = False) -> list[int]:
    """NEW_TOKENS greedy tokens after the chat-templated PROMPT (remote: load with load_remote)."""
    model = load_remote(model_dir) if remote else load(model_dir)
    tok = tokenizer(model_dir, remote)
    enc = prompt_ids(model_dir, remote)
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            use_cache=use_cache, pad_token_id=tok.pad_token_id,
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()
