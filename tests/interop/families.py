"""Tiny random models of the families other than Llama, written by transformers itself
(`from_config`, fixed seed) with SmolLM2's tokenizer (which llama.cpp's converter knows), and the
surgery-convert outputs the family tests compare. Dimensions exercise what differs from Llama:

* qwen2: q/k/v biases (random, not transformers' zeros), sliding window of 48 tokens on the layers
  from max_window_layers on (shorter than the 512-token test windows), tied embeddings;
* qwen3: head_dim 32 with hidden 64 and 4 heads (q_proj [128, 64], more rows than columns),
  q_norm/k_norm weights random, sliding layers as qwen2, untied head;
* gemma2: head_dim 32, query_pre_attn_scalar 24, attention and final logit soft-capping (the
  weights are large enough for both to bite), sliding window of 48 on alternating layers, four
  random (1 + w) norms per layer, tied embeddings scaled by sqrt(hidden);
* gemma3: as gemma2 without soft-capping, plus random q_norm/k_norm and a RoPE per layer type
  (sliding layers theta 10000, full layers theta 1e6 with linear scaling 2);
* phi3: q/k/v stored fused in qkv_proj and gate/up in gate_up_proj (split and fused back by the
  tool), partial rotary (partial_rotary_factor 0.5: 8 of each head's 16 values rotated; head_dim
  stays hidden / heads, from which llama.cpp's converter derives the rotated dimension), a sliding
  window of 48 on every layer, untied head;
* phi3-longrope: as phi3 with longrope RoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): pre-training length
  256, so the 512-token test windows take the long factors, attention factor sqrt(1 + ln 8 / ln 256)
  from max_position_embeddings 2048; tied embeddings.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=49152, max_position_embeddings=2048, initializer_range=0.1, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, use_sliding_window=True, sliding_window=48,
    max_window_layers=2,
)
GEMMA = dict(
    {k: v for k, v in COMMON.items() if k not in ("use_sliding_window", "max_window_layers")},
    head_dim=32, query_pre_attn_scalar=24, initializer_range=0.3,
    # Full layers first in each pair, so a latent shared by two layers (--share-layers 2) is never
    # read by a full layer from a sliding source (refused: that source's cache keeps its window only).
    layer_types=["full_attention", "sliding_attention"] * 2,
)
FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)),
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(
        **GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**GEMMA, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(
        **{k: v for k, v in COMMON.items() if k not in ("use_sliding_window", "max_window_layers")},
        partial_rotary_factor=0.5, original_max_position_embeddings=2048, tie_word_embeddings=False)),
    "phi3-longrope": (Phi3ForCausalLM, lambda: Phi3Config(
        **{k: v for k, v in COMMON.items() if k not in ("use_sliding_window", "max_window_layers")},
        partial_rotary_factor=0.5, original_max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [2.0, 3.0, 5.0, 8.0]})),
}
# The families whose llama.cpp converter needs a SentencePiece vocabulary (see sentencepiece_vocab).
SENTENCEPIECE = ("qwen2", "gemma2", "gemma3")
# llama.cpp's Phi-3 converter reads a SentencePiece vocabulary but then writes tokenizer.json's
# added tokens over its ids (SmolLM2's 17 specials land on the byte pieces, newline among them);
# with `tokenizer_class: GPT2Tokenizer` (Phi-4's way) it reads tokenizer.json's BPE, which it knows.
GPT2_TOKENIZER = ("phi3", "phi3-longrope")

# Output name -> surgery-convert options, per family. "full" must reproduce the original.
FULL = ["--shared-kv", "1.0", "--q", "1.0"]
CONVERSIONS: dict[str, list[str]] = {
    "full": FULL,
    "kv05": ["--shared-kv", "0.5", "--q", "0.9"],
    "rank": ["--shared-kv", "rank:12", "--q", "rank:24", "--fit", "svd"],
    "rank-factored": ["--shared-kv", "rank:12", "--q", "rank:24", "--fit", "svd", "--emit", "factored"],
    "act": ["--shared-kv", "budget:0.25", "--fit", "act"],
    "latent-factored": ["--shared-kv", "rank:12", "--fit", "act", "--share-layers", "2", "--share", "latent",
                        "--emit", "factored"],
}
FACTORED_TWIN = {"rank-factored": "rank"}


def write_original(family: str, tokenizer_dir: Path, out: Path) -> Path:
    """The family's tiny model in float32, biases and norm weights randomised, with the tokenizer."""
    cls, config = FAMILIES[family]
    torch.manual_seed(SEED)
    model = cls(config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                # Gemma's norms scale by 1 + w (stored near 0), the others by w (stored near 1).
                offset = 1.0 if name.endswith("norm.weight") and not family.startswith("gemma") else 0.0
                p.copy_(torch.randn_like(p) * 0.3 + offset)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    if family in SENTENCEPIECE:
        sentencepiece_vocab(out)
    if family in GPT2_TOKENIZER:
        import json

        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "GPT2Tokenizer"
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def sentencepiece_vocab(out: Path) -> None:
    """llama.cpp's Gemma converters need a SentencePiece `tokenizer.model`, and its Qwen2 converter
    hashes the tokenizer transformers loads, which for model_type qwen2 is its own Qwen2Tokenizer
    (not tokenizer.json's pre-tokenizer), whose hash on SmolLM2's vocabulary it does not know; it
    takes a `tokenizer.model` first. So these models also carry a tiny SentencePiece vocabulary (trained here, deterministically, on
    the end of the wiki text, away from the evaluated start), and tokenizer_config.json drops
    added_tokens_decoder (whose ids would overwrite that vocabulary's byte pieces; tokenizer.json
    still lists the special tokens)."""
    import io
    import json
    import os

    import sentencepiece as spm

    text = Path(os.environ["WIKI_TEXT"]).read_text(encoding="utf-8")
    lines = [line for line in text[-400_000:].splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1000, model_type="bpe",
        num_threads=1, character_coverage=1.0, byte_fallback=True, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def convert(surgery_bin: Path, source: Path, out: Path, options: list[str]) -> Path:
    """One conversion (fit act calibrates on the built-in text, never on the evaluated wiki text)."""
    subprocess.run(
        [str(surgery_bin), "--in", str(source), "--out", str(out), "--force", "--quiet", *options],
        check=True,
    )
    return out


def expand(surgery_bin: Path, source: Path, out: Path) -> Path:
    subprocess.run([str(surgery_bin), "expand", str(source), "--out", str(out), "--force", "--quiet"], check=True)
    return out


def stock_with_products(family: str, factored_dir: Path, original_dir: Path):
    """A stock float64 model of the family whose attention projections are the factored
    checkpoint's products b @ a (biases on the up-projections moved back): what the factored module
    must compute (without cross-layer latent sharing)."""
    from safetensors.torch import load_file

    cls, _ = FAMILIES[family]
    stock = cls.from_pretrained(original_dir, dtype=torch.float64).eval()
    tensors = {}
    for f in sorted(factored_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    state = stock.state_dict()
    for layer in range(stock.config.num_hidden_layers):
        p = f"model.layers.{layer}.self_attn."
        get = lambda n: tensors[p + n].to(torch.float64)  # noqa: E731
        weights = {}
        if p + "kv_a_proj.weight" in tensors:
            for x in ("k", "v"):
                weights[x] = get(f"{x}_b_proj.weight") @ get("kv_a_proj.weight")
        for x in ("q", "k", "v"):
            if p + f"{x}_a_proj.weight" in tensors:
                weights[x] = get(f"{x}_b_proj.weight") @ get(f"{x}_a_proj.weight")
            elif p + f"{x}_proj.weight" in tensors:
                weights[x] = get(f"{x}_proj.weight")
            if p + f"{x}_b_proj.bias" in tensors:
                state[p + f"{x}_proj.bias"] = get(f"{x}_b_proj.bias")
        if p + "qkv_proj.weight" in state:
            # Phi-3 keeps q, k and v fused, in that order.
            state[p + "qkv_proj.weight"] = torch.cat([weights["q"], weights["k"], weights["v"]])
        else:
            state.update({p + f"{x}_proj.weight": w for x, w in weights.items()})
    stock.load_state_dict(state)
    return stock
