"""Factored ("latent") attention for the non-Llama families written by ``surgery-convert --emit factored``:
Qwen2 (``Qwen2ForCausalLM``), Qwen3 (``Qwen3ForCausalLM``), Gemma 2 (``Gemma2ForCausalLM``), Gemma 3
text (``Gemma3ForCausalLM``, config ``Gemma3TextConfig``) and Phi-3 (``Phi3ForCausalLM``).

The format and the loading algorithm are those of docs/factored-format.md (the Llama reference
loader, ``modeling_surgery_llama.py``, is written next to this file and imported from it); this
docstring lists what differs per family. Load with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (written against
transformers 5.24; imports only ``torch`` and ``transformers``).

``config.json``
---------------
The original config, every key kept, plus ``latent_attention`` exactly as in the Llama format
(versions 1 and 2) with ``original_architectures`` / ``original_model_type`` naming the family, and::

    "architectures": ["SurgeryQwen2ForCausalLM"],   # SurgeryQwen3 / SurgeryGemma2 / SurgeryGemma3 /
                                                    # SurgeryPhi3ForCausalLM
    "model_type": "surgery_qwen2",                  # surgery_qwen3 / surgery_gemma2 / surgery_gemma3 / surgery_phi3
    "auto_map": {"AutoConfig": "modeling_surgery.SurgeryQwen2Config",
                 "AutoModelForCausalLM": "modeling_surgery.SurgeryQwen2ForCausalLM"},

(``original_model_type`` is ``"gemma3_text"`` for Gemma 3; ``SurgeryGemma3Config`` is a
``Gemma3TextConfig``.)

Tensors
-------
As in the Llama format, except biases. Qwen2 has biases on ``q_proj`` / ``k_proj`` / ``v_proj``
(always; ``o_proj`` has none), Qwen3 and Gemma on all four iff ``attention_bias``. A projection left
dense keeps its ``*_proj.bias``; a factored projection's bias sits on its up-projection (``q_b_proj.bias [q_dim]``,
``k_b_proj.bias`` / ``v_b_proj.bias [kv_dim]``, also with ``kv == "shared"`` and, with version-2
sharing, on every layer's own ``k_b`` / ``v_b``): ``y = b @ (a @ x) + bias``, so the cache still
holds only the latent. Down-projections (``*_a_proj``) never have a bias. Qwen3's
``self_attn.q_norm.weight`` / ``k_norm.weight [head_dim]`` are kept: q_norm normalises each head of the
query after its (up-)projection, k_norm each head of K after its up-projection from the cached
latent, both before RoPE, as ``Qwen3Attention`` does; Gemma 3's (``Gemma3RMSNorm``, scaling by
``1 + w``) likewise. Gemma's four layer norms per layer are the stock ones, untouched.

Gemma
-----
The attention scales scores by ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``). Gemma 2
passes ``softcap=config.attn_logit_softcapping`` to the attention function; its stock model runs
``eager`` (it does not support sdpa), and since the Llama forward reused here would pick Llama's
eager function, which ignores ``softcap``, a Gemma 2 attention sees ``eager`` as Gemma 2's own eager
function, registered in transformers' ``AttentionInterface`` as ``surgery_eager_SurgeryGemma2Attention``
(stock Gemma 3 passes no ``softcap``, whatever its config says, and neither does this module). Gemma 3
has one rope per layer type (``rope_parameters`` keyed by layer type): RoPE of the cached keys is
recomputed with the layer's own type. Embedding scaling by ``sqrt(hidden_size)``, final-logit
softcapping and the masks are the stock models' forwards.

Phi-3
-----
The dense checkpoint fuses q, k and v in ``self_attn.qkv_proj`` (rows q | k | v); the factored one
stores them apart, as in the Llama format: ``q_proj`` (dense) or ``q_a_proj`` / ``q_b_proj``, and the
K/V tensors of its ``kv`` layout (dense ``k_proj`` / ``v_proj`` when only q is factored). No biases,
no head norms; ``o_proj``, the fused ``mlp.gate_up_proj`` and everything else are the stock
``Phi3DecoderLayer``'s. RoPE is Phi-3's partial rotary (``rope_parameters["partial_rotary_factor"]``:
only the first ``rotary_dim`` values of each head rotate), on q and on K after the up-projection from
the cached latent (a longrope config's cached keys are re-roped with the current positions' factors;
``generate`` drops the cache where they switch, as stock Phi-3's ``prepare_inputs_for_generation`` does).
With ``config.sliding_window`` set, every layer slides (Phi-3 has no ``layer_types``).

Sliding window
--------------
A layer whose ``config.layer_types[i]`` is ``"sliding_attention"`` passes
``sliding_window=config.sliding_window`` to the attention function and gets the stock sliding mask
(the models are the stock ``Qwen2Model`` / ``Qwen3Model``, whose forward builds the masks). The cache
``generate`` builds (``DynamicCache(config=...)``) gives such a layer a ``DynamicSlidingWindowLayer``:
it then keeps the latents of the last ``sliding_window - 1`` tokens, as the stock cache keeps K and
V; their RoPE positions are still the ones just before the new tokens. With ``kv_share == "latent"``
a sliding-window layer may read the latent of a full-attention source (it attends to the last
tokens its mask covers); a full-attention layer reading a sliding-window source is refused (the
source's cache would not hold the tokens it needs).

Everything else (MLP, norms, rotary embedding, tied embeddings, masks) is the stock family's.

Structure (for adding families)
-------------------------------
A family is five small classes: a config (``LatentConfigMixin`` + the stock config), an attention
(``SurgeryFamilyAttention``: which projections have biases, an optional per-head norm class, the
attention-function keyword arguments, optionally the family's own eager attention function), a
pre-trained base (``_can_record_outputs``), a model (``SurgeryFamilyModelMixin`` + the stock model:
the stock one with its attentions replaced; ``rotary_for`` picks the rotary embedding an attention
recomputes key positions with) and a causal LM (``SurgeryFamilyForCausalLMMixin`` + the stock one).
"""

