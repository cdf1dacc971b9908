"""Format version 2 (cross-layer K/V sharing) in python/modeling_surgery_llama.py, on tiny random
checkpoints written here by hand (no surgery-convert, no real model, no environment variables):
both kv_share modes load cleanly and compute exactly (float64) what they specify -- "basis" the
stock Llama with W = b^(l) @ A_g, "latent" a plain-torch reference where every layer of a group
reads the source layer's latent -- generate the same tokens with and without the cache and with
left padding, and "latent" caches one latent per token and group. Version 1 still loads and
matches; malformed version-2 configs are refused."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

MODULE = Path(__file__).resolve().parents[2] / "python" / "modeling_surgery_llama.py"

LAYERS = 6
GROUPS = [[0, 1, 2], [3, 4], [5]]  # uneven, last shorter
WIDTHS = [5, 7, 3]
Q_RANK = 24
EXACT = 1e-9  # relative, float64



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add overhead, and contend badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
        vocab_size=128, intermediate_size=128, max_position_embeddings=256, initializer_range=0.1,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def stock() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).to(torch.float64).eval()


def kv_dim(config) -> int:
    return config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)


def group_of(layer: int) -> int:
    return next(g for g, members in enumerate(GROUPS) if layer in members)


def random_factors(config, widths_per_layer, seed):
    """Per group (v2) or per layer (v1) A [L, hidden]; per layer k_b, v_b [kv_dim, L]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    a = [torch.randn(w, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden) for w in widths_per_layer[0]]
    kb = [torch.randn(kv_dim(config), w, generator=gen, dtype=torch.float64) for w in widths_per_layer[1]]
    vb = [torch.randn(kv_dim(config), w, generator=gen, dtype=torch.float64) for w in widths_per_layer[1]]
    return a, kb, vb


def latent_attention(version: int, kv_rank, **extra) -> dict:
    return {
        "format_version": version, "fit": "act", "kv": "shared", "kv_rank": kv_rank,
        "q_rank": None, "k_rank": None, "v_rank": None,
        "original_architectures": ["LlamaForCausalLM"], "original_model_type": "llama", **extra,
    }


