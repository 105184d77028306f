"""BLIP (v1) text model (MED) on the fused ops: drop-ins for HF ``BlipTextModel`` and ``BlipTextLMHeadModel``.

Same configuration (an HF ``BlipTextConfig``, a ``BlipConfig`` (its ``text_config``), a dict or keywords), same
``state_dict`` keys (``load_state_dict(hf.state_dict(), strict=True)`` works), same forward arguments and
outputs as transformers' classes. Per layer (docs/semantics.md#blip-v1: cross-attention in EVERY layer):

- self-attention: one GEMM against the concatenated q/k/v weights, ``ops.qformer_attention`` with
  ``num_query=0`` and mode "bidirectional" (encoder, ``is_decoder=False``) or "causal" (decoder);
- cross-attention to the image (or, for VQA's decoder, the question) tokens in every layer, through
  ``ops.cross_attention``; the K/V of ALL layers come from one GEMM (:meth:`BlipTextModel.image_kv`) and can be
  shared by several row-sets via ``kv_index`` (ITM's positive and negative pairs, retrieval re-ranking);
  without image input the pass is text-only (the ITC text encoder, BLIP's ``mode="text"``);
- every post-LN epilogue (attention output, cross-attention output, FFN output) is
  ``ops.bias_dropout_add_layernorm``; the q/k/v and image K/V GEMMs keep no concatenated weight for the backward
  (``concat_linear``), and a GELU FFN recomputes its activation in the backward (``gelu_mlp``), as in QFormer.

Generation goes through transformers' own ``GenerationMixin`` (greedy, beam, sampling): the decoder reads and
writes HF's ``EncoderDecoderCache`` (self-attention K/V per step, cross-attention K/V once), under the keyword
transformers uses (``past_key_values`` up to 5.2x, ``cache`` later; both are accepted).

For BLIP pre-training (the encoder and the ``[DEC]`` decoder share every parameter except self-attention):
:func:`share_encoder_decoder` ties a decoder to an encoder the way BLIP's ``tie_encoder_decoder_weights`` does,
after which the encoder's :meth:`~BlipTextModel.image_kv` also serves the decoder (``encoder_kv=``).

Differences from HF, on purpose (as :class:`blipfast.QFormer`): masks are true masks (a row with no allowed
key, e.g. a left-padding row of the causal decoder, outputs 0 where HF averages over all keys; the other rows
are unaffected); masks must be 2-D; ``output_attentions=True`` is refused (the probabilities never exist).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BlipTextConfig, GenerationMixin
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions, CausalLMOutputWithCrossAttentions
from transformers.models.blip.modeling_blip_text import BlipTextPreTrainedModel

from . import layers
from .layers import (DenseLN, ImageKV, Intermediate, LayerPlan, Projections, activation, attention_block, check_config,
                     check_mask, check_unsupported, cross_attention_block, dropout_settings, ffn, gelu_approximate,
                     qkv_projection, run_layers, stacked_kv)

# transformers renamed the cache keyword and output field from `past_key_values` to `cache` (5.2x)
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPoolingAndCrossAttentions.__dataclass_fields__ \
    else "past_key_values"
# keyword arguments HF's forward accepts and ignores (generation passes some of them)
_IGNORED_KWARGS = {"cache_position", "shift_labels", "output_attentions", "output_hidden_states", "return_dict"}
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "encoder_hidden_size")


def _validate(values: dict) -> None:
    check_config("BlipTextConfig", values, _POSITIVE_INTS, unit_floats=("label_smoothing",))


_DEFAULTS: dict = {}


def blip_text_config(config: Any = None, /, **kwargs) -> BlipTextConfig:
    """An HF ``BlipTextConfig`` from a ``BlipTextConfig`` (returned as is when no keyword overrides it), a
    ``BlipConfig`` (its ``text_config``), a dict (e.g. ``config.to_dict()``) or keywords; validated."""
    if not _DEFAULTS:
        _DEFAULTS.update(BlipTextConfig().to_dict())
    if isinstance(config, BlipTextConfig) and not kwargs:
        _validate({**_DEFAULTS, **config.to_dict()})
        return config
    if config is None:
        base = {}
    elif isinstance(config, dict):
        base = dict(config)
    elif hasattr(config, "to_dict"):
        if not isinstance(config, BlipTextConfig) and isinstance(getattr(config, "text_config", None), BlipTextConfig):
            config = config.text_config  # a BlipConfig
        if not hasattr(config, "encoder_hidden_size"):
            raise TypeError(f"BlipTextConfig: expected a BlipTextConfig, a BlipConfig, a dict or keywords, got "
                            f"{type(config).__name__}")
        base = config.to_dict()
    else:
        raise TypeError(f"BlipTextConfig: expected a BlipTextConfig, a BlipConfig, a dict or keywords, got "
                        f"{type(config).__name__}")
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"BlipTextConfig: unknown field(s) {unknown}")
    values = {**_DEFAULTS, **base, **kwargs}
    _validate(values)
    return BlipTextConfig.from_dict({k: v for k, v in values.items() if k != "transformers_version"})


# ----------------------------------------------------------------------------------------------
# modules named like HF's so that the state_dict keys are HF's; forward logic lives in BlipTextModel


class _Attention(nn.Module):  # HF BlipTextAttention: self (query, key, value), output (dense, LayerNorm)
    def __init__(self, cfg: BlipTextConfig, kv_width: int):
        super().__init__()
        self.self = Projections(cfg, kv_width)
        self.output = DenseLN(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class BlipTextLayer(nn.Module):
    """Parameters of one MED layer under HF's names: self-attention, cross-attention (when the config has
    it: HF creates it iff ``config.is_decoder``, as every BLIP checkpoint's text config says), FFN."""

    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden_size)
        if cfg.is_decoder:
            self.crossattention = _Attention(cfg, cfg.encoder_hidden_size)
        self.intermediate = Intermediate(cfg)
        self.output = DenseLN(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Encoder(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BlipTextLayer(cfg) for _ in range(cfg.num_hidden_layers))


class _Pooler(nn.Module):  # HF BlipTextPooler: tanh(dense(h[:, 0]))
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class BlipTextEmbeddings(nn.Module):
    """Word + position embeddings, LayerNorm, dropout (HF ``BlipTextEmbeddings`` names; no token types)."""

    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout_prob

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, past_length: int = 0):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        if position_ids is None:
            if past_length + t > self.position_embeddings.num_embeddings:
                raise ValueError(f"BlipTextModel: {past_length + t} positions exceed max_position_embeddings="
                                 f"{self.position_embeddings.num_embeddings}")
            position_ids = torch.arange(past_length, past_length + t, device=x.device)[None]
        x = x + self.position_embeddings(position_ids)
        x = F.layer_norm(x, x.shape[-1:], self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        return F.dropout(x, self.dropout_p, self.training)


def _mask_2d(who: str, name: str, mask, shape: tuple, device) -> Optional[torch.Tensor]:
    """A 2-D 0/1 (or bool) mask as bool on ``device`` (HF's BLIP models build some masks on the CPU)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.device != device:
        mask = mask.to(device)
    check_mask(name, mask, shape, device, who=who, like="the text input")
    return mask if mask.dtype == torch.bool else mask != 0


def _split_cache(cache):
    if cache is None:
        return None, None
    if isinstance(cache, EncoderDecoderCache):
        return cache.self_attention_cache, cache
    return cache, None


@dataclass
class _Plan(LayerPlan):
    """A :class:`~blipfast.models.layers.LayerPlan` plus the text model's KV ``cache`` (returned) and its
    self-attention part ``self_cache`` (None without a cache)."""

    cache: Any = None
    self_cache: Any = None


class BlipTextModel(nn.Module):
    """The BLIP text model (MED; drop-in for HF ``BlipTextModel``); see the module docstring."""

    def __init__(self, config: Any = None, add_pooling_layer: bool = True, *, init_weights: bool = True, **kwargs):
        """``init_weights=False`` leaves the parameters uninitialised (for a state_dict that is loaded next)."""
        super().__init__()
        cfg = blip_text_config(config, **kwargs)
        self.config = cfg
        device = torch.empty(0).device  # the default device; modules are built on "meta" and initialised once
        with torch.device("meta"):
            self.embeddings = BlipTextEmbeddings(cfg)
            self.encoder = _Encoder(cfg)
            self.pooler = _Pooler(cfg) if add_pooling_layer else None
        self.to_empty(device=device)
        self._act = activation(cfg.hidden_act)
        self._gelu = gelu_approximate(cfg.hidden_act)
        if init_weights:
            layers.init_weights(self, cfg.initializer_range)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "BlipTextModel":
        """A BlipTextModel with the config, weights, dtype and device of an HF ``BlipTextModel``."""
        w = hf_model.embeddings.word_embeddings.weight
        with torch.device(w.device):
            model = cls(hf_model.config, add_pooling_layer=hf_model.pooler is not None, init_weights=False)
        model.to(dtype=w.dtype).load_state_dict(hf_model.state_dict(), strict=True)
        return model.train(hf_model.training)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @property
    def has_cross_attention(self) -> bool:
        return bool(self.config.is_decoder)

    # ------------------------------------------------------------------------------------------
    def image_kv(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask=None) -> ImageKV:
        """Cross-attention K/V of M images (or other encoder sequences) for EVERY layer from one GEMM: an
        :class:`~blipfast.models.ImageKV` of (k, v) [M, Lk, H, D] pairs. Pass it as ``encoder_kv=`` (with
        ``kv_index``) to share it across row-sets and calls; gradients reach ``encoder_hidden_states`` once."""
        cfg = self.config
        if not self.has_cross_attention:
            raise ValueError("BlipTextModel: this model has no cross-attention (its config says is_decoder=False)")
        x = encoder_hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != cfg.encoder_hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"BlipTextModel: encoder_hidden_states must be [M, Lk, {cfg.encoder_hidden_size}], "
                             f"got {got}")
        w = self.encoder.layer[0].crossattention.self.key.weight
        x = x.to(w.dtype)
        mask = _mask_2d("BlipTextModel", "encoder_attention_mask", encoder_attention_mask, x.shape[:2], x.device)
        projs = [layer.crossattention.self for layer in self.encoder.layer]
        h = cfg.num_attention_heads
        return ImageKV(stacked_kv(projs, x, h, cfg.hidden_size // h), mask)

    def _cross_kv(self, bsz, dev, encoder_hidden_states, encoder_attention_mask, encoder_kv, kv_index, cross_cache):
        """(per-layer (k, v), key padding mask) of the cross-attention, or (None, None) for a text-only pass."""
        if encoder_kv is not None and encoder_hidden_states is not None:
            raise ValueError("BlipTextModel: give encoder_hidden_states or encoder_kv, not both")
        cached = cross_cache is not None and cross_cache.is_updated.get(0, False)
        if encoder_kv is None and encoder_hidden_states is None and not cached:
            return None, None
        if not self.has_cross_attention:
            raise ValueError("BlipTextModel: this model has no cross-attention (its config says is_decoder=False), "
                             "so it takes no encoder_hidden_states / encoder_kv")
        if cross_cache is not None and kv_index is not None:
            raise ValueError("BlipTextModel: kv_index cannot be combined with a KV cache (generation reorders the "
                             "cache per row)")
        if cached:  # generation after the first step: HF's layout [B, H, Lk, D] in the cross-attention cache
            layers = cross_cache.cross_attention_cache.layers
            kv = [(layers[i].keys.transpose(1, 2), layers[i].values.transpose(1, 2)) for i in range(len(layers))]
            mask = encoder_attention_mask
        else:
            if encoder_kv is None:
                encoder_kv = self.image_kv(encoder_hidden_states, encoder_attention_mask)
            elif len(encoder_kv) != self.config.num_hidden_layers:
                raise ValueError(f"BlipTextModel: encoder_kv needs one (k, v) per layer "
                                 f"({self.config.num_hidden_layers}), got {len(encoder_kv)}")
            kv = list(encoder_kv)
            mask = encoder_attention_mask if encoder_attention_mask is not None else \
                getattr(encoder_kv, "key_padding_mask", None)
            if cross_cache is not None:
                for i, (k, v) in enumerate(kv):
                    cross_cache.cross_attention_cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
                    cross_cache.is_updated[i] = True
        m, lk = kv[0][0].shape[:2]
        mask = _mask_2d("BlipTextModel", "encoder_attention_mask", mask, (m, lk), dev)
        if kv_index is None and m != bsz:
            raise ValueError(f"BlipTextModel: {m} encoder sequences for {bsz} rows: pass kv_index (long [{bsz}]) to "
                             f"share them")
        if kv_index is not None and (not isinstance(kv_index, torch.Tensor) or kv_index.shape != (bsz,)):
            raise ValueError(f"BlipTextModel: kv_index must be a long tensor of shape [{bsz}]")
        return kv, mask

    # ------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, encoder_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, is_decoder=False, *, cache=None,
                encoder_kv=None, kv_index=None, **kwargs):
        """HF's forward: ``input_ids`` / ``inputs_embeds`` (word embeddings) / ``encoder_embeds`` (finished
        embeddings) [B, T]; ``attention_mask`` [B, P + T] over the cached and new keys (1 = attend);
        ``encoder_hidden_states`` [B, Lk, W] with ``encoder_attention_mask`` [B, Lk] (none: a text-only pass);
        ``is_decoder`` selects the causal mask; ``past_key_values`` / ``cache`` and ``use_cache`` as HF.
        Extras: ``encoder_kv`` (from :meth:`image_kv`) and ``kv_index`` (long [B]: the encoder sequence of each
        row). Returns HF's ``BaseModelOutputWithPoolingAndCrossAttentions``."""
        check_unsupported("BlipTextModel.forward", kwargs, output_attentions, ignored=_IGNORED_KWARGS)
        cache = self._cache(cache, past_key_values, use_cache, is_decoder)
        x, plan = self._plan(input_ids, attention_mask, position_ids, inputs_embeds, encoder_embeds,
                             encoder_hidden_states, encoder_attention_mask, cache, is_decoder, encoder_kv, kv_index)
        x, hidden = run_layers(self.encoder.layer, x, plan, self._layer, output_hidden_states)
        pooled = None
        if self.pooler is not None:
            pooled = torch.tanh(F.linear(x[:, 0], self.pooler.dense.weight, self.pooler.dense.bias))
        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=x, pooler_output=pooled,
                                                           hidden_states=hidden, **{CACHE_FIELD: cache})
        return out if return_dict is None or return_dict else out.to_tuple()

    def _cache(self, cache, past_key_values, use_cache, is_decoder: bool):
        """The KV cache of this call (``cache`` or ``past_key_values``; a new one when the decoder uses a cache and
        none is given), or None."""
        cfg = self.config
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("BlipTextModel.forward: give the KV cache as cache or past_key_values, not both")
        cache = cache if cache is not None else past_key_values
        if is_decoder:
            use_cache = cfg.use_cache if use_cache is None else use_cache
        else:
            if cache is not None:
                raise ValueError("BlipTextModel.forward: a KV cache is only used by the decoder (is_decoder=True)")
            use_cache = False
        if use_cache:  # HF's BlipTextEncoder: the model is encoder-decoder in all but name
            if cache is None:
                cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))
            elif not isinstance(cache, EncoderDecoderCache):
                cache = EncoderDecoderCache(cache, DynamicCache(config=cfg))
        return cache

    def _plan(self, input_ids, attention_mask, position_ids, inputs_embeds, encoder_embeds, encoder_hidden_states,
              encoder_attention_mask, cache, is_decoder: bool, encoder_kv, kv_index) -> tuple:
        """(the embeddings [B, T, d], the :class:`_Plan` of the layers): :meth:`forward`'s arguments checked and
        resolved once (the image K/V computed from ``encoder_hidden_states`` or read from the cache)."""
        cfg = self.config
        self_cache, cross_cache = _split_cache(cache)
        past = self_cache.get_seq_length() if self_cache is not None else 0
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("BlipTextModel.forward: you cannot specify both input_ids and inputs_embeds")
        if encoder_embeds is not None:
            x = encoder_embeds
        elif input_ids is not None or inputs_embeds is not None:
            if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
                raise ValueError("BlipTextModel.forward: input_ids must be a [B, T] tensor")
            x = self.embeddings(input_ids, position_ids, inputs_embeds, past)
        else:
            raise ValueError("BlipTextModel.forward: give input_ids, inputs_embeds or encoder_embeds")
        if x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"BlipTextModel.forward: embeddings must be [B, T, {cfg.hidden_size}], got {list(x.shape)}")
        bsz, seq, _ = x.shape
        kpm = _mask_2d("BlipTextModel", "attention_mask", attention_mask, (bsz, past + seq), x.device)
        ekv, ekpm = self._cross_kv(bsz, x.device, encoder_hidden_states, encoder_attention_mask, encoder_kv, kv_index,
                                   cross_cache)
        p_hid, p_att, sites = dropout_settings(cfg, self.training, sites_per_layer=5 if ekv is not None else 3)
        return x, _Plan(mode="causal" if is_decoder else "bidirectional", num_query=0, attention_mask=kpm,
                        p_hid=p_hid, p_att=p_att, dropout_sites=sites,
                        cross_kv=dict(enumerate(ekv)) if ekv is not None else {}, kv_index=kv_index,
                        encoder_mask=ekpm, cache=cache, self_cache=self_cache)

    def _layer(self, i: int, layer: BlipTextLayer, x: torch.Tensor, plan: _Plan, seeds) -> torch.Tensor:
        """One MED layer: self-attention (over the cached keys too when decoding), cross-attention when the pass
        has encoder input, FFN."""
        h = self.config.num_attention_heads
        q, k, v = qkv_projection(layer.attention.self, x, h, x.shape[-1] // h)
        if plan.self_cache is not None:  # HF's layout [B, H, L, D] in the cache
            k, v = plan.self_cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        x = attention_block(layer.attention.output, x, q, k, v, plan, seeds, num_query=plan.num_query, mode=plan.mode,
                            key_padding_mask=plan.attention_mask)
        if i in plan.cross_kv:
            ca = layer.crossattention
            x = cross_attention_block(ca.self, ca.output, x, plan.cross_kv[i], h, plan, seeds)
        return ffn(self._act, self._gelu, layer.intermediate, layer.output, x, plan.p_hid, next(seeds, None))


def share_encoder_decoder(encoder: BlipTextModel, decoder: BlipTextModel) -> None:
    """Make ``decoder`` share every parameter except self-attention (``attention.*``) with ``encoder``, as BLIP's
    pre-training does (``tie_encoder_decoder_weights(..., skip_key="/attention")``): the embeddings, and per
    layer the cross-attention and the FFN become the encoder's modules (the same ``nn.Parameter`` objects).
    Afterwards ``encoder.image_kv(images)`` is also the decoder's cross-attention K/V."""
    if not isinstance(encoder, BlipTextModel) or not isinstance(decoder, BlipTextModel):
        raise TypeError("share_encoder_decoder: encoder and decoder must be blipfast BlipTextModel instances "
                        "(for a BlipTextLMHeadModel pass its .bert)")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "encoder_hidden_size",
                 "max_position_embeddings", "is_decoder"):
        if getattr(encoder.config, name) != getattr(decoder.config, name):
            raise ValueError(f"share_encoder_decoder: the configs differ in {name}")
    decoder.embeddings = encoder.embeddings
    for enc, dec in zip(encoder.encoder.layer, decoder.encoder.layer):
        if hasattr(enc, "crossattention"):
            dec.crossattention = enc.crossattention
        dec.intermediate = enc.intermediate
        dec.output = enc.output


