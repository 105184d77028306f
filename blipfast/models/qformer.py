"""blipfast.QFormer: a drop-in for Hugging Face's ``Blip2QFormerModel`` built on the fused ops.

Same constructor argument (an HF ``Blip2QFormerConfig``, a dict or keywords), same ``state_dict`` keys
(``load_state_dict(hf.state_dict(), strict=True)`` works), same forward arguments and outputs
(``last_hidden_state``, ``pooler_output = last_hidden_state[:, 0]``, ``out[0]``). Per layer:

- self-attention: one GEMM against the query/key/value weights (``concat_linear``: no weight copy kept); q, k, v are strided views
  of its [B, L, 3, H, D] output, fed to ``ops.qformer_attention`` with the mode and the key padding mask;
- cross-attention (layers ``i % cross_attention_frequency == 0``) on the query rows only, through
  ``ops.cross_attention``; the image K/V of every cross layer come from ONE GEMM (``image_kv``) and can be
  shared by several row-sets via ``kv_index`` (ITM's 3B sequences, retrieval re-ranking);
- query FFN on positions [0, Q), text FFN on [Q, L) (every row in a text-only pass, query_length = 0);
- every post-LN epilogue is ``ops.bias_dropout_add_layernorm`` (the GEMM runs without bias, the epilogue adds it).

Beyond HF (keyword-only): ``mode`` ("bidirectional" | "causal" | "unimodal", docs/semantics.md#stage-1-attention-masks),
``return_query_kv`` (per-layer self-attention K/V of the query rows, not detached, for ITG; with
``past_query_kv``, the past K/V extended by the input rows': an incremental-decoding cache),
``past_query_kv`` (the ITG pass: T text rows over cached query K/V + their own K/V), ``encoder_kv`` /
``kv_index`` (shared image K/V). Differences from HF, on purpose: masks are true masks (a disallowed key gets
exactly zero weight; HF adds a large finite negative, which matters only for a row with no allowed key:
blipfast outputs 0 there); ``attention_mask`` must be 2-D [B, keys]; ``query_length`` must lie in [0, L] (HF
silently clamps it); ``output_attentions=True`` is refused (the fused attention never materialises the
probabilities). Unlike transformers 5.x, a padded ``encoder_attention_mask`` also works when text rows are
present (HF builds that mask over all L rows and fails on the Q query rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from . import layers
from .layers import (DenseLN, ImageKV, Intermediate, LayerPlan, Projections, activation, attention_block, check_config,
                     check_mask, check_unsupported, cross_attention_block, dropout_settings, ffn, gelu_approximate,
                     qkv_projection, run_layers, stacked_kv)
from .. import ops

# field -> default: the fields of HF's Blip2QFormerConfig that change the Q-Former (same names, same defaults)
_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 1408,
    "use_qformer_text_input": False,
}
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "cross_attention_frequency", "encoder_hidden_size")


class QFormerConfig:
    """Configuration of :class:`QFormer` with the field names and defaults of HF ``Blip2QFormerConfig``.

    ``QFormerConfig(hf_config)`` copies the fields of a ``Blip2QFormerConfig`` (a ``Blip2Config`` gives its
    ``qformer_config``), ``QFormerConfig({...})`` those of a dict (other keys of an HF config dict are ignored),
    and keywords override both; an unknown keyword is a TypeError, an invalid value a ValueError.
    """

    def __init__(self, config: Any = None, /, **kwargs):
        values = dict(_DEFAULTS)
        if isinstance(config, QFormerConfig):
            values.update(config.to_dict())
        elif isinstance(config, dict):
            values.update({k: v for k, v in config.items() if k in _DEFAULTS})
        elif config is not None:
            if hasattr(config, "qformer_config") and not hasattr(config, "cross_attention_frequency"):
                config = config.qformer_config  # a Blip2Config
            if not hasattr(config, "hidden_size"):
                raise TypeError(f"QFormerConfig: expected a Blip2QFormerConfig, a dict or keywords, got "
                                f"{type(config).__name__}")
            values.update({k: getattr(config, k) for k in _DEFAULTS if hasattr(config, k)})
        unknown = sorted(set(kwargs) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"QFormerConfig: unknown field(s) {unknown}; known: {sorted(_DEFAULTS)}")
        values.update(kwargs)
        for k, v in values.items():
            object.__setattr__(self, k, v)
        self._validate()

    def _validate(self) -> None:
        check_config("QFormerConfig", self.to_dict(), _POSITIVE_INTS)
        if not isinstance(self.use_qformer_text_input, bool):
            raise ValueError(f"QFormerConfig: use_qformer_text_input must be a bool, got "
                             f"{self.use_qformer_text_input!r}")

    def __setattr__(self, name, value):
        if name not in _DEFAULTS:
            raise AttributeError(f"QFormerConfig has no field {name!r}")
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self._validate()
        except ValueError:
            object.__setattr__(self, name, old)
            raise

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if i % self.cross_attention_frequency == 0)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _DEFAULTS}

    def to_hf(self):
        """The equivalent ``transformers.Blip2QFormerConfig``."""
        from transformers import Blip2QFormerConfig

        return Blip2QFormerConfig(**self.to_dict())

    def __eq__(self, other):
        return isinstance(other, QFormerConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "QFormerConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


@dataclass
class QFormerOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    """HF's output class plus ``query_kv``: per layer (k, v) [B, Q, H, D] of the query rows (``return_query_kv``;
    with ``past_query_kv``: [B, P + T, H, D], the past K/V followed by the T input rows')."""

    query_kv: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------
