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

Beyond HF (keyword-only): ``mode`` ("bidirectional" | "causal" | "unimodal", SPEC.md section 2),
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

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from .. import ops
from ..ops import concat_linear, gelu_mlp

# activations by name without importing transformers.activations (slow to import); others come from ACT2FN
_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, BERT's and BLIP-2's
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


# activations whose FFN runs as ``gelu_mlp`` (GELU recomputed in the backward): name -> F.gelu's ``approximate``
_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _activation(name_or_fn):
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn in _ACTIVATIONS:
        return _ACTIVATIONS[name_or_fn]
    from transformers.activations import ACT2FN

    if name_or_fn not in ACT2FN:
        raise ValueError(f"hidden_act {name_or_fn!r} is not a transformers activation (ACT2FN)")
    return ACT2FN[name_or_fn]


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
        def err(msg):
            raise ValueError(f"QFormerConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "cross_attention_frequency", "encoder_hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                err(f"{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            err(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                err(f"{name} must be a float in [0, 1), got {v!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0.0:
                err(f"{name} must be a positive float, got {v!r}")
        if not isinstance(self.hidden_act, str) and not callable(self.hidden_act):
            err(f"hidden_act must be an ACT2FN name or a callable, got {self.hidden_act!r}")
        try:
            _activation(self.hidden_act)
        except ValueError as e:
            err(str(e))
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            err(f"pad_token_id must be None or an int in [0, vocab_size={self.vocab_size}), got {pad!r}")
        if not isinstance(self.use_qformer_text_input, bool):
            err(f"use_qformer_text_input must be a bool, got {self.use_qformer_text_input!r}")

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


class ImageKV(tuple):
    """Per-cross-layer ``(k, v)`` pairs [M, Lk, H, D] of M images (a tuple), with the images' key padding mask
    ([M, Lk] or None) as ``key_padding_mask``. Made by :meth:`QFormer.image_kv`, consumed via ``encoder_kv=``."""

    def __new__(cls, pairs, key_padding_mask=None):
        self = super().__new__(cls, pairs)
        self.key_padding_mask = key_padding_mask
        return self


# ----------------------------------------------------------------------------------------------
# modules: named like HF's so that the state_dict keys are HF's; forward logic lives in QFormer


class _Projections(nn.Module):  # HF Blip2QFormerMultiHeadAttention: query, key, value
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)


class _DenseLN(nn.Module):  # HF Blip2QFormerSelfOutput / Blip2QFormerOutput: dense, LayerNorm
    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)


class _Attention(nn.Module):  # HF Blip2QFormerAttention: attention, output
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = _Projections(cfg, kv_width)
        self.output = _DenseLN(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Intermediate(nn.Module):  # HF Blip2QFormerIntermediate: dense
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


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
            self.intermediate = _Intermediate(cfg)
            self.output = _DenseLN(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)
        self.intermediate_query = _Intermediate(cfg)
        self.output_query = _DenseLN(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


def _init_weights(module: nn.Module, std: float) -> None:
    """HF's initialisation: Linear/Embedding N(0, std), zero biases and padding row, LayerNorm (1, 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


def _epilogue(x, dense_ln: _DenseLN, residual, p: float, seed=None):
    """LN(dropout(x @ W^T + b) + residual): the GEMM without bias, the fused epilogue does the rest."""
    ln = dense_ln.LayerNorm
    return ops.bias_dropout_add_layernorm(F.linear(x, dense_ln.dense.weight), dense_ln.dense.bias, residual,
                                          ln.weight, ln.bias, eps=ln.eps, dropout_p=p, seed=seed)


def _check_mask(name: str, mask, shape: tuple, device, who: str = "QFormer", like: str = "query_embeds") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                          torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{who}: {name} must be a bool, integer or floating tensor (1 = attend, 0 = padding), "
                        f"got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must have shape {list(shape)} (1 = attend, 0 = padding), got "
                         f"{list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{who}: {name} is on {mask.device} but {like} is on {device}")


# the per-layer building blocks, shared with the BLIP (v1) text model (models/blip.py)


def gelu_approximate(hidden_act):
    """F.gelu's ``approximate`` for a GELU activation name (its FFN then runs as ``gelu_mlp``), else None."""
    return _GELU_APPROX.get(hidden_act) if isinstance(hidden_act, str) else None


def qkv_projection(proj: nn.Module, x: torch.Tensor, num_heads: int, head_dim: int):
    """Self-attention q, k, v [B, L, H, D] of ``x`` [B, L, d] from ONE GEMM over ``proj.query`` / ``proj.key`` /
    ``proj.value`` (``concat_linear``: no weight copy kept): strided views of its [B, L, 3, H, D] output."""
    qkv = concat_linear(x, (proj.query.weight, proj.key.weight, proj.value.weight),
                        (proj.query.bias, proj.key.bias, proj.value.bias))
    return qkv.unflatten(-1, (3, num_heads, head_dim)).unbind(-3)


def stacked_kv(projs: Sequence[nn.Module], x: torch.Tensor, num_heads: int, head_dim: int) -> tuple:
    """Cross-attention (k, v) [M, Lk, H, D] of ``x`` [M, Lk, width] for every module in ``projs`` (with ``key`` /
    ``value`` Linears) from ONE GEMM; a tuple of pairs of strided views, in ``projs`` order."""
    kv = concat_linear(x, [t for p in projs for t in (p.key.weight, p.value.weight)],
                       [t for p in projs for t in (p.key.bias, p.value.bias)])
    kv = kv.unflatten(-1, (2 * len(projs), num_heads, head_dim)).unbind(-3)
    return tuple((kv[2 * j], kv[2 * j + 1]) for j in range(len(projs)))


def ffn(act, gelu: Optional[str], inter: nn.Module, output: nn.Module, h: torch.Tensor, p: float,
        seed=None) -> torch.Tensor:
    """The post-LN feed-forward block LN(dropout(W2 act(W1 h + b1) + b2) + h); with GELU (``gelu``: its
    ``approximate``, from :func:`gelu_approximate`) the activation is recomputed in the backward (``gelu_mlp``:
    the [rows, intermediate] activation is not kept). ``seed``: the epilogue's dropout seed (None: a fresh one)."""
    if gelu is not None:
        y = gelu_mlp(h, inter.dense.weight, inter.dense.bias, output.dense.weight, approximate=gelu)
        ln = output.LayerNorm
        return ops.bias_dropout_add_layernorm(y, output.dense.bias, h, ln.weight, ln.bias, eps=ln.eps, dropout_p=p,
                                              seed=seed)
    return _epilogue(act(F.linear(h, inter.dense.weight, inter.dense.bias)), output, h, p, seed)


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
        self._act = _activation(cfg.hidden_act)
        self._gelu = gelu_approximate(cfg.hidden_act)
        self._cross = cfg.cross_attention_layers
        if init_weights:
            _init_weights(self, cfg.initializer_range)

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
        _check_mask("encoder_attention_mask", encoder_attention_mask, (m, lk), x.device)
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
        cfg = self.config
        for k, v in kwargs.items():
            if v is not None and v is not False:
                raise TypeError(f"QFormer.forward: unsupported argument {k}={v!r}")
        if output_attentions:
            raise ValueError("QFormer.forward: output_attentions=True is not supported (the fused attention never "
                             "materialises the probabilities)")
        if not isinstance(query_embeds, torch.Tensor) or query_embeds.dim() != 3 \
                or query_embeds.shape[-1] != cfg.hidden_size:
            got = list(query_embeds.shape) if isinstance(query_embeds, torch.Tensor) else type(query_embeds).__name__
            raise ValueError(f"QFormer: query_embeds must be [B, L, {cfg.hidden_size}], got {got}")
        bsz, seq, d = query_embeds.shape
        dev = query_embeds.device
        h, hd = cfg.num_attention_heads, cfg.head_dim

        if past_query_kv is not None:  # ITG: text rows over cached query K/V; text FFN everywhere
            if query_length not in (None, 0):
                raise ValueError("QFormer: with past_query_kv the input holds only text (query_length must be None/0)")
            if encoder_hidden_states is not None or encoder_kv is not None:
                raise ValueError("QFormer: past_query_kv (the ITG pass) takes no image input")
            if len(past_query_kv) != cfg.num_hidden_layers:
                raise ValueError(f"QFormer: past_query_kv needs one (k, v) per layer ({cfg.num_hidden_layers}), got "
                                 f"{len(past_query_kv)}")
            nq = past_query_kv[0][0].shape[1]
            for i, (pk, pv) in enumerate(past_query_kv):
                for name, t in (("k", pk), ("v", pv)):
                    if t.shape != (bsz, nq, h, hd):
                        raise ValueError(f"QFormer: past_query_kv[{i}] {name} must be [{bsz}, {nq}, {h}, {hd}], got "
                                         f"{list(t.shape)}")
            mode = "causal" if mode is None else mode
            q_len = 0
            if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[-1] == seq and nq > 0:
                _check_mask("attention_mask", attention_mask, (bsz, seq), dev)
                attention_mask = torch.cat([attention_mask.new_ones(bsz, nq), attention_mask], dim=1)
            _check_mask("attention_mask", attention_mask, (bsz, nq + seq), dev)
        else:
            nq = 0
            q_len = seq if query_length is None else query_length
            if isinstance(q_len, bool) or not isinstance(q_len, int) or not 0 <= q_len <= seq:
                raise ValueError(f"QFormer: query_length must be an int in [0, {seq}], got {query_length!r}")
            mode = "bidirectional" if mode is None else mode
            _check_mask("attention_mask", attention_mask, (bsz, seq), dev)
        if mode not in ops.MODES:
            raise ValueError(f"QFormer: mode must be one of {ops.MODES}, got {mode!r}")
        if q_len < seq and not cfg.use_qformer_text_input:
            raise ValueError("QFormer: text rows need the text FFN, which exists only with use_qformer_text_input=True")
        if query_output_only and (q_len == 0 or past_query_kv is not None or return_query_kv or output_hidden_states):
            raise ValueError("QFormer: query_output_only needs query rows, and neither past_query_kv, return_query_kv "
                             "nor output_hidden_states")

        # image K/V for the cross layers (only when there are query rows, as in HF)
        ekv = ekpm = None
        if q_len > 0:
            if encoder_kv is not None and encoder_hidden_states is not None:
                raise ValueError("QFormer: give encoder_hidden_states or encoder_kv, not both")
            if encoder_kv is None:
                if encoder_hidden_states is None:
                    raise ValueError("QFormer: encoder_hidden_states must be given for cross-attention layers")
                encoder_kv = self.image_kv(encoder_hidden_states, encoder_attention_mask)
            elif len(encoder_kv) != len(self._cross):
                raise ValueError(f"QFormer: encoder_kv needs one (k, v) per cross layer ({len(self._cross)}), got "
                                 f"{len(encoder_kv)}")
            ekv = encoder_kv
            ekpm = encoder_attention_mask if encoder_attention_mask is not None else \
                getattr(encoder_kv, "key_padding_mask", None)
            m, lk = ekv[0][0].shape[:2]
            _check_mask("encoder_attention_mask", ekpm, (m, lk), dev)
            if kv_index is None and m != bsz:
                raise ValueError(f"QFormer: {m} images for {bsz} row-sets: pass kv_index (long [{bsz}]) to share them")
            if kv_index is not None and (not isinstance(kv_index, torch.Tensor) or kv_index.shape != (bsz,)):
                raise ValueError(f"QFormer: kv_index must be a long tensor of shape [{bsz}]")

        # 0/1 masks become bool once here, not in every layer's op call
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
        if ekpm is not None and ekpm.dtype != torch.bool:
            ekpm = ekpm != 0

        train = self.training
        p_hid = cfg.hidden_dropout_prob if train else 0.0
        p_att = cfg.attention_probs_dropout_prob if train else 0.0

        # HF keeps the Q-Former in fp32: inputs are cast to the LayerNorm's dtype
        x = query_embeds.to(self.layernorm.weight.dtype)
        x = F.layer_norm(x, (d,), self.layernorm.weight, self.layernorm.bias, self.layernorm.eps)
        x = F.dropout(x, p_hid, train)

        # every dropout site's seed from one draw (CUDA; elsewhere None: torch's own dropout)
        n_sites = 6 * cfg.num_hidden_layers if (train and (p_hid > 0 or p_att > 0)) else 0
        seeds = iter(ops.dropout_seeds(n_sites, x.device) if n_sites else ())

        all_hidden = [x] if output_hidden_states else None
        query_kv = [] if return_query_kv else None
        num_query = nq if past_query_kv is not None else q_len
        cross_j = 0
        for i, layer in enumerate(self.encoder.layer):
            # self-attention: one QKV GEMM, q/k/v strided views of [B, L, 3, H, D]
            q, k, v = qkv_projection(layer.attention.attention, x, h, hd)
            if query_kv is not None and past_query_kv is None:
                query_kv.append((k, v) if q_len == seq else (k[:, :q_len], v[:, :q_len]))
            if past_query_kv is not None:
                pk, pv = past_query_kv[i]
                k, v = torch.cat((pk.to(k.dtype), k), 1), torch.cat((pv.to(v.dtype), v), 1)
                if query_kv is not None:  # incremental decoding: the cache extended by these rows
                    query_kv.append((k, v))
            if query_output_only and i == cfg.num_hidden_layers - 1 and q_len < seq:
                # the last layer for the query rows only: in every mode a query row sees the keys that
                # bidirectional attention over [queries | text] (or over the queries alone) gives it
                kq, vq, mq = (k, v, attention_mask) if mode == "bidirectional" else (
                    k[:, :q_len], v[:, :q_len], None if attention_mask is None else attention_mask[:, :q_len])
                ctx = ops.qformer_attention(q[:, :q_len], kq, vq, num_query=q_len, mode="bidirectional",
                                            key_padding_mask=mq, dropout_p=p_att, seed=next(seeds, None))
                seq = q_len
                x = x[:, :q_len]
            else:
                ctx = ops.qformer_attention(q, k, v, num_query=num_query, mode=mode, key_padding_mask=attention_mask,
                                            dropout_p=p_att, seed=next(seeds, None))
            a = _epilogue(ctx.reshape(bsz, seq, d), layer.attention.output, x, p_hid, next(seeds, None))

            parts = []
            if q_len > 0:
                aq, at = (a, None) if q_len == seq else torch.split(a, (q_len, seq - q_len), dim=1)
                if layer.has_cross_attention:
                    ca = layer.crossattention
                    cq = F.linear(aq, ca.attention.query.weight, ca.attention.query.bias).view(bsz, q_len, h, hd)
                    ck, cv = ekv[cross_j]
                    cross_j += 1
                    cctx = ops.cross_attention(cq, ck, cv, kv_index=kv_index, key_padding_mask=ekpm, dropout_p=p_att,
                                               seed=next(seeds, None))
                    aq = _epilogue(cctx.reshape(bsz, q_len, d), ca.output, aq, p_hid, next(seeds, None))
                parts.append(self._ffn(layer.intermediate_query, layer.output_query, aq, p_hid, next(seeds, None)))
            else:
                at = a
            if at is not None:
                parts.append(self._ffn(layer.intermediate, layer.output, at, p_hid, next(seeds, None)))
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            if all_hidden is not None:
                all_hidden.append(x)

        out = QFormerOutput(last_hidden_state=x, pooler_output=x[:, 0],
                            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
                            query_kv=tuple(query_kv) if query_kv is not None else None)
        return out if return_dict is None or return_dict else out.to_tuple()

    def _ffn(self, inter: _Intermediate, output: _DenseLN, h: torch.Tensor, p: float, seed=None) -> torch.Tensor:
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
        _init_weights(self, cfg.initializer_range)

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
