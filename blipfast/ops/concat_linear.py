"""One GEMM over several Linear layers that read the same input, without a concatenated weight kept for backward.

``concat_linear(x, (w_1, ..., w_k), (b_1, ..., b_k))`` is ``F.linear(x, cat(w_i), cat(b_i))``: the outputs of the k
layers side by side. The Q-Former's query/key/value projections (and the key/value projections of every
cross-attention layer) read one input, so one GEMM against their concatenated weights does the work of three (or
2 x 6). Written with ``torch.cat`` in plain autograd, the concatenated weight is a fresh tensor that autograd saves
for the backward: 81 MiB of weight copies per step of the default Q-Former. Here the Parameters stay separate (so
``apply_blipfast_to_blip2`` can share them with HF's modules) and the backward keeps x and references to them only;
the concatenation is a temporary in the forward and is made again in the backward, which returns each weight's and
bias' gradient as its own tensor (rows of one GEMM's result).

x [..., K]; weights: k >= 1 tensors [n_i, K] of one dtype; biases: None or one [n_i] per weight, of one dtype.

Autocast: the GEMM runs in the dtype ``F.linear`` would run in (autocast's where it is on), forward and backward
(saved: x in that dtype, as autocast's own linear saves it); the bias gradients accumulate in fp32 (fp64 for fp64
inputs); each gradient comes back in its input's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as C

_OP = "concat_linear"
_SUPPORTED = ("torch",)


def concat_linear_ref(x, weights, biases=None):
    """Pure-PyTorch reference (keeps the concatenated weight for its backward); differentiable."""
    return F.linear(x, torch.cat(tuple(weights)), None if biases is None else torch.cat(tuple(biases)))


# ----------------------------------------------------------------------------------------------
# the custom ops and their implementation: x is in the GEMM dtype; the weights and biases in theirs (cast
# to x's dtype inside)


def _fwd_torch(x, weights, biases):
    dt = x.dtype
    return F.linear(x, torch.cat(weights).to(dt), torch.cat(biases).to(dt) if biases else None)


def _bwd_torch(grad_y, x, weights, need_x, need_weights, bias_dtype):
    dt = x.dtype
    gy = grad_y.to(dt)
    gx = gy @ torch.cat(weights).to(dt) if need_x else x.new_empty(0)  # the concatenation again, a temporary
    g2 = gy.reshape(-1, gy.shape[-1])
    gw = (g2.t() @ x.reshape(-1, x.shape[-1])).to(weights[0].dtype) if need_weights else x.new_empty(0)
    gb = g2.sum(0, dtype=C.acc_dtype(x)).to(bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return gx, gw, gb


@torch.library.custom_op("blipfast::concat_linear_fwd", mutates_args=())
def _fwd(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], backend: str) -> torch.Tensor:
    """``biases`` is empty (no bias) or one per weight."""
    with C.no_autocast(x.device):
        return _fwd_torch(x, weights, biases)


@_fwd.register_fake
def _fwd_fake(x, weights, biases, backend):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("blipfast::concat_linear_bwd", mutates_args=())
def _bwd(grad_y: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], need_x: bool, need_weights: bool,
         bias_dtype: Optional[torch.dtype], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d x in x's dtype, d cat(weights) [sum n_i, K] in the weights' dtype, d cat(biases) in ``bias_dtype``);
    a gradient that is not needed (``bias_dtype`` None: no bias gradient) is an empty tensor."""
    with C.no_autocast(x.device):
        return _bwd_torch(grad_y, x, weights, need_x, need_weights, bias_dtype)


@_bwd.register_fake
def _bwd_fake(grad_y, x, weights, need_x, need_weights, bias_dtype, backend):
    n, k = sum(w.shape[0] for w in weights), x.shape[-1]
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weights[0].new_empty((n, k)) if need_weights else x.new_empty(0),
            x.new_empty((n,), dtype=bias_dtype) if bias_dtype is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weights, biases, backend = inputs
    ctx.save_for_backward(x, *weights)  # references to the Parameters: no concatenated copy
    ctx.backend = backend
    ctx.n_biases = len(biases)
    ctx.bias_dtype = biases[0].dtype if biases else None


def _backward(ctx, grad_y):
    x, *weights = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1]), any(ctx.needs_input_grad[2])
    bias_dtype = ctx.bias_dtype if need_b else None
    gx, gw, gb = _bwd(grad_y, x, weights, need_x, need_w, bias_dtype, ctx.backend)
    rows = [w.shape[0] for w in weights]
    # a list input takes a list of gradients (None entries where there is none), one per tensor
    return (gx if need_x else None, list(gw.split(rows)) if need_w else [None] * len(weights),
            list(gb.split(rows)) if bias_dtype is not None else [None] * ctx.n_biases, None)


torch.library.register_autograd("blipfast::concat_linear_fwd", _backward, setup_context=_setup_context)


def concat_linear(x, weights, biases=None, *, backend=None):
    """``F.linear(x, cat(weights), cat(biases))`` whose backward keeps no concatenated weight (see the module doc):
    x [..., K], weights a sequence of [n_i, K], biases None or one [n_i] per weight. Under autocast the GEMM runs in
    autocast's dtype."""
    C.check_tensor(_OP, "x", x)
    dev = x.device
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have at least one dimension, got a 0-d tensor")
    k = x.shape[-1]
    weights = _check_list("weights", weights)
    if not weights:
        raise ValueError(f"{_OP}: weights must hold at least one tensor")
    for i, w in enumerate(weights):
        C.check_tensor(_OP, f"weights[{i}]", w, ndim=2, device=dev)
        C.check_shape(_OP, f"weights[{i}]", w, (None, k))
    C.check_same_dtype(_OP, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    if biases is not None:
        biases = _check_list("biases", biases)
        if len(biases) != len(weights):
            raise ValueError(f"{_OP}: biases must be None or hold one tensor per weight ({len(weights)}), "
                             f"got {len(biases)}")
        for i, (b, w) in enumerate(zip(biases, weights)):
            C.check_tensor(_OP, f"biases[{i}]", b, device=dev)
            C.check_shape(_OP, f"biases[{i}]", b, (w.shape[0],))
        C.check_same_dtype(_OP, **{f"biases[{i}]": b for i, b in enumerate(biases)})
    dt = C.gemm_dtype(_OP, dev, x=x, weights=weights[0], biases=biases[0] if biases else None)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, dt)
    return _fwd(x.to(dt), weights, biases or [], backend)


def _check_list(name, seq) -> list:
    if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
        raise TypeError(f"{_OP}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    return list(seq)
