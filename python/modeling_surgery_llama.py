"""Factored ("latent") Llama attention written by ``surgery-convert --emit factored``.

The format and the loading algorithm are specified in docs/factored-format.md of the
surgery-convert repository; this docstring summarises them.

This module is copied next to a factored checkpoint so that Hugging Face transformers can load it
with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. It imports only
``torch`` and ``transformers`` (written against transformers 5.24) and reuses the Llama classes for
everything except the attention projections and the contents of the KV cache.

Format (``latent_attention.format_version`` 1)
---------------------------------------------
``config.json`` is the original Llama config plus::

    "architectures": ["SurgeryLlamaForCausalLM"],
    "model_type": "surgery_llama",
    "auto_map": {"AutoConfig": "modeling_surgery_llama.SurgeryLlamaConfig",
                 "AutoModelForCausalLM": "modeling_surgery_llama.SurgeryLlamaForCausalLM"},
    "latent_attention": {
        "format_version": 1,
        "fit": "pca" | "svd" | "seed" | "act",  # informational
        "kv": "shared" | "separate" | null,
        "kv_rank": [L per layer] | null,        # kv == "shared"
        "q_rank": [Lq per layer] | null,
        "k_rank": [Lk per layer] | null,        # kv == "separate"
        "v_rank": [Lv per layer] | null,        # kv == "separate"
        "original_architectures": ["LlamaForCausalLM"],
        "original_model_type": "llama"}

Ranks are the latent widths actually stored (for fit ``pca`` the kept components plus one for the
mean direction). A null or absent list means that projection is dense (ordinary ``q_proj`` /
``k_proj`` / ``v_proj``). Tensors, under ``model.layers.N.self_attn.`` (all linear, no bias,
``y = b @ (a @ x)``)::

    kv == "shared":    kv_a_proj [L, hidden], k_b_proj [kv_dim, L], v_b_proj [kv_dim, L]
    kv == "separate":  k_a_proj [Lk, hidden], k_b_proj [kv_dim, Lk]
                       v_a_proj [Lv, hidden], v_b_proj [kv_dim, Lv]
    q_rank present:    q_a_proj [Lq, hidden], q_b_proj [q_dim, Lq]

with ``kv_dim = num_key_value_heads * head_dim`` and ``q_dim = num_attention_heads * head_dim``;
the replaced dense projections are absent. Everything else is an ordinary Llama checkpoint.

Algorithm
---------
The model is ``LlamaForCausalLM`` with ``W' = b @ a`` in place of each factored projection: RoPE on
q and on k *after* the up-projection, grouped-query attention, causal mask, ``o_proj``, MLP, norms,
tied embeddings all unchanged. What differs is what the KV cache holds: the latent, not K and V.
Per layer and step the attention

1. computes the latent of the new tokens (``c = kv_a(x)``, or ``k_a(x)`` and ``v_a(x)``);
2. appends it to the cache;
3. up-projects the whole cached latent to K and V (``k_b(c)``, ``v_b(c)``);
4. applies RoPE to all of K at its absolute positions, with cos/sin from the model's own rotary
   embedding (the cached tokens are taken to sit at the positions just before the new ones, which is
   what ``generate`` produces, left padding included); with nothing cached the positions are the
   given ``position_ids``, exactly as in Llama;
5. attends with the query as usual.

The cache is a stock ``transformers.DynamicCache`` (what ``generate`` builds for this model); each
layer's slot holds tensors shaped ``[batch, 1, T, width]``, the sequence on dim -2 as the cache
expects, so crop / reorder / beam / batch ops work unchanged:

* ``kv == "shared"``: ``keys`` = the latent ``c`` (width ``L``), ``values`` = an empty width-0 tensor;
* ``kv == "separate"``: ``keys`` = the K latent (width ``Lk``), ``values`` = the V latent (``Lv``);
  a projection left dense caches its pre-RoPE output (width ``kv_dim``) in its slot instead;
* ``kv`` null: the ordinary Llama cache (post-RoPE K and V), only the query is factored.

Only plain ``DynamicLayer`` cache layers are accepted (``DynamicCache``, also with offloading);
``StaticCache`` (``cache_implementation="static"``) and quantized caches raise ``ValueError``
rather than misbehave (a static layer returns the whole pre-allocated buffer, so ``T`` would be
wrong). ``from_pretrained`` refuses a checkpoint that lacks any attention tensor (transformers
would only warn and initialise it randomly); wrong shapes already raise in transformers.

Format version 2: cross-layer sharing
-------------------------------------
Version 2 shares the K/V down-projection across groups of consecutive layers. ``latent_attention``
is as in version 1 with ``"format_version": 2``, ``kv == "shared"`` required, and::

    "kv_share": "latent" | "basis",
    "kv_groups": [[0, 1, 2, 3], [4, 5, 6, 7], ...],

``kv_groups`` partitions ``0 .. num_hidden_layers - 1`` into runs of consecutive layers, in order (the
last may be shorter); the first layer of a group is its source ``l0``. ``kv_rank`` lists the group's
width ``L_g`` for every layer of the group. Only ``l0`` holds ``kv_a_proj [L_g, hidden]`` (``A_g``);
every layer of the group, ``l0`` included, holds its own ``k_b_proj`` / ``v_b_proj [kv_dim, L_g]``.
``q`` is factored or dense as in version 1.

* ``basis``: version 1 with a tied down-projection: layer ``l`` caches ``c_l = A_g x_l`` from its own
  attention input in its own slot (``L_g`` values per token and layer).
* ``latent``: one latent per token and group: ``l0`` caches ``c_g = A_g x_l0`` (``keys``, with width-0
  ``values``, as in version 1) and every layer ``l`` of the group attends with ``K = k_b^(l)(c_g)``,
  ``V = v_b^(l)(c_g)`` over all cached tokens (RoPE on K after the up-projection, as above). The other
  layers' slots get width-0 ``keys`` and ``values`` of the same sequence length, so the cache holds
  ``L_g`` values per token and group and every slot has the same length.

Non-source layers keep a plain reference to ``l0``'s attention (not a registered child), so ``A_g``
is one parameter, loaded from ``model.layers.{l0}.self_attn.kv_a_proj.weight`` only. With ``latent``
the source keeps its whole latent for the rest of the forward and the group's last layer drops it;
recomputing a layer in isolation (gradient checkpointing) is therefore not supported.
"""

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

