"""Cross-layer sharing (--share-layers) on the real SmolLM2, in transformers and llama.cpp:

- a shared latent (--share latent --emit factored, format version 2) loads cleanly through its
  module; in float64 its logits equal an independent plain-torch forward of the format (layer l's
  K/V from its group's first-layer latent) within 1e-6 relative; the Rust forward pass (float32,
  `surgery-dev logits`) gives the module's float64 logits within a small multiple of the module's
  own float32 error; greedy generation is token-identical with and without the cache, which holds
  exactly one latent (r_g values per token) per group;
- a shared basis written dense (--share basis) is a standard Llama checkpoint: it loads in
  transformers with exactly the expected keys and in llama.cpp, and all three runtimes score it
  alike."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import common
from conftest import convert
from test_llama_cpp import CHUNKS, llama_perplexity, to_gguf

# Calibrated at half the K/V cache on the built-in calibration text (not the evaluation text).
LATENT = ["--shared-kv", "budget:0.5", "--fit", "act", "--calib-tokens", "2048",
          "--share-layers", "2", "--no-check"]
EXACT_F64 = 1e-6  # module vs plain-torch reference, float64 (relative to max |logit|)
F32_ERROR_RATIO = 4.0  # Rust (float32) error may exceed the module's own float32 error by this
RTOL = 0.005  # perplexity agreement between runtimes (as test_eval)


@pytest.fixture(scope="session")
def shared(surgery_bin, original, work) -> dict[str, Path]:
    out = {"latent": work / "latent2-factored", "basis": work / "basis2-dense"}
    convert(surgery_bin, original, out["latent"], [*LATENT, "--emit", "factored"])
    convert(surgery_bin, original, out["basis"], [*LATENT, "--share", "basis"])
    return out


def fig(model: str, figure: str, value) -> None:
    common.record(runtime="transformers", model=model, figure=figure, value=value)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def module_logits(model_dir: Path, ids: torch.Tensor, dtype) -> torch.Tensor:
    model = common.load_checked(str(model_dir), dtype=dtype, trust_remote_code=True)
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def rms(x, w, eps):
    x32 = x.to(torch.float32)  # as LlamaRMSNorm
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The format's algorithm in plain torch ops on the loaded model's tensors: every layer of a
    group takes its K and V from the latent of the group's first layer's attention input."""
    cfg, w = model.config, model.state_dict()
    la = cfg.latent_attention
    source = {l: g[0] for g in la["kv_groups"] for l in g}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", cfg.hidden_size // heads)
    b, t = ids.shape
    h = w["model.embed_tokens.weight"][ids]
    cos, sin = model.model.rotary_emb(h, torch.arange(t)[None])
    cos, sin = cos[:, None], sin[:, None]
    causal = torch.full((t, t), float("-inf"), dtype=h.dtype).triu(1)
    latent = None
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}.self_attn."
        x = rms(h, w[f"model.layers.{l}.input_layernorm.weight"], cfg.rms_norm_eps)
        if source[l] == l:
            latent = x @ w[p + "kv_a_proj.weight"].T
        q = (x @ w[p + "q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
        k = (latent @ w[p + "k_b_proj.weight"].T).view(b, t, kv_heads, hd).transpose(1, 2)
        v = (latent @ w[p + "v_b_proj.weight"].T).view(b, t, kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(b, t, -1) @ w[p + "o_proj.weight"].T
        x = rms(h, w[f"model.layers.{l}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        m = f"model.layers.{l}.mlp."
        gate = torch.nn.functional.silu(x @ w[m + "gate_proj.weight"].T)
        h = h + (gate * (x @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(h, w["model.norm.weight"], cfg.rms_norm_eps) @ head.T


def rust_logits(model_dir: Path, ids: list[int], tmp_path: Path) -> torch.Tensor:
    out = tmp_path / "logits.safetensors"
    subprocess.run([os.environ["SURGERY_DEV_BIN"], "logits", str(model_dir), "--ids", ",".join(map(str, ids)),
                    "--out", str(out)], check=True)
    return load_file(str(out))["logits"]


def test_latent_config_and_loading(shared):
    la = json.loads((shared["latent"] / "config.json").read_text())["latent_attention"]
    assert (la["format_version"], la["kv_share"]) == (2, "latent")
    assert la["kv_groups"] == [[l, l + 1] for l in range(0, 30, 2)]
    common.load_checked(str(shared["latent"]), trust_remote_code=True)


def test_latent_logits_module_reference_and_rust(shared, wiki_text, tmp_path):
    ids = common.logit_ids(str(shared["latent"]), str(wiki_text))[0].tolist()
    x = torch.tensor([ids])
    f64 = module_logits(shared["latent"], x, torch.float64)
    model = common.load_checked(str(shared["latent"]), dtype=torch.float64, trust_remote_code=True)
    with torch.inference_mode():
        reference = reference_logits(model, x)
    exact = rel(f64, reference)
    f32 = module_logits(shared["latent"], x, torch.float32)
    own = rel(f32, f64)
    rust = rel(rust_logits(shared["latent"], ids, tmp_path)[None], f64)
    for figure, value in [("latent: module f64 vs reference (rel)", exact),
                          ("latent: module f32 vs f64 (rel)", own),
                          ("latent: Rust f32 vs module f64 (rel)", rust)]:
        fig("latent2-factored", figure, value)
    assert exact < EXACT_F64
    assert rust <= F32_ERROR_RATIO * max(own, 1e-7), f"Rust {rust} vs the module's own float32 error {own}"


def test_latent_generation_and_cache(shared):
    d = str(shared["latent"])
    with_cache = common.generate(d, use_cache=True, remote=True)
    assert with_cache == common.generate(d, use_cache=False, remote=True)
    model = common.load_checked(d, trust_remote_code=True)
    la = model.config.latent_attention
    prompt = common.prompt_ids(d, remote=True)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(**prompt, cache=cache, use_cache=True)
    tokens = prompt["input_ids"].shape[1]
    widths = [layer.keys.shape[-1] + layer.values.shape[-1] for layer in cache.layers]
    per_group = [la["kv_rank"][g[0]] for g in la["kv_groups"]]
    assert sum(widths) == sum(per_group)
    assert all(layer.keys.shape[-2] == tokens for layer in cache.layers)
    report = json.loads((shared["latent"] / "surgery.json").read_text())
    assert sum(widths) == report["totals"]["kv_cache_values_per_token"]["after"]
    fig("latent2-factored", "latent: cached values per token (all layers)", sum(widths))


def test_basis_dense_runs_in_transformers_llama_cpp_and_eval(shared, surgery_bin, work, wiki_text):
    d = shared["basis"]
    common.load_checked(str(d))
    ppl = common.perplexity(str(d), str(wiki_text))
    out = subprocess.run([str(surgery_bin), "eval", str(d), "--text", str(wiki_text),
                          "--tokens", str(common.EVAL_TOKENS), "--ctx", str(common.WINDOW)],
                         check=True, capture_output=True, text=True)
    rust = json.loads(out.stdout)["perplexity"]
    llama = llama_perplexity(to_gguf("basis2-dense", d, work), wiki_text)
    # llama.cpp's scoring (second half of each window) in transformers, as for the original.
    reference = common.perplexity(str(d), str(wiki_text), tokens=CHUNKS * 512, first=256)
    common.record(runtime="transformers", model="basis2-dense", perplexity=ppl, tokens=common.EVAL_TOKENS)
    common.record(runtime="llama.cpp", model="basis2-dense", perplexity=llama, chunks=CHUNKS)
    assert abs(rust / ppl - 1) < RTOL, f"eval {rust} vs transformers {ppl}"
    assert abs(llama / reference - 1) < RTOL, f"llama.cpp {llama} vs transformers {reference}"
