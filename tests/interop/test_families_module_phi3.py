"""python/modeling_surgery.py's Phi-3 classes on tiny random checkpoints written here by hand, in
float64, with the checkpoint writing, loading and generation checks of test_families_module.py
(which see): every layout of the format (K/V shared, separate, a dense K beside a factored V and Q,
Q only, version-2 basis and latent), a clean load, logits equal to a stock Phi3ForCausalLM holding
b @ a fused back into its ``qkv_proj`` (for "latent", the stock model whose later layers' K and V rows
read their group source's attention input), greedy generation with and without the cache and with
left padding, latent widths in the cache, a missing attention tensor refused.

What Phi-3 adds: q / k / v fused in ``qkv_proj`` in the dense checkpoint (split here into the separate
tensors surgery-convert writes), the fused ``mlp.gate_up_proj``, partial rotary (factor 0.5: 8 of a
head's 16 values rotate) and a sliding window on every layer (shorter than the sequences). Both are
shown to change the stock model's logits, so the comparisons cover them. A second config uses
longrope with original_max_position_embeddings shorter than the generated sequences (the stock model
switches to the long factors and drops its cache there) and tied embeddings."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_families_module import (
    CASES,
    EXACT,
    GROUPS,
    LAYERS,
    PRE,
    WINDOW,
    Factoring,
    cached_widths,
    check_generate,
    config_only,
    decode,
    ids,
    left_padded,
    load,
    logits,
    one_thread,  # noqa: F401  (autouse fixture: one torch thread)
    rel_diff,
    stock_models,
    v2,
    write_checkpoint,
)
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Phi3Config, Phi3ForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
Q_DIM, KV_DIM = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
ROTARY_DIM = 8  # head_dim * partial_rotary_factor
COMMON = dict(
    hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS,
    vocab_size=128, intermediate_size=96, max_position_embeddings=256, initializer_range=0.1,
    bos_token_id=1, eos_token_id=None, pad_token_id=0, sliding_window=WINDOW, partial_rotary_factor=0.5,
)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 1.7, 2.0], "long_factor": [1.5, 3.0, 6.0, 12.0]}
FAMILIES = {
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(tie_word_embeddings=False)),
    # positions from 10 on use the long factors (and attention_factor scales cos / sin)
    "phi3-longrope": (Phi3Config, Phi3ForCausalLM, dict(
        rope_parameters=LONGROPE, original_max_position_embeddings=10, tie_word_embeddings=True)),
}
PARAMS = [(family, case) for family in FAMILIES for case in CASES]

stock = stock_models(FAMILIES, COMMON)


class Phi3Factoring(Factoring):
    """Factoring of a Phi-3 state dict with each layer's qkv_proj split into q_proj / k_proj / v_proj
    (what surgery-convert writes for a projection it leaves dense)."""

    def __init__(self, model):
        super().__init__(model)
        for layer in range(LAYERS):
            qkv = self.sd.pop(f"{PRE.format(layer)}qkv_proj.weight")
            for p, w in zip("qkv", qkv.split([Q_DIM, KV_DIM, KV_DIM])):
                self.sd[f"{PRE.format(layer)}{p}_proj.weight"] = w.clone()


def factor(model, case: str):
    """(latent_attention, Phi3Factoring) of a case (test_families_module.factor, on the split q/k/v)."""
    version, kv, kv_rank, k_rank, v_rank, q_rank, share = CASES[case]
    f = Phi3Factoring(model)
    if kv == "shared":
        groups = GROUPS if version == 2 else [[layer] for layer in range(LAYERS)]
        ranks = [6, 9, 5] if version == 2 else kv_rank
        for group, rank in zip(groups, ranks):
            f.shared(group, rank)
        kv_rank = [r for group, r in zip(groups, ranks) for _ in group]
    for p, ranks in (("k", k_rank), ("v", v_rank), ("q", q_rank)):
        for layer, rank in enumerate(ranks or ()):
            f.one(layer, p, rank)
    la = {
        "format_version": version, "fit": "svd", "kv": kv, "kv_rank": kv_rank, "q_rank": q_rank,
        "k_rank": k_rank, "v_rank": v_rank, "original_architectures": ["Phi3ForCausalLM"],
        "original_model_type": "phi3",
    }
    if version == 2:
        la.update(kv_share=share, kv_groups=GROUPS)
    return la, f


def feed_from_source(reference, groups):
    """kv_share "latent" in a stock Phi-3: the K and V rows of qkv_proj (= b^(l) @ A_g) of every later
    layer of a group read the group source's attention input instead of their own."""
    inputs = {}
    for group in groups:
        source = reference.model.layers[group[0]].self_attn
        source.register_forward_pre_hook(
            lambda mod, args, kwargs, s=group[0]: inputs.__setitem__(s, kwargs["hidden_states"]), with_kwargs=True
        )
        for layer in group[1:]:
            qkv = reference.model.layers[layer].self_attn.qkv_proj
            qkv.register_forward_hook(
                lambda mod, args, out, s=group[0]: torch.cat(
                    [out[..., :Q_DIM], F.linear(inputs[s], mod.weight[Q_DIM:])], -1
                )
            )