FORMAT_VERSION = 2
KV_SHARE = ("latent", "basis")


class SurgeryLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus the ``latent_attention`` description of the factored projections."""

    model_type = "surgery_llama"

    latent_attention: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_latent_attention()

    def _check_latent_attention(self):
        # Not a `validate_*` method: strict validators are collected on LlamaConfig only.
        la = self.latent_attention or {}
        if not la:
            return
        version = la.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(
                f"latent_attention.format_version {version!r} is not supported "
                f"(this modeling_surgery_llama.py reads versions 1 and {FORMAT_VERSION})"
            )
        kv = la.get("kv")
        need = {"shared": ["kv_rank"], "separate": [], None: []}
        if kv not in need:
            raise ValueError(f"latent_attention.kv must be 'shared', 'separate' or null, not {kv!r}")
        for key in need[kv]:
            if la.get(key) is None:
                raise ValueError(f"latent_attention.kv == {kv!r} needs latent_attention.{key}")
        for key in ("kv_rank", "q_rank", "k_rank", "v_rank"):
            ranks = la.get(key)
            if ranks is None:
                continue
            if len(ranks) != self.num_hidden_layers or any(int(r) < 1 for r in ranks):
                raise ValueError(
                    f"latent_attention.{key} must list {self.num_hidden_layers} positive ranks, got {ranks!r}"
                )
        if kv != "shared" and la.get("kv_rank") is not None:
            raise ValueError("latent_attention.kv_rank is only valid with kv == 'shared'")
        if kv != "separate" and (la.get("k_rank") is not None or la.get("v_rank") is not None):
            raise ValueError("latent_attention.k_rank / v_rank are only valid with kv == 'separate'")
        if version == 1:
            for key in ("kv_share", "kv_groups"):
                if la.get(key) is not None:
                    raise ValueError(f"latent_attention.{key} needs format_version 2 (this config says 1)")
        else:
            self._check_kv_groups(la)

    def _check_kv_groups(self, la):
        if la.get("kv") != "shared":
            raise ValueError(f"latent_attention format_version 2 needs kv == 'shared', not {la.get('kv')!r}")
        if la.get("kv_share") not in KV_SHARE:
            raise ValueError(f"latent_attention.kv_share must be 'latent' or 'basis', not {la.get('kv_share')!r}")
        groups = la.get("kv_groups")
        n = self.num_hidden_layers
        ok = isinstance(groups, list) and all(isinstance(g, list) and g for g in groups)
        if not ok or [layer for g in groups for layer in g] != list(range(n)):
            raise ValueError(
                "latent_attention.kv_groups must split layers 0.."
                f"{n - 1} into non-empty runs of consecutive layers, in order; got {groups!r}"
            )
        for g in groups:
            widths = {int(la["kv_rank"][layer]) for layer in g}
            if len(widths) != 1:
                raise ValueError(f"latent_attention.kv_rank must be equal within kv group {g}, got {sorted(widths)}")


def _rank(config, key, layer_idx):
    ranks = (config.latent_attention or {}).get(key)
    return None if ranks is None else int(ranks[layer_idx])


def _kv_group(config, layer_idx):
    """The kv group (list of layer indices) of a layer, or None without cross-layer sharing."""
    for group in (config.latent_attention or {}).get("kv_groups") or ():
        if layer_idx in group:
            return list(group)
    return None


def _rope(x, cos, sin):
    # Same arithmetic as Llama's apply_rotary_pos_emb (heads on dim 1).
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


class SurgeryLlamaAttention(LlamaAttention):
    """Llama attention whose q / k / v projections may be factored, caching the K/V latent."""

    def __init__(self, config: SurgeryLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)  # LlamaAttention.__init__ would allocate the dense projections
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        hidden, bias = config.hidden_size, config.attention_bias
        q_dim = config.num_attention_heads * self.head_dim
        kv_dim = config.num_key_value_heads * self.head_dim
        self.kv_mode = (config.latent_attention or {}).get("kv")

        lq = _rank(config, "q_rank", layer_idx)
        if lq is None:
            self.q_proj = nn.Linear(hidden, q_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(hidden, lq, bias=False)
            self.q_b_proj = nn.Linear(lq, q_dim, bias=False)

        # Cross-layer sharing (format version 2): the group's source layer holds kv_a_proj.
        self.kv_share = (config.latent_attention or {}).get("kv_share")
        self.kv_group = _kv_group(config, layer_idx) or [layer_idx]
        self.is_kv_source = self.kv_group[0] == layer_idx
        self.k_factored = self.v_factored = False
        if self.kv_mode == "shared":
            lkv = _rank(config, "kv_rank", layer_idx)
            if self.is_kv_source:
                self.kv_a_proj = nn.Linear(hidden, lkv, bias=False)
            self.k_b_proj = nn.Linear(lkv, kv_dim, bias=False)
            self.v_b_proj = nn.Linear(lkv, kv_dim, bias=False)
        else:
            for name in ("k", "v"):
                width = _rank(config, f"{name}_rank", layer_idx) if self.kv_mode == "separate" else None
                if width is None:
                    setattr(self, f"{name}_proj", nn.Linear(hidden, kv_dim, bias=bias))
                else:
                    setattr(self, f"{name}_a_proj", nn.Linear(hidden, width, bias=False))
                    setattr(self, f"{name}_b_proj", nn.Linear(width, kv_dim, bias=False))
                    setattr(self, f"{name}_factored", True)

        self.o_proj = nn.Linear(q_dim, hidden, bias=bias)
        # Set by SurgeryLlamaModel: its rotary embedding and (non-source layers of a kv group) the
        # group's source attention, plain references kept out of this module's children.
        self._model_rotary_emb = None
        self._kv_source = None
        # kv_share "latent", on a source with readers: the group latent of the current forward.
        self._group_latent = None

    def _query(self, x):
        return self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_proj(x))

    def _latents(self, x):
        """What the cache stores for new tokens x [b, q, hidden]: two [b, 1, q, width] tensors."""
        if self.kv_mode == "shared":
            c = (self.kv_a_proj if self.is_kv_source else self._kv_source.kv_a_proj)(x)
            return c.unsqueeze(1), c.new_empty(*c.shape[:-1], 0).unsqueeze(1)
        ck = self.k_a_proj(x) if self.k_factored else self.k_proj(x)
        cv = self.v_a_proj(x) if self.v_factored else self.v_proj(x)
        return ck.unsqueeze(1), cv.unsqueeze(1)

    def _up(self, ck, cv):
        """Cached latents [b, 1, T, width] -> K, V [b, kv_heads, T, head_dim] (K before RoPE)."""
        ck, cv = ck.squeeze(1), cv.squeeze(1)
        if self.kv_mode == "shared":
            k, v = self.k_b_proj(ck), self.v_b_proj(ck)
        else:
            k = self.k_b_proj(ck) if self.k_factored else ck
            v = self.v_b_proj(cv) if self.v_factored else cv
        shape = (*ck.shape[:-1], -1, self.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def _key_rope(self, x, position_ids, position_embeddings, total, new):
        """cos/sin for all `total` keys, the last `new` of which are the current tokens."""
        if total == new:
            return position_embeddings
        if position_ids is None:
            key_pos = torch.arange(total, device=x.device)[None]
        else:
            past = torch.arange(total - new, device=position_ids.device) - (total - new)
            key_pos = torch.cat([position_ids[:, :1] + past, position_ids], dim=-1)
        return self._model_rotary_emb(x, position_ids=key_pos)

    def _cache_update(self, cache, ck, cv, kwargs):
        ck, cv = cache.update(ck, cv, self.layer_idx, kwargs=kwargs)
        if type(cache.layers[self.layer_idx]) is not DynamicLayer:
            raise ValueError(
                "latent attention caches its latent in a plain DynamicCache (DynamicLayer); got "
                f"{type(cache.layers[self.layer_idx]).__name__} (static / quantized caches are not supported)"
            )
        return ck, cv

    def _read_group_latent(self, x, cache, kwargs):
        """kv_share "latent", non-source layer: the group latent [b, 1, T, L_g] its source cached in
        this forward; this layer's own slot only gets width-0 keys and values (same length)."""
        source = self._kv_source
        c = source._group_latent
        if c is None:
            raise ValueError(
                f"layer {self.layer_idx} found no latent from its kv source layer {source.layer_idx}: layers of a "
                "shared group must run in order within one forward (gradient checkpointing is not supported)"
            )
        if self.layer_idx == self.kv_group[-1]:
            source._group_latent = None  # the group's last reader: don't keep it past this forward
        if cache is not None:
            empty = x.new_empty(x.shape[0], 1, x.shape[1], 0)
            layer = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
            if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.shape[0] != x.shape[0]:
                # Batch ops (repeat_interleave / select_indices) skip a slot with no elements: only its
                # length matters, so rebuild it at the new batch size.
                layer.keys = layer.values = x.new_empty(x.shape[0], 1, layer.keys.shape[-2], 0)
            self._cache_update(cache, empty, empty, kwargs)
        c = c.to(x.device)
        return c, c[..., :0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query_states = _rope(self._query(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)

        if self.kv_mode is None:  # dense K/V: exactly Llama, ordinary cache
            key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            key_states = _rope(key_states, cos, sin)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        else:
            if self.kv_share == "latent" and not self.is_kv_source:
                ck, cv = self._read_group_latent(hidden_states, cache, kwargs)
            else:
                ck, cv = self._latents(hidden_states)
                if cache is not None:
                    ck, cv = self._cache_update(cache, ck, cv, kwargs)
                if self.kv_share == "latent" and len(self.kv_group) > 1:
                    self._group_latent = ck
            key_states, value_states = self._up(ck, cv)
            k_cos, k_sin = self._key_rope(
                value_states, kwargs.get("position_ids"), position_embeddings, ck.shape[-2], input_shape[-1]
            )
            key_states = _rope(key_states, k_cos, k_sin)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class SurgeryLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: SurgeryLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SurgeryLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SurgeryLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = SurgeryLlamaConfig
    _no_split_modules = ["SurgeryLlamaDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": SurgeryLlamaDecoderLayer,
        "attentions": SurgeryLlamaAttention,
    }


class SurgeryLlamaModel(SurgeryLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: SurgeryLlamaConfig):
        SurgeryLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SurgeryLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        for layer in self.layers:
            # A plain reference (object.__setattr__ skips nn.Module registration), so the rotary
            # embedding stays one child of the model, not a child of every attention.
            object.__setattr__(layer.self_attn, "_model_rotary_emb", self.rotary_emb)
            if not layer.self_attn.is_kv_source:  # likewise the kv group's source attention
                object.__setattr__(layer.self_attn, "_kv_source", self.layers[layer.self_attn.kv_group[0]].self_attn)
        self.post_init()


class SurgeryLlamaForCausalLM(SurgeryLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: SurgeryLlamaConfig):
        SurgeryLlamaPreTrainedModel.__init__(self, config)
        self.model = SurgeryLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        # transformers only warns about missing tensors and initialises them randomly; a factored
        # checkpoint missing any attention tensor is broken, so refuse it.
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if ".self_attn." in k)
        if missing:
            raise ValueError(f"factored checkpoint lacks attention tensors: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        return (model, info) if output_loading_info else model


__all__ = [
    "SurgeryLlamaConfig",
    "SurgeryLlamaForCausalLM",
    "SurgeryLlamaModel",
    "SurgeryLlamaPreTrainedModel",
]
