"""The building blocks that the Q-Former (``models/qformer.py``) and the BLIP text model (``models/blip.py``) share.

Parameter holders named like Hugging Face's modules (so that the models' ``state_dict`` keys are HF's):
:class:`Projections` (``query``, ``key``, ``value``), :class:`DenseLN` (``dense``, ``LayerNorm``),
:class:`Intermediate` (``dense``). The per-layer computation on them, on the fused ops:

- :func:`qkv_projection`: self-attention q, k, v from ONE GEMM (``concat_linear``: no weight copy kept);
- :func:`stacked_kv`: the cross-attention K/V of several layers from ONE GEMM;
- :func:`attention_block` / :func:`cross_attention_block`: attention and its post-LN epilogue
  (:func:`epilogue`: the GEMM without bias, ``ops.bias_dropout_add_layernorm`` does the rest);
- :func:`ffn`: the post-LN feed-forward block (a GELU one recomputes its activation in the backward);
- :class:`LayerPlan` and :func:`run_layers`: a forward resolves its arguments once into a plan, then runs one
  layer step per layer, every dropout site's seed coming from one draw.

Also :class:`ImageKV` (the cross-attention K/V of every layer, from ``image_kv``), :func:`activation` (an
activation by its transformers name), :func:`gelu_approximate`, :func:`init_weights` (HF's initialisation),
:func:`check_config` (the fields the two configs share), :func:`check_mask` (a 2-D key padding mask's argument
check) and :func:`check_unsupported` (the HF forward arguments the models refuse).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import concat_linear, gelu_mlp

__all__ = ["DenseLN", "ImageKV", "Intermediate", "LayerPlan", "Projections", "activation", "attention_block",
           "check_config", "check_mask", "check_unsupported", "cross_attention_block", "dropout_settings", "epilogue",
           "ffn", "gelu_approximate", "init_weights", "qkv_projection", "run_layers", "stacked_kv"]

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

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64)


def activation(name_or_fn) -> Callable:
    """The activation function of a config's ``hidden_act``: a callable as is, else its transformers (ACT2FN) name;
    ValueError for an unknown name."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn in _ACTIVATIONS:
        return _ACTIVATIONS[name_or_fn]
    from transformers.activations import ACT2FN

    if name_or_fn not in ACT2FN:
        raise ValueError(f"hidden_act {name_or_fn!r} is not a transformers activation (ACT2FN)")
    return ACT2FN[name_or_fn]


def gelu_approximate(hidden_act):
    """F.gelu's ``approximate`` for a GELU activation name (its FFN then runs as ``gelu_mlp``), else None."""
    return _GELU_APPROX.get(hidden_act) if isinstance(hidden_act, str) else None


def check_config(who: str, values: Mapping, positive_ints: Sequence[str], unit_floats: Sequence[str] = ()) -> None:
    """The fields a BERT-like text config shares (ValueError "``who``: ..." for the first bad one): ``positive_ints``
    > 0, ``hidden_size`` a multiple of ``num_attention_heads``, the dropout probabilities in [0, 1),
    ``unit_floats`` in [0, 1], ``layer_norm_eps`` and ``initializer_range`` > 0, ``hidden_act`` an activation,
    ``pad_token_id`` None or a token id."""
    def err(msg):
        raise ValueError(f"{who}: {msg}")

    for name in positive_ints:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            err(f"{name} must be a positive int, got {v!r}")
    if values["hidden_size"] % values["num_attention_heads"]:
        err(f"hidden_size ({values['hidden_size']}) must be a multiple of num_attention_heads "
            f"({values['num_attention_heads']})")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            err(f"{name} must be a float in [0, 1), got {v!r}")
    for name in unit_floats:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            err(f"{name} must be a float in [0, 1], got {v!r}")
    for name in ("layer_norm_eps", "initializer_range"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0.0:
            err(f"{name} must be a positive float, got {v!r}")
    if not isinstance(values["hidden_act"], str) and not callable(values["hidden_act"]):
        err(f"hidden_act must be an ACT2FN name or a callable, got {values['hidden_act']!r}")
    try:
        activation(values["hidden_act"])
    except ValueError as e:
        err(str(e))
    pad = values.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < values["vocab_size"]):
        err(f"pad_token_id must be None or an int in [0, vocab_size={values['vocab_size']}), got {pad!r}")


def check_unsupported(who: str, kwargs: Mapping, output_attentions, ignored=()) -> None:
    """The HF forward arguments a fused model does not take: any keyword in ``kwargs`` (not in ``ignored``) that is
    set (TypeError), and ``output_attentions=True`` (ValueError: the attention probabilities never exist)."""
    for k, v in kwargs.items():
        if v is not None and v is not False and k not in ignored:
            raise TypeError(f"{who}: unsupported argument {k}={v!r}")
    if output_attentions:
        raise ValueError(f"{who}: output_attentions=True is not supported (the fused attention never materialises "
                         f"the probabilities)")


# ----------------------------------------------------------------------------------------------
# parameter holders named like HF's; the forward logic lives in the functions below


class Projections(nn.Module):
    """HF ``Blip2QFormerMultiHeadAttention`` / ``BlipTextSelfAttention``: ``query`` (hidden -> hidden), ``key`` and
    ``value`` (``kv_width`` -> hidden)."""

    def __init__(self, cfg, kv_width: int):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)


class DenseLN(nn.Module):
    """HF's ``*SelfOutput`` / ``*Output``: ``dense`` (d_in -> d) and ``LayerNorm`` (d)."""

    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)