def reference_model(model, case: str, f: Phi3Factoring):
    """The stock Phi-3 with qkv_proj = [q; k; v], each b @ a where factored, else the original rows."""
    reference = type(model)(model.config).to(torch.float64).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in range(LAYERS):
            rows = [f.products.get((layer, p), f.dense(layer, p)) for p in "qkv"]
            reference.model.layers[layer].self_attn.qkv_proj.weight.copy_(torch.cat(rows))
    if CASES[case][6] == "latent":
        feed_from_source(reference, GROUPS)
    return reference


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """get(family, case) -> (factored model, reference, latent_attention, checkpoint dir), built once."""
    built: dict = {}

    def get(family: str, case: str):
        if (family, case) not in built:
            base = stock(family)
            la, f = factor(base, case)
            tensors = f.checkpoint_tensors(base.config.tie_word_embeddings)
            path = write_checkpoint(tmp_path_factory.mktemp(f"{family}_{case}"), base, la, tensors)
            built[(family, case)] = (load(path), reference_model(base, case, f), la, path)
        return built[(family, case)]

    return get


@pytest.mark.parametrize("family, case", PARAMS)
def test_checkpoint_tensors_are_the_factored_layout(build, family, case):
    """The checkpoint holds separate q (dense or factored) and the K/V tensors of its layout, never
    qkv_proj, and keeps the fused gate_up_proj; no biases."""
    _, _, la, path = build(family, case)
    keys = set(load_file(str(path / "model.safetensors")))
    assert not any("qkv_proj" in k or k.endswith(".bias") for k in keys)
    for layer in range(LAYERS):
        attn = {k.removeprefix(PRE.format(layer)) for k in keys if k.startswith(PRE.format(layer))}
        q = {"q_a_proj.weight", "q_b_proj.weight"} if la["q_rank"] else {"q_proj.weight"}
        assert q <= attn and "o_proj.weight" in attn
        assert f"model.layers.{layer}.mlp.gate_up_proj.weight" in keys
        if la["kv"] is None:
            assert {"k_proj.weight", "v_proj.weight"} <= attn
        elif la["kv"] == "shared":
            assert {"k_b_proj.weight", "v_b_proj.weight"} <= attn
            assert ("kv_a_proj.weight" in attn) == (la.get("kv_groups") is None or any(g[0] == layer for g in GROUPS))


@pytest.mark.parametrize("family, case", PARAMS)
def test_logits_match_stock_reference(build, family, case):
    model, reference, _, _ = build(family, case)
    assert type(model).__name__ == "SurgeryPhi3ForCausalLM"
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [WINDOW] * LAYERS
    assert model.model.rotary_emb.inv_freq.numel() * 2 == ROTARY_DIM
    x = ids()
    assert rel_diff(logits(model, x), logits(reference, x)) < EXACT
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    assert rel_diff(logits(model, x, attention_mask=mask), logits(reference, x, attention_mask=mask)) < EXACT