# ----------------------------------------------------------------------------------------------
# LM head model (a transformers PreTrainedModel, so that transformers' generation utilities drive it)


class _Transform(nn.Module):  # HF BlipTextPredictionHeadTransform: dense, LayerNorm
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _Predictions(nn.Module):  # HF BlipTextLMPredictionHead: transform, decoder, bias
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.transform = _Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class _MLMHead(nn.Module):  # HF BlipTextOnlyMLMHead: predictions
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.predictions = _Predictions(cfg)


def _keep_last(h: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """HF's ``logits_to_keep``: 0 keeps all positions, n > 0 the last n, a tensor indexes the positions."""
    if isinstance(logits_to_keep, int):
        return h if logits_to_keep == 0 else h[:, -logits_to_keep:]
    return h[:, logits_to_keep]


class BlipTextLMHeadModel(BlipTextPreTrainedModel, GenerationMixin):
    """The BLIP text decoder with its LM head (drop-in for HF ``BlipTextLMHeadModel``: ``bert.*`` and ``cls.*``
    keys, the decoder weight tied to the word embeddings, label-smoothed LM loss, ``generate``)."""

    _tied_weights_keys = {
        "cls.predictions.decoder.bias": "cls.predictions.bias",
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    }

    def __init__(self, config: Any = None, **kwargs):
        cfg = blip_text_config(config, **kwargs)
        super().__init__(cfg)
        self.bert = BlipTextModel(cfg, add_pooling_layer=False, init_weights=False)
        self.cls = _MLMHead(cfg)
        self.label_smoothing = cfg.label_smoothing
        self._act = activation(cfg.hidden_act)
        self.post_init()  # transformers' initialisation and weight tying

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "BlipTextLMHeadModel":
        """A BlipTextLMHeadModel with the config, weights, dtype and device of an HF ``BlipTextLMHeadModel``."""
        w = hf_model.bert.embeddings.word_embeddings.weight
        with torch.device(w.device):
            model = cls(hf_model.config)
        model.to(dtype=w.dtype).load_state_dict(hf_model.state_dict(), strict=True)
        return model.train(hf_model.training)

    def get_input_embeddings(self):
        return self.bert.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.bert.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head: decoder(LayerNorm(act(dense(h))))."""
        p = self.cls.predictions
        t = p.transform
        y = self._act(F.linear(hidden_states, t.dense.weight, t.dense.bias))
        y = F.layer_norm(y, y.shape[-1:], t.LayerNorm.weight, t.LayerNorm.bias, t.LayerNorm.eps)
        return F.linear(y, p.decoder.weight, p.decoder.bias)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, past_key_values=None,
                use_cache=None, return_logits=False, is_decoder=True, reduction="mean", logits_to_keep=0, *,
                cache=None, encoder_kv=None, kv_index=None, return_dict=None, output_hidden_states=None, **kwargs):
        """HF's forward; ``labels`` [B, T] give the next-token loss (shifted by one, -100 ignored, label smoothing
        ``config.label_smoothing``; ``reduction="none"`` sums per sequence). Extras as :class:`BlipTextModel`."""
        shift_labels = kwargs.pop("shift_labels", None)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"BlipTextLMHeadModel: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if labels is not None:
            use_cache = False
        out = self.bert(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values, cache=cache,
                        use_cache=use_cache, is_decoder=is_decoder, output_hidden_states=output_hidden_states,
                        encoder_kv=encoder_kv, kv_index=kv_index, **kwargs)
        logits = self.logits(_keep_last(out.last_hidden_state, logits_to_keep))
        if return_logits:
            return logits[:, :-1].contiguous()
        loss = None
        if labels is not None:
            if shift_labels is None:
                scores, target = logits[:, :-1], labels[:, 1:]
            else:
                scores, target = logits, shift_labels
            loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1).to(scores.device),
                                   reduction=reduction, label_smoothing=self.label_smoothing)
            if reduction == "none":
                loss = loss.view(logits.shape[0], -1).sum(1)
        res = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                                **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return res if return_dict is None or return_dict else res.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, *args, **model_kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **model_kwargs)
        inputs["is_decoder"] = True  # as HF's: the decoder is causal
        return inputs