import functools

from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, PreTrainedModel
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    Gemma2PreTrainedModel,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager_attention
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3PreTrainedModel,
    Gemma3RMSNorm,
    Gemma3TextModel,
)
from transformers.models.phi3.configuration_phi3 import Phi3Config
from transformers.models.phi3.modeling_phi3 import (
    Phi3DecoderLayer,
    Phi3ForCausalLM,
    Phi3Model,
    Phi3PreTrainedModel,
)
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import eager_attention_forward as phi3_eager_attention
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
)
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3PreTrainedModel,
    Qwen3RMSNorm,
)

from .modeling_surgery_llama import SurgeryLlamaAttention, SurgeryLlamaConfig

SLIDING = "sliding_attention"


# --- shared pieces ----------------------------------------------------------------------------------


class LatentConfigMixin:
    """``latent_attention`` validation for a stock family config (put it first among the bases, and
    declare ``latent_attention: dict | None = None`` on the config class itself: only a dataclass's
    own annotations become fields). The checks are SurgeryLlamaConfig's, plus the layer types."""

    _check_latent_attention = SurgeryLlamaConfig._check_latent_attention
    _check_kv_groups = SurgeryLlamaConfig._check_kv_groups

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_latent_attention()
        self._check_group_layer_types()

    def _check_group_layer_types(self):
        la = self.latent_attention or {}
        types = getattr(self, "layer_types", None)
        if la.get("kv_share") != "latent" or not types:
            return
        for group in la.get("kv_groups") or ():
            for layer in group[1:]:
                if types[group[0]] == SLIDING and types[layer] != SLIDING:
                    raise ValueError(
                        f"latent_attention: layer {layer} ({types[layer]}) cannot read the latent of its kv source "
                        f"layer {group[0]} ({SLIDING}: its cache keeps only the last sliding_window - 1 tokens)"
                    )


class _ConfigView:
    """Read-only view of a config with some attributes replaced."""

    def __init__(self, config, **overrides):
        self.__dict__.update(overrides, _config=config)

    def __getattr__(self, name):
        if name == "_config" or name.startswith("__"):  # unset while copy / pickle rebuild a view
            raise AttributeError(name)
        return getattr(self._config, name)


class _EagerConfigView(_ConfigView):
    """The config as an attention with its own eager function sees it: ``eager`` stands for that
    function's name in the AttentionInterface (``_eager``); other implementations pass through."""

    @property
    def _attn_implementation(self):
        implementation = self._config._attn_implementation
        return self._eager if implementation == "eager" else implementation


def _normalise_heads(module, args, output, *, norm, head_dim):
    """Forward hook: ``norm`` over each head of a projection's output ``[..., heads * head_dim]``."""
    return norm(output.unflatten(-1, (-1, head_dim))).flatten(-2)