# modules: named like HF's so that the state_dict keys are HF's; forward logic lives in QFormer


class _Attention(nn.Module):  # HF Blip2QFormerAttention: attention, output
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = Projections(cfg, kv_width)
        self.output = DenseLN(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class QFormerLayer(nn.Module):
    """Parameters of one Q-Former layer, under HF's names (self-attention, optional cross-attention,
    query FFN, text FFN when ``use_qformer_text_input``)."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = layer_idx % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = _Attention(cfg, cfg.encoder_hidden_size)
        if cfg.use_qformer_text_input:
            self.intermediate = Intermediate(cfg)
            self.output = DenseLN(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = DenseLN(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


@dataclass
class _Plan(LayerPlan):
    """A :class:`~blipfast.models.layers.LayerPlan` plus the Q-Former's own: ``query_length`` (the query rows of
    the input), ``past_query_kv`` (the ITG pass' cached query K/V per layer), ``query_kv`` (the list the layers
    fill for ``return_query_kv``, else None), ``query_output_only``."""

    query_length: int = 0
    past_query_kv: Optional[Sequence] = None
    query_kv: Optional[list] = None
    query_output_only: bool = False


class QFormer(nn.Module):
    """The BLIP-2 Q-Former (drop-in for HF ``Blip2QFormerModel``); see the module docstring."""

    def __init__(self, config, *, init_weights: bool = True):
        """``init_weights=False`` leaves the parameters uninitialised (for a state_dict that is loaded next)."""
        super().__init__()
        cfg = config if isinstance(config, QFormerConfig) else QFormerConfig(config)
        self.config = cfg
        device = torch.empty(0).device  # the default device; modules are built on "meta" and initialised once
        with torch.device("meta"):
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.encoder = _Encoder(cfg)
        self.to_empty(device=device)
        self._act = activation(cfg.hidden_act)
        self._gelu = gelu_approximate(cfg.hidden_act)
        self._cross = cfg.cross_attention_layers
        if init_weights:
            layers.init_weights(self, cfg.initializer_range)

    @classmethod
    def from_hf(cls, hf_qformer: nn.Module) -> "QFormer":
        """A QFormer with the config, weights, dtype and device of an HF ``Blip2QFormerModel``."""
        w = hf_qformer.layernorm.weight
        with torch.device(w.device):
            model = cls(hf_qformer.config, init_weights=False).to(dtype=w.dtype)
        model.load_state_dict(hf_qformer.state_dict(), strict=True)
        return model.train(hf_qformer.training)

    # ------------------------------------------------------------------------------------------
    def image_kv(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask=None) -> ImageKV:
        """Cross-attention K/V of M images for every cross layer, from one GEMM: an :class:`ImageKV` of
        (k, v) [M, Lk, H, D] pairs (strided views). Pass it as ``encoder_kv=`` (with ``kv_index``) to reuse
        it across calls and row-sets; gradients reach ``encoder_hidden_states`` once per image."""
        cfg = self.config
        x = encoder_hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != cfg.encoder_hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"QFormer: encoder_hidden_states must be [M, Lk, {cfg.encoder_hidden_size}], got {got}")
        x = x.to(self.layernorm.weight.dtype)  # HF keeps the Q-Former in fp32 and casts the image features
        m, lk, _ = x.shape
        check_mask("encoder_attention_mask", encoder_attention_mask, (m, lk), x.device)
        projs = [self.encoder.layer[i].crossattention.attention for i in self._cross]
        return ImageKV(stacked_kv(projs, x, cfg.num_attention_heads, cfg.head_dim), encoder_attention_mask)

    # ------------------------------------------------------------------------------------------
    def forward(self, query_embeds: torch.Tensor, query_length: Optional[int] = None, attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, return_dict: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None, *,
                mode: Optional[str] = None, return_query_kv: bool = False,
                past_query_kv: Optional[Sequence] = None, encoder_kv: Optional[Sequence] = None,
                kv_index: Optional[torch.Tensor] = None, query_output_only: bool = False, **kwargs):
        """HF's forward. ``query_embeds`` [B, L, d] is the raw concatenation [queries | text embeddings]
        (before the LayerNorm); positions < ``query_length`` (default L) are queries. ``attention_mask``
        [B, L] and ``encoder_attention_mask`` [M, Lk] are 1 = attend, 0 = padding.

        Extras: ``mode`` (default "bidirectional", "causal" with ``past_query_kv``); ``return_query_kv`` (with
        ``past_query_kv``: per layer the past K/V extended by the T input rows', [B, P + T, H, D], the cache of
        incremental decoding); ``past_query_kv`` (per layer (k, v) [B, P, H, D] from ``return_query_kv``;
        ``query_embeds`` then holds only the T text embeddings, which see all P past keys and their causal
        prefix, ``attention_mask`` is [B, T] or [B, P + T]); ``encoder_kv`` (from
        :meth:`image_kv`, instead of ``encoder_hidden_states``) and ``kv_index`` (long [B]: the image of
        each row-set, with either); ``query_output_only`` (the last layer computes the query rows only, and
        ``last_hidden_state`` is [B, query_length, d]: ITM and retrieval re-ranking read nothing else, so the
        text rows' attention, output projection and FFN of the last layer are skipped).
        """
        check_unsupported("QFormer.forward", kwargs, output_attentions)
        plan = self._plan(query_embeds, query_length, attention_mask, encoder_hidden_states, encoder_attention_mask,
                          encoder_kv, kv_index, past_query_kv, mode=mode, return_query_kv=return_query_kv,
                          query_output_only=query_output_only, output_hidden_states=output_hidden_states)
        # HF keeps the Q-Former in fp32: inputs are cast to the LayerNorm's dtype
        ln = self.layernorm
        x = query_embeds.to(ln.weight.dtype)
        x = F.dropout(F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps), plan.p_hid, self.training)
        x, hidden = run_layers(self.encoder.layer, x, plan, self._layer, output_hidden_states)
        out = QFormerOutput(last_hidden_state=x, pooler_output=x[:, 0], hidden_states=hidden,
                            query_kv=tuple(plan.query_kv) if plan.query_kv is not None else None)
        return out if return_dict is None or return_dict else out.to_tuple()

    def _plan(self, query_embeds, query_length, attention_mask, encoder_hidden_states, encoder_attention_mask,
              encoder_kv, kv_index, past_query_kv, *, mode, return_query_kv, query_output_only,
              output_hidden_states) -> _Plan:
        """:meth:`forward`'s arguments checked and resolved once (the image K/V computed from
        ``encoder_hidden_states``, the masks as bool)."""
        cfg = self.config
        if not isinstance(query_embeds, torch.Tensor) or query_embeds.dim() != 3 \
                or query_embeds.shape[-1] != cfg.hidden_size:
            got = list(query_embeds.shape) if isinstance(query_embeds, torch.Tensor) else type(query_embeds).__name__
            raise ValueError(f"QFormer: query_embeds must be [B, L, {cfg.hidden_size}], got {got}")
        bsz, seq, _ = query_embeds.shape
        dev = query_embeds.device
        if past_query_kv is not None:  # ITG: text rows over cached query K/V; text FFN everywhere
            if query_length not in (None, 0):
                raise ValueError("QFormer: with past_query_kv the input holds only text (query_length must be None/0)")
            if encoder_hidden_states is not None or encoder_kv is not None:
                raise ValueError("QFormer: past_query_kv (the ITG pass) takes no image input")
            nq, attention_mask = self._past_mask(past_query_kv, attention_mask, bsz, seq, dev)
            mode = "causal" if mode is None else mode
            q_len = 0
        else:
            nq = 0
            q_len = seq if query_length is None else query_length
            if isinstance(q_len, bool) or not isinstance(q_len, int) or not 0 <= q_len <= seq:
                raise ValueError(f"QFormer: query_length must be an int in [0, {seq}], got {query_length!r}")
            mode = "bidirectional" if mode is None else mode
            check_mask("attention_mask", attention_mask, (bsz, seq), dev)
        if mode not in ops.MODES:
            raise ValueError(f"QFormer: mode must be one of {ops.MODES}, got {mode!r}")
        if q_len < seq and not cfg.use_qformer_text_input:
            raise ValueError("QFormer: text rows need the text FFN, which exists only with use_qformer_text_input=True")
        if query_output_only and (q_len == 0 or past_query_kv is not None or return_query_kv or output_hidden_states):
            raise ValueError("QFormer: query_output_only needs query rows, and neither past_query_kv, return_query_kv "
                             "nor output_hidden_states")
        # image K/V for the cross layers (only when there are query rows, as in HF)
        ekv, ekpm = self._image_inputs(encoder_hidden_states, encoder_attention_mask, encoder_kv, kv_index, bsz, dev) \
            if q_len > 0 else (None, None)
        # 0/1 masks become bool once here, not in every layer's op call
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
        if ekpm is not None and ekpm.dtype != torch.bool:
            ekpm = ekpm != 0
        p_hid, p_att, sites = dropout_settings(cfg, self.training, sites_per_layer=6)
        return _Plan(mode=mode, num_query=nq if past_query_kv is not None else q_len, attention_mask=attention_mask,
                     p_hid=p_hid, p_att=p_att, dropout_sites=sites,
                     cross_kv=dict(zip(self._cross, ekv)) if ekv is not None else {}, kv_index=kv_index,
                     encoder_mask=ekpm, query_length=q_len, past_query_kv=past_query_kv,
                     query_kv=[] if return_query_kv else None, query_output_only=query_output_only)

    def _past_mask(self, past_query_kv, attention_mask, bsz: int, seq: int, dev):
        """(P, the attention mask over the [P past | seq input] keys) of the ITG pass, ``past_query_kv`` checked."""
        cfg = self.config
        h, hd = cfg.num_attention_heads, cfg.head_dim
        if len(past_query_kv) != cfg.num_hidden_layers:
            raise ValueError(f"QFormer: past_query_kv needs one (k, v) per layer ({cfg.num_hidden_layers}), got "
                             f"{len(past_query_kv)}")
        nq = past_query_kv[0][0].shape[1]
        for i, (pk, pv) in enumerate(past_query_kv):
            for name, t in (("k", pk), ("v", pv)):
                if t.shape != (bsz, nq, h, hd):
                    raise ValueError(f"QFormer: past_query_kv[{i}] {name} must be [{bsz}, {nq}, {h}, {hd}], got "
                                     f"{list(t.shape)}")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[-1] == seq and nq > 0:
            check_mask("attention_mask", attention_mask, (bsz, seq), dev)
            attention_mask = torch.cat([attention_mask.new_ones(bsz, nq), attention_mask], dim=1)
        check_mask("attention_mask", attention_mask, (bsz, nq + seq), dev)
        return nq, attention_mask

    def _image_inputs(self, encoder_hidden_states, encoder_attention_mask, encoder_kv, kv_index, bsz: int, dev):
        """(per-cross-layer (k, v), key padding mask) of the images: ``encoder_kv``, or computed from
        ``encoder_hidden_states``; ``kv_index`` checked."""
        if encoder_kv is not None and encoder_hidden_states is not None:
            raise ValueError("QFormer: give encoder_hidden_states or encoder_kv, not both")
        if encoder_kv is None:
            if encoder_hidden_states is None:
                raise ValueError("QFormer: encoder_hidden_states must be given for cross-attention layers")
            encoder_kv = self.image_kv(encoder_hidden_states, encoder_attention_mask)
        elif len(encoder_kv) != len(self._cross):
            raise ValueError(f"QFormer: encoder_kv needs one (k, v) per cross layer ({len(self._cross)}), got "
                             f"{len(encoder_kv)}")
        ekpm = encoder_attention_mask if encoder_attention_mask is not None else \
            getattr(encoder_kv, "key_padding_mask", None)
        m, lk = encoder_kv[0][0].shape[:2]
        check_mask("encoder_attention_mask", ekpm, (m, lk), dev)
        if kv_index is None and m != bsz:
            raise ValueError(f"QFormer: {m} images for {bsz} row-sets: pass kv_index (long [{bsz}]) to share them")
        if kv_index is not None and (not isinstance(kv_index, torch.Tensor) or kv_index.shape != (bsz,)):
            raise ValueError(f"QFormer: kv_index must be a long tensor of shape [{bsz}]")
        return encoder_kv, ekpm

    # ------------------------------------------------------------------------------------------
    def _layer(self, i: int, layer: QFormerLayer, x: torch.Tensor, plan: _Plan, seeds) -> torch.Tensor:
        """One layer: self-attention over every row; on the query rows cross-attention (cross layers) and the
        query FFN, on the text rows the text FFN."""
        cfg = self.config
        q_len, seq = plan.query_length, x.shape[1]
        q, k, v = qkv_projection(layer.attention.attention, x, cfg.num_attention_heads, cfg.head_dim)
        k, v = self._self_kv(i, k, v, plan, seq)
        if plan.query_output_only and i == cfg.num_hidden_layers - 1 and q_len < seq:
            # the last layer for the query rows only: in every mode a query row sees the keys that
            # bidirectional attention over [queries | text] (or over the queries alone) gives it
            mask = plan.attention_mask
            if plan.mode != "bidirectional":
                k, v, mask = k[:, :q_len], v[:, :q_len], None if mask is None else mask[:, :q_len]
            q, x, seq = q[:, :q_len], x[:, :q_len], q_len
            a = attention_block(layer.attention.output, x, q, k, v, plan, seeds, num_query=q_len,
                                mode="bidirectional", key_padding_mask=mask)
        else:
            a = attention_block(layer.attention.output, x, q, k, v, plan, seeds, num_query=plan.num_query,
                                mode=plan.mode, key_padding_mask=plan.attention_mask)
        if q_len == 0:
            return self._ffn(layer.intermediate, layer.output, a, plan.p_hid, next(seeds, None))
        aq, at = (a, None) if q_len == seq else torch.split(a, (q_len, seq - q_len), dim=1)
        if layer.has_cross_attention:
            ca = layer.crossattention
            aq = cross_attention_block(ca.attention, ca.output, aq, plan.cross_kv[i], cfg.num_attention_heads, plan,
                                       seeds)
        x = self._ffn(layer.intermediate_query, layer.output_query, aq, plan.p_hid, next(seeds, None))
        if at is None:
            return x
        return torch.cat([x, self._ffn(layer.intermediate, layer.output, at, plan.p_hid, next(seeds, None))], dim=1)

    @staticmethod
    def _self_kv(i: int, k: torch.Tensor, v: torch.Tensor, plan: _Plan, seq: int) -> tuple:
        """Layer i's self-attention K/V: with ``past_query_kv`` the cached K/V followed by these rows'. Records
        what ``return_query_kv`` returns (the query rows' K/V, or the extended cache)."""
        if plan.past_query_kv is None:
            if plan.query_kv is not None:
                q_len = plan.query_length
                plan.query_kv.append((k, v) if q_len == seq else (k[:, :q_len], v[:, :q_len]))
            return k, v
        pk, pv = plan.past_query_kv[i]
        k, v = torch.cat((pk.to(k.dtype), k), 1), torch.cat((pv.to(v.dtype), v), 1)
        if plan.query_kv is not None:  # incremental decoding: the cache extended by these rows
            plan.query_kv.append((k, v))
        return k, v

    def _ffn(self, inter: Intermediate, output: DenseLN, h: torch.Tensor, p: float, seed=None) -> torch.Tensor:
        return ffn(self._act, self._gelu, inter, output, h, p, seed)


class QFormerEmbeddings(nn.Module):
    """Word + position embeddings of the Q-Former's text (HF ``Blip2TextEmbeddings`` key names:
    ``word_embeddings``, ``position_embeddings``). ``forward(input_ids, position_ids=None, query_embeds=None)``
    returns [queries | text], the raw input of :class:`QFormer` (queries take no position; text positions
    0..T-1 unless given). Kept outside QFormer so that QFormer's state_dict stays HF's."""

    def __init__(self, config):
        super().__init__()
        cfg = config if isinstance(config, QFormerConfig) else QFormerConfig(config)
        self.config = cfg
        device = torch.empty(0).device
        with torch.device("meta"):
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.to_empty(device=device)
        layers.init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                query_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_ids is None:
            if query_embeds is None:
                raise ValueError("QFormerEmbeddings: give input_ids, query_embeds or both")
            return query_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"QFormerEmbeddings: input_ids must be [B, T], got {list(input_ids.shape)}")
        t = input_ids.shape[1]
        if position_ids is None:
            if t > self.config.max_position_embeddings:
                raise ValueError(f"QFormerEmbeddings: {t} tokens exceed max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            position_ids = torch.arange(t, device=input_ids.device)[None]
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if query_embeds is None:
            return emb
        if query_embeds.dim() != 3 or query_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"QFormerEmbeddings: query_embeds must be [{input_ids.shape[0]}, Q, d], got "
                             f"{list(query_embeds.shape)}")
        return torch.cat((query_embeds.to(emb.dtype), emb), dim=1)