def write_checkpoint(out: Path, stock, la: dict, attn_tensors: dict) -> Path:
    """The stock model's tensors minus k_proj / v_proj (and q_proj if q is factored), plus
    attn_tensors, with a surgery_llama config.json and a copy of the module."""
    out.mkdir(parents=True, exist_ok=True)
    drop = ("k_proj", "v_proj") + (("q_proj",) if la.get("q_rank") else ())
    tensors = {
        k: v.detach().clone().contiguous() for k, v in stock.state_dict().items()
        if not any(f".self_attn.{p}." in k for p in drop)
    }
    tensors.update({k: v.contiguous() for k, v in attn_tensors.items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = stock.config.to_dict()
    config.update({
        "architectures": ["SurgeryLlamaForCausalLM"], "model_type": "surgery_llama",
        "auto_map": {"AutoConfig": "modeling_surgery_llama.SurgeryLlamaConfig",
                     "AutoModelForCausalLM": "modeling_surgery_llama.SurgeryLlamaForCausalLM"},
        "latent_attention": la, "dtype": "float64",
    })
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(MODULE, out / MODULE.name)
    return out


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, output_loading_info=True, dtype=torch.float64
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{kind}: {info.get(kind)}"
    return model.eval()


def v2_tensors(config, q_factored: bool, seed: int):
    a, kb, vb = random_factors(config, (WIDTHS, [WIDTHS[group_of(l)] for l in range(LAYERS)]), seed)
    pre = "model.layers.{}.self_attn."
    tensors = {}
    for g, members in enumerate(GROUPS):
        tensors[pre.format(members[0]) + "kv_a_proj.weight"] = a[g]
    for l in range(LAYERS):
        tensors[pre.format(l) + "k_b_proj.weight"] = kb[l]
        tensors[pre.format(l) + "v_b_proj.weight"] = vb[l]
    qa = qb = None
    if q_factored:
        gen = torch.Generator().manual_seed(seed + 1)
        qa = [torch.randn(Q_RANK, config.hidden_size, generator=gen, dtype=torch.float64) / 8 for _ in range(LAYERS)]
        qb = [torch.randn(config.hidden_size, Q_RANK, generator=gen, dtype=torch.float64) / 4 for _ in range(LAYERS)]
        for l in range(LAYERS):
            tensors[pre.format(l) + "q_a_proj.weight"] = qa[l]
            tensors[pre.format(l) + "q_b_proj.weight"] = qb[l]
    return tensors, (a, kb, vb, qa, qb)


_built: dict = {}


@pytest.fixture(scope="module")
def build(stock, tmp_path_factory):
    """(model, factors) of a version-2 checkpoint for kv_share `share`, built once per module."""

    def get(share: str, q_factored: bool = False):
        key = (share, q_factored)
        if key not in _built:
            tensors, factors = v2_tensors(stock.config, q_factored, seed=10 + len(_built))
            kv_rank = [WIDTHS[group_of(l)] for l in range(LAYERS)]
            la = latent_attention(2, kv_rank, kv_share=share, kv_groups=GROUPS)
            if q_factored:
                la["q_rank"] = [Q_RANK] * LAYERS
            path = write_checkpoint(tmp_path_factory.mktemp(f"v2_{share}_{int(q_factored)}"), stock, la, tensors)
            _built[key] = (load(path), factors)
        return _built[key]

    return get


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ids(batch: int = 2, length: int = 11, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids, **kwargs) -> torch.Tensor:
    return model(input_ids, use_cache=False, **kwargs).logits


def test_basis_is_stock_llama_with_tied_down_projection(stock, build):
    model, (a, kb, vb, qa, qb) = build("basis", q_factored=True)
    attn = [layer.self_attn for layer in model.model.layers]
    for members in GROUPS:
        assert all(attn[l]._kv_source is attn[members[0]] for l in members[1:])
        assert all(not hasattr(attn[l], "kv_a_proj") for l in members[1:])
    assert [k for k in model.state_dict() if "kv_a_proj" in k] == [
        f"model.layers.{m[0]}.self_attn.kv_a_proj.weight" for m in GROUPS
    ]
    reference = LlamaForCausalLM(stock.config).to(torch.float64).eval()
    reference.load_state_dict(stock.state_dict())
    with torch.no_grad():
        for l, layer in enumerate(reference.model.layers):
            layer.self_attn.k_proj.weight.copy_(kb[l] @ a[group_of(l)])
            layer.self_attn.v_proj.weight.copy_(vb[l] @ a[group_of(l)])
            layer.self_attn.q_proj.weight.copy_(qb[l] @ qa[l])
    x = ids()
    assert rel_diff(logits(model, x), logits(reference, x)) < EXACT


def rms(x, w, eps):
    # As LlamaRMSNorm: normalised in float32 whatever the dtype (float64 is exact only beyond this).
    x32 = x.to(torch.float32)
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def reference_latent_logits(stock, factors, input_ids) -> torch.Tensor:
    """Plain-torch forward of the latent-shared model: layer l's K/V come from its group source's
    normalised input."""
    cfg, w = stock.config, stock.state_dict()
    a, kb, vb = factors[:3]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    b, t = input_ids.shape
    # cos/sin from Llama's own rotary embedding (computed in float32 there, as in the model)
    h = w["model.embed_tokens.weight"][input_ids]
    cos, sin = stock.model.rotary_emb(h, torch.arange(t)[None])
    cos, sin = cos[:, None], sin[:, None]
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        x = rms(h, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        if l == GROUPS[group_of(l)][0]:
            source_x = x
        c = source_x @ a[group_of(l)].T
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
        k = (c @ kb[l].T).view(b, t, kv_heads, hd).transpose(1, 2)
        v = (c @ vb[l].T).view(b, t, kv_heads, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(b, t, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
        h = h + (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(h, w["model.norm.weight"], cfg.rms_norm_eps) @ w["lm_head.weight"].T


def test_latent_matches_plain_torch_reference(stock, build):
    model, factors = build("latent")
    attn = [layer.self_attn for layer in model.model.layers]
    for members in GROUPS:
        assert all(attn[l]._kv_source is attn[members[0]] for l in members[1:])
        assert all(not hasattr(attn[l], "kv_a_proj") for l in members[1:])
    x = ids()
    assert rel_diff(logits(model, x), reference_latent_logits(stock, factors, x)) < EXACT
    assert all(a._group_latent is None for a in attn)  # not kept past the forward


@pytest.mark.parametrize("share", ["latent", "basis"])
def test_generate_cache_and_left_padding(build, share):
    model, _ = build(share)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompts = [ids(1, 5, seed=4)[0], ids(1, 9, seed=5)[0]]
    alone = []
    for p in prompts:
        with_cache = model.generate(p[None], use_cache=True, **kw)[0, len(p):]
        without = model.generate(p[None], use_cache=False, **kw)[0, len(p):]
        assert torch.equal(with_cache, without)
        alone.append(with_cache)
    width = max(len(p) for p in prompts)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    for use_cache in (True, False):
        out = model.generate(batch, attention_mask=mask, use_cache=use_cache, **kw)[:, width:]
        assert torch.equal(out, torch.stack(alone)), use_cache


def test_latent_cache_holds_one_latent_per_group(build):
    model, _ = build("latent")
    x = ids(1, 10, seed=6)
    full = logits(model, x)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefix = model(x[:, :7], cache=cache, use_cache=True).logits
    sources = [m[0] for m in GROUPS]
    widths = [layer.keys.shape[-1] + layer.values.shape[-1] for layer in cache.layers]
    assert sum(widths) == sum(WIDTHS)
    assert [widths[l] for l in sources] == WIDTHS and all(widths[l] == 0 for l in range(LAYERS) if l not in sources)
    assert all(layer.keys.shape[:3] == (1, 1, 7) and layer.values.shape[:3] == (1, 1, 7) for layer in cache.layers)
    assert cache.get_seq_length() == 7
    assert rel_diff(prefix, full[:, :7]) < EXACT
    with torch.no_grad():  # decode the rest token by token from the cache
        steps = [model(x[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(7, 10)]
    assert rel_diff(torch.cat(steps, 1), full[:, 7:]) < EXACT
    assert all(layer.keys.shape[-2] == 10 for layer in cache.layers)
    # crop and batch ops keep every slot consistent (width-0 slots included)
    cache.crop(-1)
    cache.batch_repeat_interleave(2)
    with torch.no_grad():
        step = model(x[:, 9:10].repeat(2, 1), cache=cache, use_cache=True).logits
    assert rel_diff(step, full[:, 9:10].repeat(2, 1, 1)) < EXACT
    with torch.no_grad():  # a cache without config (slots created lazily) works the same
        lazy = DynamicCache()
        model(x[:, :7], cache=lazy, use_cache=True)
        step = model(x[:, 7:8], cache=lazy, use_cache=True).logits
    assert len(lazy.layers) == LAYERS and rel_diff(step, full[:, 7:8]) < EXACT
    cache.batch_select_indices(torch.tensor([1]))
    assert all(layer.keys.shape[:3] == (1, 1, 10) and layer.values.shape[:3] == (1, 1, 10) for layer in cache.layers
               if layer.keys.shape[-1] > 0)


def test_version_1_still_loads_and_matches(stock, tmp_path):
    ranks = [4, 6, 5, 8, 3, 7]
    a, kb, vb = random_factors(stock.config, (ranks, ranks), seed=20)
    pre = "model.layers.{}.self_attn."
    tensors = {}
    for l in range(LAYERS):
        tensors[pre.format(l) + "kv_a_proj.weight"] = a[l]
        tensors[pre.format(l) + "k_b_proj.weight"] = kb[l]
        tensors[pre.format(l) + "v_b_proj.weight"] = vb[l]
    la = latent_attention(1, ranks)
    la["fit"] = "pca"
    model = load(write_checkpoint(tmp_path / "v1", stock, la, tensors))
    reference = LlamaForCausalLM(stock.config).to(torch.float64).eval()
    reference.load_state_dict(stock.state_dict())
    with torch.no_grad():
        for l, layer in enumerate(reference.model.layers):
            layer.self_attn.k_proj.weight.copy_(kb[l] @ a[l])
            layer.self_attn.v_proj.weight.copy_(vb[l] @ a[l])
    x = ids()
    assert rel_diff(logits(model, x), logits(reference, x)) < EXACT
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    assert [layer.keys.shape[-1] + layer.values.shape[-1] for layer in cache.layers] == ranks


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("modeling_surgery_llama_under_test", MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config_with(module, la: dict):
    base = tiny_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    return module.SurgeryLlamaConfig(**base, latent_attention=la)


GOOD_RANK = [5, 5, 5, 7, 7, 3]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kv_groups": [[0, 2, 1], [3, 4], [5]]}, "consecutive"),
        ({"kv_groups": [[0, 1], [3, 4], [5]]}, "consecutive"),  # layer 2 missing
        ({"kv_groups": [[0, 1, 2], [3, 4]]}, "consecutive"),  # layer 5 not covered
        ({"kv_groups": [[3, 4], [0, 1, 2], [5]]}, "consecutive"),  # out of order
        ({"kv_groups": [[0, 1, 2], [], [3, 4, 5]]}, "consecutive"),
        ({"kv_rank": [5, 5, 6, 7, 7, 3]}, "equal within"),
        ({"kv_share": None}, "kv_share"),
        ({"kv_share": "both"}, "kv_share"),
        ({"kv": "separate", "kv_rank": None, "k_rank": [2] * 6, "v_rank": [2] * 6}, "kv == 'shared'"),
        ({"format_version": 3}, "format_version"),
        ({"format_version": 1}, "format_version 2"),  # version 1 with kv_groups / kv_share
    ],
)
def test_bad_configs_raise(module, change, message):
    la = latent_attention(2, GOOD_RANK, kv_share="latent", kv_groups=GROUPS)
    la.update(change)
    la = {k: v for k, v in la.items() if v is not None or k not in ("kv_share",)}
    with pytest.raises(ValueError, match=message):
        config_with(module, la)


def test_good_configs_accepted(module):
    assert module.FORMAT_VERSION == 2
    for share in ("latent", "basis"):
        config_with(module, latent_attention(2, GOOD_RANK, kv_share=share, kv_groups=GROUPS))
    config_with(module, latent_attention(2, [4] * 6, kv_share="basis", kv_groups=[list(range(6))]))
    config_with(module, latent_attention(1, [4, 6, 5, 8, 3, 7]))