class SurgeryFamilyAttention(SurgeryLlamaAttention):
    """SurgeryLlamaAttention (factored projections, latent cache, cross-layer sharing) with what the
    other families add: biases, per-head q/k norms, sliding-window layers."""

    head_norm_class = None  # a norm class: q_norm / k_norm over each head (Qwen3, Gemma3)
    # The family's eager attention function where Llama's will not do (a staticmethod; Gemma2's
    # softcaps the scores), run whenever the model's attention implementation is "eager".
    eager_attention = None

    def biased_projections(self, config) -> tuple[str, ...]:
        """Which of "q", "k", "v", "o" have a bias in the stock family (by default all four iff
        ``attention_bias``)."""
        return ("q", "k", "v", "o") if getattr(config, "attention_bias", False) else ()

    def __init__(self, config, layer_idx: int):
        # Llama builds every projection without bias (and would read config.attention_bias, which
        # Qwen2 lacks); this family's biases and head norms are added on the output modules.
        super().__init__(_ConfigView(config, attention_bias=False), layer_idx)
        self.config = config
        if self.eager_attention is not None:
            name = f"surgery_eager_{type(self).__name__}"
            AttentionInterface.register(name, self.eager_attention)
            self.config = _EagerConfigView(config, _eager=name)
        self.layer_type = config.layer_types[layer_idx] if getattr(config, "layer_types", None) else None
        self.sliding_window = config.sliding_window if self.layer_type == SLIDING else None
        self._add_biases(self.biased_projections(config))
        if self.head_norm_class is not None:
            self._add_head_norms(config.rms_norm_eps)

    def _output_name(self, p: str) -> str:
        """The module whose output is the whole q / k / v / o: ``{p}_proj`` if dense, else
        ``{p}_b_proj`` (also with a shared K/V latent)."""
        return f"{p}_proj" if hasattr(self, f"{p}_proj") else f"{p}_b_proj"

    def _add_biases(self, projections):
        for p in projections:
            name = self._output_name(p)
            old = getattr(self, name)
            setattr(self, name, nn.Linear(old.in_features, old.out_features, bias=True))

    def _add_head_norms(self, eps: float):
        """q_norm / k_norm, applied per head to the output of the module producing Q / K (whichever
        it is: dense, up-projection from the cached latent) by a forward hook, before RoPE."""
        for p in ("q", "k"):
            norm = self.head_norm_class(self.head_dim, eps=eps)
            setattr(self, f"{p}_norm", norm)
            hook = functools.partial(_normalise_heads, norm=norm, head_dim=self.head_dim)
            getattr(self, self._output_name(p)).register_forward_hook(hook)

    def attention_kwargs(self) -> dict:
        """Extra keyword arguments of the attention function (as the stock family's attention)."""
        return {"sliding_window": self.sliding_window}

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        kwargs.update(self.attention_kwargs())
        return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)

    def _cache_update(self, cache, ck, cv, kwargs):
        # Llama accepts only plain DynamicLayer slots; DynamicCache(config=...) gives sliding-window
        # layers a DynamicSlidingWindowLayer, which keeps the last sliding_window - 1 latents.
        slot = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
        if type(slot) is DynamicSlidingWindowLayer:
            return cache.update(ck, cv, self.layer_idx, kwargs=kwargs)
        return super()._cache_update(cache, ck, cv, kwargs)

    def _read_group_latent(self, x, cache, kwargs):
        c, cv = super()._read_group_latent(x, cache, kwargs)
        slot = cache.layers[self.layer_idx] if cache is not None else None
        if isinstance(slot, DynamicSlidingWindowLayer):
            # A sliding-window slot sizes this layer's mask: keep the latents of the tokens it covers
            # (a full-attention source holds more).
            keep = slot.sliding_window - 1 + x.shape[1]
            c, cv = c[..., -keep:, :], cv[..., -keep:, :]
        return c, cv


class SurgeryFamilyModelMixin:
    """The stock family model (embeddings, decoder layers, norms, rotary embedding, and the forward
    that builds the full and sliding-window masks) with each layer's attention replaced by
    ``attention_class``. (The stock attentions are built first and dropped: on the meta device in
    ``from_pretrained``, so free there.)"""

    attention_class = None

    def __init__(self, config):
        super().__init__(config)
        for layer_idx, layer in enumerate(self.layers):
            layer.self_attn = self.attention_class(config, layer_idx)
        self._link_attention()
        self.post_init()

    def rotary_for(self, attention):
        """What ``attention`` calls as ``rotary(x, position_ids=...)`` for the cos / sin of its keys."""
        return self.rotary_emb

    def _link_attention(self):
        """Plain references (not children): each attention's rotary embedding and kv source."""
        attention = [layer.self_attn for layer in self.layers]
        for attn in attention:
            object.__setattr__(attn, "_model_rotary_emb", self.rotary_for(attn))
            if not attn.is_kv_source:
                object.__setattr__(attn, "_kv_source", attention[attn.kv_group[0]])


