"""python/modeling_surgery.py (factored Qwen2 / Qwen3) on tiny random checkpoints written here by
hand (no surgery-convert, no real model, no environment variables), in float64.

Each checkpoint factors a stock model's attention by truncated SVD (rank r: a = diag(s_r) V_r^T,
b = U_r, the projection's bias moved to b) for every layout of the format: K/V shared (version 1),
K/V separate, a dense K beside a factored V and Q, Q only, and version-2 groups sharing the basis or
the latent. The dimensions exercise what the families add over Llama: Qwen2's q/k/v biases, Qwen3's
head_dim (32 for hidden 64 and 4 heads), q_norm / k_norm and optional biases on all four projections,
and sliding-window layers (the window shorter than the sequences). Checked: a clean load; logits
equal to a stock model holding the products b @ a (for "latent", the stock model whose later layers'
k_proj / v_proj read their group source's attention input); greedy generation with and without the
cache, with left padding, and equal to that reference's; a cache holding latent widths (the last
sliding_window - 1 tokens in sliding layers); a missing attention tensor refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

PYTHON = Path(__file__).resolve().parents[2] / "python"
MODULES = [PYTHON / "modeling_surgery.py", PYTHON / "modeling_surgery_llama.py"]

LAYERS = 4
WINDOW = 6  # sliding_window: shorter than every sequence below
GROUPS = [[0], [1, 2], [3]]
EXACT = 1e-9  # relative, float64
PRE = "model.layers.{}.self_attn."

COMMON = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
    vocab_size=128, intermediate_size=128, max_position_embeddings=256, initializer_range=0.1,
    bos_token_id=1, eos_token_id=None, pad_token_id=0, use_sliding_window=True, sliding_window=WINDOW,
)
# Qwen2: layers 2, 3 slide (group [1, 2] has a full-attention source and a sliding reader).
# Qwen3: head_dim 32 (q_proj [128, 64]); layers 1-3 slide (a sliding source); biases in one case.
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(max_window_layers=2, tie_word_embeddings=False)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, max_window_layers=1, tie_word_embeddings=True)),
    "qwen3-bias": (Qwen3Config, Qwen3ForCausalLM,
                   dict(head_dim=32, attention_bias=True, max_window_layers=2, tie_word_embeddings=False)),
}
Q_RANK = [20, 12, 24, 16]
KV_RANK = [5, 7, 4, 6]
K_RANK, V_RANK = [5, 3, 6, 4], [4, 6, 3, 5]
GROUP_RANK = [6, 9, 5]
# case -> (format version, kv, kv_rank, k_rank, v_rank, q_rank, kv_share)
CASES = {
    "shared": (1, "shared", KV_RANK, None, None, None, None),
    "separate": (1, "separate", None, K_RANK, V_RANK, None, None),
    "dense-k": (1, "separate", None, None, V_RANK, Q_RANK, None),
    "q-only": (1, None, None, None, None, Q_RANK, None),
    "basis": (2, "shared", None, None, None, Q_RANK, "basis"),
    "latent": (2, "shared", None, None, None, None, "latent"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add overhead, and contend badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(config_class, model_class, config: dict, norm_range=(0.5, 1.5)):
    """A tiny random model (seed 0) in float64, with random biases and norm weights (the
    constructor's are constants)."""
    torch.manual_seed(0)
    model = model_class(config_class(**config)).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(*norm_range)
    return model


def stock_models(families: dict, common: dict, norm_range=(0.5, 1.5)):
    """stock(family): the tiny random model of families[family] (config class, model class, config
    beyond `common`), built once."""
    built: dict = {}

    def stock(family: str):
        if family not in built:
            config_class, model_class, extra = families[family]
            built[family] = random_model(config_class, model_class, {**common, **extra}, norm_range)
        return built[family]

    return stock


stock = stock_models(FAMILIES, COMMON)


def svd_factors(w: torch.Tensor, rank: int):
    """Rank-`rank` truncated SVD of w [out, in]: a = diag(s_r) V_r^T [r, in], b = U_r [out, r]."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return s[:rank, None] * vh[:rank], u[:, :rank].contiguous()


class Factoring:
    """The factor tensors of a checkpoint and the products b @ a for the reference model."""

    def __init__(self, model):
        self.sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.tensors: dict = {}
        self.products: dict = {}  # (layer, "q" | "k" | "v") -> b @ a

    def dense(self, layer, p, kind="weight"):
        return self.sd.get(f"{PRE.format(layer)}{p}_proj.{kind}")

    def up(self, layer, p, b, a):
        self.tensors[f"{PRE.format(layer)}{p}_b_proj.weight"] = b
        if (bias := self.dense(layer, p, "bias")) is not None:
            self.tensors[f"{PRE.format(layer)}{p}_b_proj.bias"] = bias  # the bias moves to b
        self.products[(layer, p)] = b @ a

    def one(self, layer, p, rank):
        a, b = svd_factors(self.dense(layer, p), rank)
        self.tensors[f"{PRE.format(layer)}{p}_a_proj.weight"] = a
        self.up(layer, p, b, a)

    def shared(self, group, rank):
        """One down-projection for K and V of every layer of the group (held by its first layer)."""
        pairs = [(layer, p) for layer in group for p in "kv"]
        a, b = svd_factors(torch.cat([self.dense(layer, p) for layer, p in pairs]), rank)
        self.tensors[f"{PRE.format(group[0])}kv_a_proj.weight"] = a
        for (layer, p), b_lp in zip(pairs, b.split([self.dense(*pair).shape[0] for pair in pairs])):
            self.up(layer, p, b_lp.contiguous(), a)

    def checkpoint_tensors(self, tied: bool) -> dict:
        gone = {f"{PRE.format(layer)}{p}_proj.{kind}" for layer, p in self.products for kind in ("weight", "bias")}
        kept = {k: v for k, v in self.sd.items() if k not in gone and not (tied and k == "lm_head.weight")}
        return {k: v.contiguous() for k, v in {**kept, **self.tensors}.items()}


def factor(model, case: str):
    """(latent_attention, Factoring) of a case."""
    version, kv, kv_rank, k_rank, v_rank, q_rank, share = CASES[case]
    f = Factoring(model)
    if kv == "shared":
        groups = GROUPS if version == 2 else [[layer] for layer in range(LAYERS)]
        ranks = GROUP_RANK if version == 2 else kv_rank
        for group, rank in zip(groups, ranks):
            f.shared(group, rank)
        kv_rank = [r for group, r in zip(groups, ranks) for _ in group]
    for p, ranks in (("k", k_rank), ("v", v_rank), ("q", q_rank)):
        for layer, rank in enumerate(ranks or ()):
            f.one(layer, p, rank)
    original = type(model).__name__
    la = {
        "format_version": version, "fit": "svd", "kv": kv, "kv_rank": kv_rank, "q_rank": q_rank,
        "k_rank": k_rank, "v_rank": v_rank, "original_architectures": [original],
        "original_model_type": model.config.model_type,
    }
    if version == 2:
        la.update(kv_share=share, kv_groups=GROUPS)
    return la, f


def surgery_config(model, la: dict) -> dict:
    family = type(model).__name__.removesuffix("ForCausalLM")  # Qwen2 / Qwen3
    config = model.config.to_dict()
    config.update({
        "architectures": [f"Surgery{family}ForCausalLM"], "model_type": f"surgery_{family.lower()}",
        "auto_map": {"AutoConfig": f"modeling_surgery.Surgery{family}Config",
                     "AutoModelForCausalLM": f"modeling_surgery.Surgery{family}ForCausalLM"},
        "latent_attention": la, "dtype": "float64",
    })
    return config


def write_checkpoint(out: Path, model, la: dict, tensors: dict | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(surgery_config(model, la), indent=2))
    for module in MODULES:
        shutil.copy(module, out / module.name)
    return out


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, output_loading_info=True, dtype=torch.float64
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{kind}: {info.get(kind)}"
    return model.eval()


def feed_from_source(reference, groups):
    """kv_share "latent" in a stock model: the k_proj / v_proj (= b^(l) @ A_g, with bias) of every
    later layer of a group read the group source's attention input instead of their own."""
    inputs = {}
    for group in groups:
        source = reference.model.layers[group[0]].self_attn
        source.register_forward_pre_hook(
            lambda mod, args, kwargs, s=group[0]: inputs.__setitem__(s, kwargs["hidden_states"]), with_kwargs=True
        )
        for layer in group[1:]:
            for p in "kv":
                proj = getattr(reference.model.layers[layer].self_attn, f"{p}_proj")
                proj.register_forward_hook(lambda mod, args, out, s=group[0]: F.linear(inputs[s], mod.weight, mod.bias))


def reference_model(model, case: str, products: dict):
    """The stock model with W = b @ a in place of each factored projection (biases unchanged)."""
    reference = type(model)(model.config).to(torch.float64).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (layer, p), w in products.items():
            getattr(reference.model.layers[layer].self_attn, f"{p}_proj").weight.copy_(w)
    if CASES[case][6] == "latent":
        feed_from_source(reference, GROUPS)
    return reference


def case_builder(stock_of, tmp_path_factory):
    """get(family, case) -> (factored model, reference model, latent_attention), each built once from
    the stock model stock_of(family)."""
    built: dict = {}

    def get(family: str, case: str):
        if (family, case) not in built:
            base = stock_of(family)
            la, f = factor(base, case)
            tensors = f.checkpoint_tensors(base.config.tie_word_embeddings)
            path = write_checkpoint(tmp_path_factory.mktemp(f"{family}_{case}"), base, la, tensors)
            built[(family, case)] = (load(path), reference_model(base, case, f.products), la)
        return built[(family, case)]

    return get


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return case_builder(stock, tmp_path_factory)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ids(batch: int = 2, length: int = 14, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids, **kwargs) -> torch.Tensor:
    return model(input_ids, use_cache=False, **kwargs).logits


PARAMS = [(family, case) for family in FAMILIES for case in CASES]


def check_logits(model, reference, padded: bool = True, tolerance: float = EXACT):
    """Logits equal to the reference's, without and (`padded`) with left padding; sliding windows as
    configured."""
    cfg = model.config
    assert type(model).__name__ == f"Surgery{type(reference).__name__}"
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == [WINDOW if t == "sliding_attention" else None for t in cfg.layer_types]
    assert None in windows and WINDOW in windows
    x = ids()
    assert rel_diff(logits(model, x), logits(reference, x)) < tolerance
    if padded:
        mask = torch.ones_like(x)
        mask[0, :4] = 0  # left padding
        assert rel_diff(logits(model, x, attention_mask=mask), logits(reference, x, attention_mask=mask)) < tolerance


@pytest.mark.parametrize("family, case", PARAMS)
def test_logits_match_stock_reference(build, family, case):
    check_logits(*build(family, case)[:2])


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return batch, mask


def check_generate(model, reference, padded: bool = True):
    """Greedy generation: with and without the cache, alone and (`padded`) left-padded in a batch,
    and the reference's, all the same."""
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompts = [ids(1, 5, seed=4)[0], ids(1, 9, seed=5)[0]]  # both grow past the window
    alone = []
    for p in prompts:
        with_cache = model.generate(p[None], use_cache=True, **kw)[0, len(p):]
        assert torch.equal(with_cache, model.generate(p[None], use_cache=False, **kw)[0, len(p):])
        assert torch.equal(with_cache, reference.generate(p[None], use_cache=True, **kw)[0, len(p):])
        alone.append(with_cache)
    batch, mask = left_padded(prompts)
    for use_cache in (True, False) if padded else ():
        out = model.generate(batch, attention_mask=mask, use_cache=use_cache, **kw)[:, batch.shape[1]:]
        assert torch.equal(out, torch.stack(alone)), use_cache


@pytest.mark.parametrize("family, case", PARAMS)
def test_generate_cache_left_padding_and_reference(build, family, case):
    check_generate(*build(family, case)[:2])


def cached_widths(cfg, la: dict):
    """Per layer, the values per token the K and V slots hold."""
    kv_dim = cfg.num_key_value_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    if la["kv"] is None:
        return [(kv_dim, kv_dim)] * LAYERS
    if la["kv"] == "separate":
        return [tuple(la[f"{p}_rank"][layer] if la[f"{p}_rank"] else kv_dim for p in "kv") for layer in range(LAYERS)]
    sources = {g[0] for g in GROUPS} if la.get("kv_share") == "latent" else set(range(LAYERS))
    return [((la["kv_rank"][layer] if layer in sources else 0), 0) for layer in range(LAYERS)]


def decode(model, x, split: int):
    """Logits of x through a DynamicCache (what generate builds: sliding layers keep WINDOW - 1): the
    first `split` tokens at once, then one token per step; and the cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefix = model(x[:, :split], cache=cache, use_cache=True).logits
        steps = [model(x[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(split, x.shape[1])]
    return torch.cat([prefix, *steps], 1), cache


def check_cache(model, la: dict, reference=None, tolerance: float = EXACT):
    """Prefix then token-by-token decoding through a DynamicCache equals the uncached logits (within
    `tolerance`) and the reference decoded alike (if given); the cache holds the latent widths (and
    the last WINDOW - 1 tokens in sliding layers)."""
    x = ids(1, 13, seed=6)
    decoded, cache = decode(model, x, 9)
    full = logits(model, x)
    assert rel_diff(decoded[:, :9], full[:, :9]) < tolerance
    assert rel_diff(decoded[:, 9:], full[:, 9:]) < tolerance
    if reference is not None:
        assert rel_diff(decoded, decode(reference, x, 9)[0]) < EXACT
    widths = [tuple(t.shape[1] * t.shape[-1] for t in (s.keys, s.values)) for s in cache.layers]
    assert widths == cached_widths(model.config, la)
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    assert [s.keys.shape[-2] for s in cache.layers] == [WINDOW - 1 if s else 13 for s in sliding]
    assert [s.values.shape[-2] for s in cache.layers] == [WINDOW - 1 if s else 13 for s in sliding]
    assert cache.get_seq_length() == 13


@pytest.mark.parametrize("family, case", PARAMS)
def test_cache_holds_latents_and_decodes(build, family, case):
    model, reference, la = build(family, case)
    check_cache(model, la, reference)


def check_missing_refused(base, tmp_path: Path, gone: str):
    """A "shared" checkpoint of `base` without layer 1's attention tensor `gone` is refused."""
    la, f = factor(base, "shared")
    tensors = f.checkpoint_tensors(base.config.tie_word_embeddings)
    del tensors[PRE.format(1) + gone]
    path = write_checkpoint(tmp_path / "broken", base, la, tensors)
    with pytest.raises(ValueError, match="lacks attention tensors"):
        AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_attention_tensor_refused(family, tmp_path):
    check_missing_refused(stock(family), tmp_path, "k_b_proj.bias" if family != "qwen3" else "k_norm.weight")


def v2(kv_rank, **extra) -> dict:
    la = {"format_version": 2, "fit": "act", "kv": "shared", "kv_rank": kv_rank, "q_rank": None,
          "k_rank": None, "v_rank": None, "kv_share": "latent", "kv_groups": GROUPS,
          "original_architectures": ["Qwen3ForCausalLM"], "original_model_type": "qwen3"}
    return {**la, **extra}


def config_only(path: Path, base, la: dict, layer_types=None) -> Path:
    """A checkpoint directory with only config.json (layer_types replaced if given) and the modules."""
    write_checkpoint(path, base, la, None)
    if layer_types is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "layer_types": layer_types}))
    return path


@pytest.mark.parametrize(
    "la, layer_types, message",
    [
        # a full-attention layer cannot read a sliding source's latent (the source keeps WINDOW - 1)
        (v2([4, 5, 5, 6]), ["full_attention", "sliding_attention", "full_attention", "full_attention"], "cannot read"),
        (v2([4, 5, 6, 6]), None, "equal within"),  # the Llama module's version-2 checks apply
        (v2([4, 5, 5, 6], format_version=3), None, "format_version"),
    ],
)
def test_bad_configs_refused(la, layer_types, message, tmp_path):
    path = config_only(tmp_path / "bad", stock("qwen3"), la, layer_types)
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(str(path), trust_remote_code=True)


def test_good_mixed_layer_types_accepted(tmp_path):
    types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    path = config_only(tmp_path / "good", stock("qwen3"), v2([4, 5, 5, 6]), types)
    loaded = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    assert type(loaded).__name__ == "SurgeryQwen3Config" and loaded.layer_types == types