class Intermediate(nn.Module):
    """HF's ``*Intermediate``: ``dense`` (hidden -> intermediate)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class ImageKV(tuple):
    """Per-cross-layer ``(k, v)`` pairs [M, Lk, H, D] of M images (a tuple), with the images' key padding mask
    ([M, Lk] or None) as ``key_padding_mask``. Made by ``QFormer.image_kv`` / ``BlipTextModel.image_kv``, consumed
    via ``encoder_kv=``."""

    def __new__(cls, pairs, key_padding_mask=None):
        self = super().__new__(cls, pairs)
        self.key_padding_mask = key_padding_mask
        return self


def init_weights(module: nn.Module, std: float) -> None:
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


def check_mask(name: str, mask, shape: tuple, device, who: str = "QFormer", like: str = "query_embeds") -> None:
    """A key padding mask (1 = attend, 0 = padding) is None or a bool / integer / floating tensor of ``shape`` on
    ``device`` (that of the argument named ``like``); TypeError / ValueError naming ``who`` and ``name``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{who}: {name} must be a bool, integer or floating tensor (1 = attend, 0 = padding), "
                        f"got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must have shape {list(shape)} (1 = attend, 0 = padding), got "
                         f"{list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{who}: {name} is on {mask.device} but {like} is on {device}")


# ----------------------------------------------------------------------------------------------
# per-layer computation


def epilogue(x, dense_ln: DenseLN, residual, p: float, seed=None):
    """LN(dropout(x @ W^T + b) + residual): the GEMM without bias, the fused epilogue does the rest."""
    ln = dense_ln.LayerNorm
    return ops.bias_dropout_add_layernorm(F.linear(x, dense_ln.dense.weight), dense_ln.dense.bias, residual,
                                          ln.weight, ln.bias, eps=ln.eps, dropout_p=p, seed=seed)


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
    return epilogue(act(F.linear(h, inter.dense.weight, inter.dense.bias)), output, h, p, seed)


@dataclass
class LayerPlan:
    """What every layer of one forward needs, resolved once from its arguments.

    ``mode`` / ``num_query`` / ``attention_mask`` (bool [B, keys] or None): the self-attention's; ``cross_kv``:
    layer index -> (k, v) [M, Lk, H, D] of the cross-attention (no entry: the layer attends to no image in this
    pass), shared by the row-sets through ``kv_index`` (long [B] or None) under ``encoder_mask`` (bool [M, Lk] or
    None); ``p_hid`` / ``p_att``: the hidden and attention dropout (0 in eval); ``dropout_sites``: how many
    seeds the layers draw (0: no dropout, or none drawn)."""

    mode: str
    num_query: int
    attention_mask: Optional[torch.Tensor]
    p_hid: float
    p_att: float
    dropout_sites: int
    cross_kv: dict = field(default_factory=dict)
    kv_index: Optional[torch.Tensor] = None
    encoder_mask: Optional[torch.Tensor] = None


def dropout_settings(cfg, training: bool, sites_per_layer: int) -> tuple[float, float, int]:
    """(hidden dropout, attention dropout, dropout sites) of a forward: the config's probabilities in training (0 in
    eval), and ``sites_per_layer`` x the layers as the seeds to draw when any of them is > 0 (else 0)."""
    p_hid = cfg.hidden_dropout_prob if training else 0.0
    p_att = cfg.attention_probs_dropout_prob if training else 0.0
    return p_hid, p_att, sites_per_layer * cfg.num_hidden_layers if (p_hid > 0 or p_att > 0) else 0


def attention_block(output: DenseLN, x: torch.Tensor, q, k, v, plan: LayerPlan, seeds, *, num_query: int, mode: str,
                    key_padding_mask) -> torch.Tensor:
    """Self-attention of the rows ``q`` over ``k`` / ``v`` ([B, *, H, D], ``ops.qformer_attention``), then the
    output projection's epilogue with residual ``x`` [B, rows, d]. Draws two seeds."""
    ctx = ops.qformer_attention(q, k, v, num_query=num_query, mode=mode, key_padding_mask=key_padding_mask,
                                dropout_p=plan.p_att, seed=next(seeds, None))
    return epilogue(ctx.reshape(x.shape), output, x, plan.p_hid, next(seeds, None))


def cross_attention_block(proj: Projections, output: DenseLN, x: torch.Tensor, kv, num_heads: int, plan: LayerPlan,
                          seeds) -> torch.Tensor:
    """Cross-attention of the rows ``x`` [B, rows, d] (query projection of ``proj``) over the image ``kv`` (shared
    through ``plan.kv_index``), then the output projection's epilogue with residual ``x``. Draws two seeds."""
    q = F.linear(x, proj.query.weight, proj.query.bias).unflatten(-1, (num_heads, x.shape[-1] // num_heads))
    ctx = ops.cross_attention(q, kv[0], kv[1], kv_index=plan.kv_index, key_padding_mask=plan.encoder_mask,
                              dropout_p=plan.p_att, seed=next(seeds, None))
    return epilogue(ctx.reshape(x.shape), output, x, plan.p_hid, next(seeds, None))


def run_layers(layers: Sequence[nn.Module], x: torch.Tensor, plan: LayerPlan, step: Callable,
               output_hidden_states) -> tuple[torch.Tensor, Optional[tuple]]:
    """``x = step(i, layer, x, plan, seeds)`` for every layer; returns (x, the hidden states: the input and every
    layer's output, or None without ``output_hidden_states``). Every dropout site's seed comes from one draw
    (CUDA; elsewhere None: torch's own dropout)."""
    seeds = iter(ops.dropout_seeds(plan.dropout_sites, x.device) if plan.dropout_sites else ())
    hidden = [x] if output_hidden_states else None
    for i, layer in enumerate(layers):
        x = step(i, layer, x, plan, seeds)
        if hidden is not None:
            hidden.append(x)
    return x, tuple(hidden) if hidden is not None else None