class SurgeryFamilyForCausalLMMixin:
    """The stock causal LM around ``model_class``; ``from_pretrained`` refuses a checkpoint that lacks
    any attention tensor (transformers would only warn and initialise it randomly)."""

    model_class = None

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        absent = sorted(key for key in info.get("missing_keys", ()) if ".self_attn." in key)
        if absent:
            more = " ..." if len(absent) > 6 else ""
            raise ValueError(f"factored checkpoint lacks attention tensors: {absent[:6]}{more}")
        return (model, info) if output_loading_info else model


# --- Qwen2 ------------------------------------------------------------------------------------------


class SurgeryQwen2Config(LatentConfigMixin, Qwen2Config):
    """``Qwen2Config`` plus the ``latent_attention`` description of the factored projections."""

    model_type = "surgery_qwen2"

    latent_attention: dict | None = None


class SurgeryQwen2Attention(SurgeryFamilyAttention):
    def biased_projections(self, config):
        return ("q", "k", "v")


class SurgeryQwen2PreTrainedModel(Qwen2PreTrainedModel):
    config_class = SurgeryQwen2Config
    _can_record_outputs = {"hidden_states": Qwen2DecoderLayer, "attentions": SurgeryQwen2Attention}


class SurgeryQwen2Model(SurgeryFamilyModelMixin, SurgeryQwen2PreTrainedModel, Qwen2Model):
    attention_class = SurgeryQwen2Attention


class SurgeryQwen2ForCausalLM(SurgeryFamilyForCausalLMMixin, SurgeryQwen2PreTrainedModel, Qwen2ForCausalLM):
    model_class = SurgeryQwen2Model


# --- Qwen3 ------------------------------------------------------------------------------------------


class SurgeryQwen3Config(LatentConfigMixin, Qwen3Config):
    """``Qwen3Config`` plus the ``latent_attention`` description of the factored projections."""

    model_type = "surgery_qwen3"

    latent_attention: dict | None = None


class SurgeryQwen3Attention(SurgeryFamilyAttention):
    head_norm_class = Qwen3RMSNorm


class SurgeryQwen3PreTrainedModel(Qwen3PreTrainedModel):
    config_class = SurgeryQwen3Config
    _can_record_outputs = {"hidden_states": Qwen3DecoderLayer, "attentions": SurgeryQwen3Attention}


class SurgeryQwen3Model(SurgeryFamilyModelMixin, SurgeryQwen3PreTrainedModel, Qwen3Model):
    attention_class = SurgeryQwen3Attention


class SurgeryQwen3ForCausalLM(SurgeryFamilyForCausalLMMixin, SurgeryQwen3PreTrainedModel, Qwen3ForCausalLM):
    model_class = SurgeryQwen3Model


# --- Gemma 2 and Gemma 3 -----------------------------------------------------------------------------


