"""python/modeling_surgery.py's Gemma 2 and Gemma 3 (text) classes on tiny random checkpoints written
here by hand, in float64, with the factoring, checkpoint writing, reference models and checks of
test_families_module.py (which see): every layout of the format (K/V shared, separate, a dense K,
Q only, version-2 basis and latent), a clean load, logits equal to a stock model holding b @ a (for
"latent", the stock model whose later layers' k_proj / v_proj read their group source's input),
greedy generation with and without the cache and with left padding, latent widths in the cache, a
missing attention tensor refused, a full-attention layer reading a sliding source refused.

The dimensions exercise what Gemma adds: head_dim 32 for hidden 64 and 4 heads (q_proj [128, 64]),
query_pre_attn_scalar 24 (not head_dim), sliding-window layers (window shorter than the sequences),
random (1 + w) norm weights, embedding scaling. Gemma 2: attention and final-logit softcapping, with
weights large enough (initializer_range 0.3) that both change the logits. Gemma 3: q_norm / k_norm,
and a rope per layer type (sliding: theta 1e4; full: theta 1e6, linear factor 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_families_module import (
    CASES,
    EXACT,
    GROUPS,
    LAYERS,
    WINDOW,
    case_builder,
    check_cache,
    check_generate,
    check_logits,
    check_missing_refused,
    config_only,
    ids,
    logits,
    one_thread,  # noqa: F401  (autouse fixture: one torch thread)
    rel_diff,
    stock_models,
    v2,
)
from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

SLIDE, FULL = "sliding_attention", "full_attention"
COMMON = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=LAYERS,
    vocab_size=128, intermediate_size=128, max_position_embeddings=256, initializer_range=0.3,
    bos_token_id=1, eos_token_id=None, pad_token_id=0, sliding_window=WINDOW, query_pre_attn_scalar=24,
)
ROPE = {SLIDE: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}
# Group [1, 2] of GROUPS: Gemma 2 a full source with a sliding reader, Gemma 3 a sliding source and reader.
FAMILIES = {
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(
        layer_types=[SLIDE, FULL, SLIDE, FULL], attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        tie_word_embeddings=True)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        layer_types=[FULL, SLIDE, SLIDE, FULL], rope_parameters=ROPE, tie_word_embeddings=False)),
}
PARAMS = [(family, case) for family in FAMILIES for case in CASES]
# Stock Gemma 2 runs eager only, and eager attention computes its softmax in float32: in float64 the
# mask's finfo(float64).min becomes -inf there, so a fully masked query row (a left-padding position)
# is NaN, and the NaN reaches every later position of the sequence through its keys. Left padding is
# therefore checked on float32 copies for Gemma 2 (test_gemma2_left_padding_in_float32).
PADDED_IN_FLOAT64 = {"gemma2": False, "gemma3": True}
FLOAT32 = 1e-5  # relative, float32: b @ (a @ x) against (b @ a) @ x
# Cached decoding against the uncached forward: the float32 softmax also rounds the shorter rows of a
# step differently from the full forward's (stock Gemma 2 itself differs by 1.6e-7 here); against
# the reference decoded alike the factored model is still exact.
DECODE_TOLERANCE = {"gemma2": 1e-6, "gemma3": EXACT}

stock = stock_models(FAMILIES, COMMON, norm_range=(-0.5, 0.5))  # norm weights w of (1 + w)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return case_builder(stock, tmp_path_factory)


@pytest.mark.parametrize("family, case", PARAMS)
def test_logits_match_stock_reference(build, family, case):
    model, reference, _ = build(family, case)
    assert {layer.self_attn.scaling for layer in model.model.layers} == {24**-0.5}
    check_logits(model, reference, padded=PADDED_IN_FLOAT64[family])


@pytest.mark.parametrize("family, case", PARAMS)
def test_generate_cache_left_padding_and_reference(build, family, case):
    check_generate(*build(family, case)[:2], padded=PADDED_IN_FLOAT64[family])


@pytest.mark.parametrize("case", CASES)
def test_gemma2_left_padding_in_float32(build, case):
    model, reference = (copy.deepcopy(m).float() for m in build("gemma2", case)[:2])
    check_logits(model, reference, tolerance=FLOAT32)
    check_generate(model, reference)


@pytest.mark.parametrize("family, case", PARAMS)
def test_cache_holds_latents_and_decodes(build, family, case):
    model, reference, la = build(family, case)
    check_cache(model, la, reference, tolerance=DECODE_TOLERANCE[family])


@pytest.mark.parametrize("family, gone", [("gemma2", "k_b_proj.weight"), ("gemma3", "k_norm.weight")])
def test_missing_attention_tensor_refused(family, gone, tmp_path):
    check_missing_refused(stock(family), tmp_path, gone)


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_gemma2_softcapping_changes_the_logits(key):
    """Without either softcapping the stock model's logits differ (so the logits checks cover it)."""
    base = stock("gemma2")
    assert base.config._attn_implementation == "eager"  # Gemma 2 runs eager: no sdpa
    config = copy.deepcopy(base.config)
    setattr(config, key, None)
    uncapped = type(base)(config).to(torch.float64).eval()
    uncapped.load_state_dict(base.state_dict())
    x = ids()
    assert rel_diff(logits(uncapped, x), logits(base, x)) > 1e-3


def test_gemma3_keys_use_their_layer_types_rope(build):
    """Each attention recomputes its cached keys' cos / sin with its own layer type's rope (and the
    two types' differ)."""
    model, _, _ = build("gemma3", "shared")
    rotary = model.model.rotary_emb
    x, positions = torch.zeros(1, dtype=torch.float64), torch.arange(8)[None]
    per_type = {t: rotary(x, positions, layer_type=t) for t in (SLIDE, FULL)}
    assert not torch.allclose(per_type[SLIDE][0][:, 1:], per_type[FULL][0][:, 1:])
    for layer in model.model.layers:
        attn = layer.self_attn
        cos, sin = attn._model_rotary_emb(x, position_ids=positions)
        assert torch.equal(cos, per_type[attn.layer_type][0]) and torch.equal(sin, per_type[attn.layer_type][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_layer_reading_sliding_source_refused(family, tmp_path):
    types = [FULL, SLIDE, FULL, FULL]  # group [1, 2]: full-attention layer 2 would read sliding layer 1
    path = config_only(tmp_path / "bad", stock(family), v2([4, 5, 5, 6]), types)
    with pytest.raises(ValueError, match="cannot read"):
        AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    good = config_only(tmp_path / "good", stock(family), v2([4, 5, 5, 6]), [FULL, FULL, SLIDE, SLIDE])
    loaded = AutoConfig.from_pretrained(str(good), trust_remote_code=True)
    assert type(loaded).__name__ == f"Surgery{family.capitalize()}Config"
    assert loaded.latent_attention["kv_groups"] == GROUPS and loaded.layer_types == [FULL, FULL, SLIDE, SLIDE]