@pytest.mark.parametrize("family, case", PARAMS)
def test_logits_match_in_eager(build, family, case):
    """The same with the eager attention function (stock Phi-3's default is sdpa)."""
    model, reference, _, _ = (copy.deepcopy(m) if i < 2 else m for i, m in enumerate(build(family, case)))
    model.set_attn_implementation("eager")
    reference.set_attn_implementation("eager")
    x = ids()
    assert rel_diff(logits(model, x), logits(reference, x)) < EXACT


@pytest.mark.parametrize("family, case", PARAMS)
def test_generate_cache_left_padding_and_reference(build, family, case):
    model, reference, _, _ = build(family, case)
    check_generate(model, reference, padded=family != "phi3-longrope")
    if family == "phi3-longrope":
        # Longrope picks short or long factors from the batch's largest position, so a left-padded row
        # switches earlier than alone (stock Phi-3 too): compare the batch with the reference's.
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
        batch, mask = left_padded([ids(1, 5, seed=4)[0], ids(1, 9, seed=5)[0]])
        expected = reference.generate(batch, attention_mask=mask, use_cache=True, **kw)
        for use_cache in (True, False):
            assert torch.equal(model.generate(batch, attention_mask=mask, use_cache=use_cache, **kw), expected)


@pytest.mark.parametrize("family, case", PARAMS)
def test_cache_holds_latents_and_decodes(build, family, case):
    """Prefix then token-by-token decoding through the DynamicCache generate builds (every layer a
    sliding-window layer keeping WINDOW - 1 tokens) equals the uncached logits and the reference's;
    the slots hold the latent widths."""
    model, reference, la, _ = build(family, case)
    x = ids(1, 13, seed=6)
    decoded, cache = decode(model, x, 9)
    if family == "phi3-longrope":
        # Positions 10 on switch to the long factors, which changes every earlier token's hidden states:
        # no cache (stock Phi-3's either) reproduces the uncached forward past the switch, and generate
        # drops the cache there (test_generate_cache_left_padding_and_reference). Up to the switch the
        # decoding is exact; past it a dense-K/V layer caches roped K and V exactly as stock does.
        reference_decoded = decode(reference, x, 9)[0]
        assert rel_diff(decoded[:, :10], logits(model, x[:, :10])) < EXACT
        assert rel_diff(decoded[:, :10], reference_decoded[:, :10]) < EXACT
        if la["kv"] is None:
            assert rel_diff(decoded, reference_decoded) < EXACT
    else:
        assert rel_diff(decoded, logits(model, x)) < EXACT
        assert rel_diff(decoded, decode(reference, x, 9)[0]) < EXACT
    assert all(type(slot) is DynamicSlidingWindowLayer for slot in cache.layers)
    widths = [tuple(t.shape[1] * t.shape[-1] for t in (s.keys, s.values)) for s in cache.layers]
    assert widths == cached_widths(model.config, la)
    assert [(s.keys.shape[-2], s.values.shape[-2]) for s in cache.layers] == [(WINDOW - 1, WINDOW - 1)] * LAYERS
    assert cache.get_seq_length() == 13


def variant(base, **changes):
    """The stock model of `base`'s weights under a changed config."""
    config = copy.deepcopy(base.config)
    for key, value in changes.items():
        setattr(config, key, value)
    model = type(base)(config).to(torch.float64).eval()
    model.load_state_dict(base.state_dict())
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_rotary_and_sliding_window_change_the_logits(family):
    """Full rotary instead of partial, or no sliding window, changes the stock model's logits (so the
    comparisons above cover both)."""
    base = stock(family)
    x = ids()
    rope = {**base.config.rope_parameters, "partial_rotary_factor": 1.0}
    if family == "phi3-longrope":  # one factor per rotated pair
        rope.update(short_factor=LONGROPE["short_factor"] * 2, long_factor=LONGROPE["long_factor"] * 2)
    full_rotary = variant(base, rope_parameters=rope)
    assert full_rotary.model.rotary_emb.inv_freq.numel() * 2 == HEAD_DIM
    assert rel_diff(logits(full_rotary, x), logits(base, x)) > 1e-3
    assert rel_diff(logits(variant(base, sliding_window=None), x), logits(base, x)) > 1e-3