class SurgeryGemmaAttention(SurgeryFamilyAttention):
    """What Gemma 2 and 3 change in Llama's attention: the scaling, and a causal flag read from
    ``use_bidirectional_attention`` (the masks themselves come from the stock model)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.is_causal = not getattr(config, "use_bidirectional_attention", False)


class SurgeryGemma2Config(LatentConfigMixin, Gemma2Config):
    """``Gemma2Config`` plus the ``latent_attention`` description of the factored projections."""

    model_type = "surgery_gemma2"

    latent_attention: dict | None = None


class SurgeryGemma2Attention(SurgeryGemmaAttention):
    eager_attention = staticmethod(gemma2_eager_attention)  # Llama's ignores softcap

    def attention_kwargs(self):
        return {**super().attention_kwargs(), "softcap": self.config.attn_logit_softcapping}


class SurgeryGemma2PreTrainedModel(Gemma2PreTrainedModel):
    config_class = SurgeryGemma2Config
    _can_record_outputs = {"hidden_states": Gemma2DecoderLayer, "attentions": SurgeryGemma2Attention}


class SurgeryGemma2Model(SurgeryFamilyModelMixin, SurgeryGemma2PreTrainedModel, Gemma2Model):
    attention_class = SurgeryGemma2Attention


class SurgeryGemma2ForCausalLM(SurgeryFamilyForCausalLMMixin, SurgeryGemma2PreTrainedModel, Gemma2ForCausalLM):
    model_class = SurgeryGemma2Model


class SurgeryGemma3Config(LatentConfigMixin, Gemma3TextConfig):
    """``Gemma3TextConfig`` plus the ``latent_attention`` description of the factored projections."""

    model_type = "surgery_gemma3"

    latent_attention: dict | None = None


class SurgeryGemma3Attention(SurgeryGemmaAttention):
    head_norm_class = Gemma3RMSNorm


class SurgeryGemma3PreTrainedModel(Gemma3PreTrainedModel):
    config_class = SurgeryGemma3Config
    _can_record_outputs = {"hidden_states": Gemma3DecoderLayer, "attentions": SurgeryGemma3Attention}


class SurgeryGemma3Model(SurgeryFamilyModelMixin, SurgeryGemma3PreTrainedModel, Gemma3TextModel):
    attention_class = SurgeryGemma3Attention

    def rotary_for(self, attention):
        # One rotary embedding holding each layer type's frequencies: this layer's type.
        return functools.partial(self.rotary_emb, layer_type=attention.layer_type)


class SurgeryGemma3ForCausalLM(SurgeryFamilyForCausalLMMixin, SurgeryGemma3PreTrainedModel, Gemma3ForCausalLM):
    model_class = SurgeryGemma3Model


# --- Phi-3 ------------------------------------------------------------------------------------------


def _phi3_rope(x, cos, sin):
    """Phi-3's partial RoPE of x [b, heads, T, head_dim]: its own apply_rotary_pos_emb, the key
    argument given no heads (so only x is computed)."""
    return phi3_apply_rotary_pos_emb(x, x[:, :0], cos, sin)[0]


class SurgeryPhi3Config(LatentConfigMixin, Phi3Config):
    """``Phi3Config`` plus the ``latent_attention`` description of the factored projections."""

    model_type = "surgery_phi3"

    latent_attention: dict | None = None


class SurgeryPhi3Attention(SurgeryFamilyAttention):
    """Phi3Attention with ``qkv_proj`` split into q (dense or factored) and the K/V factors: Llama's
    factored forward with Phi-3's partial RoPE, every layer sliding iff ``config.sliding_window``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window  # Phi3Attention passes it on every layer
        self.layer_type = SLIDING if config.sliding_window is not None else None

    def biased_projections(self, config):
        return ()

    def _kv_latents(self, x, cache, kwargs):
        """The (cached) latents [b, 1, T, width] this layer attends with, as Llama's forward gets them."""
        if self.kv_share == "latent" and not self.is_kv_source:
            return self._read_group_latent(x, cache, kwargs)
        ck, cv = self._latents(x)
        if cache is not None:
            ck, cv = self._cache_update(cache, ck, cv, kwargs)
        if self.kv_share == "latent" and len(self.kv_group) > 1:
            self._group_latent = ck
        return ck, cv

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        kwargs.update(self.attention_kwargs())
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query_states = _phi3_rope(self._query(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
        if self.kv_mode is None:  # dense K/V: exactly Phi-3, ordinary cache
            key_states = _phi3_rope(self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        else:
            ck, cv = self._kv_latents(hidden_states, cache, kwargs)
            key_states, value_states = self._up(ck, cv)
            k_cos, k_sin = self._key_rope(
                value_states, kwargs.get("position_ids"), position_embeddings, ck.shape[-2], input_shape[-1]
            )
            key_states = _phi3_rope(key_states, k_cos, k_sin)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, phi3_eager_attention
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


class SurgeryPhi3PreTrainedModel(Phi3PreTrainedModel):
    config_class = SurgeryPhi3Config
    _can_record_outputs = {"hidden_states": Phi3DecoderLayer, "attentions": SurgeryPhi3Attention}


class SurgeryPhi3Model(SurgeryFamilyModelMixin, SurgeryPhi3PreTrainedModel, Phi3Model):
    attention_class = SurgeryPhi3Attention


class SurgeryPhi3ForCausalLM(SurgeryFamilyForCausalLMMixin, SurgeryPhi3PreTrainedModel, Phi3ForCausalLM):
    model_class = SurgeryPhi3Model


__all__ = [
    "SurgeryGemma2Config",
    "SurgeryGemma2ForCausalLM",
    "SurgeryGemma2Model",
    "SurgeryGemma2PreTrainedModel",
    "SurgeryGemma3Config",
    "SurgeryGemma3ForCausalLM",
    "SurgeryGemma3Model",
    "SurgeryGemma3PreTrainedModel",
    "SurgeryPhi3Config",
    "SurgeryPhi3ForCausalLM",
    "SurgeryPhi3Model",
    "SurgeryPhi3PreTrainedModel",
    "SurgeryQwen2Config",
    "SurgeryQwen2ForCausalLM",
    "SurgeryQwen2Model",
    "SurgeryQwen2PreTrainedModel",
    "SurgeryQwen3Config",
    "SurgeryQwen3ForCausalLM",
    "SurgeryQwen3Model",
    "SurgeryQwen3PreTrainedModel",
]