def test_only_the_rotary_part_of_each_head_rotates(build):
    """The factored module's RoPE leaves the last head_dim - rotary_dim values of each head as they
    are and rotates the first rotary_dim."""
    model, _, _, _ = build("phi3", "shared")
    rope = sys.modules[type(model.model.layers[0].self_attn).__module__]._phi3_rope  # the loaded module's
    k = torch.randn(1, KV_HEADS, 5, HEAD_DIM, dtype=torch.float64)
    cos, sin = model.model.rotary_emb(k, torch.arange(5)[None] + 3)
    roped = rope(k, cos, sin)
    assert torch.equal(roped[..., ROTARY_DIM:], k[..., ROTARY_DIM:])
    assert not torch.allclose(roped[..., :ROTARY_DIM], k[..., :ROTARY_DIM])


def test_longrope_switches_factors_past_the_original_length():
    """The longrope config's cos / sin differ below and past original_max_position_embeddings, and the
    generated sequences (prompts of 5 and 9, 10 new tokens) cross it."""
    rotary = stock("phi3-longrope").model.rotary_emb
    x = torch.zeros(1, dtype=torch.float64)
    short = rotary(x, torch.arange(4)[None])[0]
    long = rotary(x, torch.arange(16)[None])[0][:, :4]
    assert not torch.allclose(short, long)


def check_missing_refused(tmp_path, gone: str):
    base = stock("phi3")
    la, f = factor(base, "shared")
    tensors = f.checkpoint_tensors(base.config.tie_word_embeddings)
    del tensors[PRE.format(1) + gone]
    path = write_checkpoint(tmp_path / "broken", base, la, tensors)
    with pytest.raises(ValueError, match="lacks attention tensors"):
        AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float64)


@pytest.mark.parametrize("gone", ["k_b_proj.weight", "kv_a_proj.weight", "q_proj.weight"])
def test_missing_attention_tensor_refused(tmp_path, gone):
    check_missing_refused(tmp_path, gone)


@pytest.mark.parametrize(
    "la, message",
    [(v2([4, 5, 6, 6]), "equal within"), (v2([4, 5, 5, 6], format_version=3), "format_version")],
)
def test_bad_configs_refused(la, message, tmp_path):
    path = config_only(tmp_path / "bad", stock("phi3"), la)
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(str(path), trust_remote_code=True)


def test_config_keeps_phi3_fields(tmp_path):
    """Every layer slides (no layer_types), so a version-2 latent group is accepted; the rope
    parameters (partial rotary, longrope factors) survive the round trip."""
    path = config_only(tmp_path / "good", stock("phi3-longrope"), v2([4, 5, 5, 6]))
    loaded = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    assert type(loaded).__name__ == "SurgeryPhi3Config" and loaded.model_type == "surgery_phi3"
    assert loaded.sliding_window == WINDOW and getattr(loaded, "layer_types", None) is None
    assert loaded.rope_parameters["partial_rotary_factor"] == 0.5
    assert loaded.rope_parameters["long_factor"] == LONGROPE["long_factor"]
    assert loaded.original_max_position_embeddings == 10
    assert isinstance(DynamicCache(config=loaded).layers[0], DynamicSlidingWindowLayer)


def test_attention_function_gets_the_sliding_window(build):
    """Every layer passes sliding_window to the attention function, as Phi3Attention does (sdpa and
    eager read the mask; flash attention reads the keyword)."""
    model, _, _, _ = build("phi3", "basis")
    model = copy.deepcopy(model)
    seen = []

    def recording(module, *args, **kwargs):
        seen.append((module.layer_idx, kwargs.get("sliding_window")))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kwargs)

    AttentionInterface.register("surgery_test_recording", recording)
    model.set_attn_implementation("surgery_test_recording")
    logits(model, ids())
    assert seen == [(layer, WINDOW) for layer in range(LAYERS)]
