"""Linear layers with a leaner backward than plain autograd gives them.

``concat_linear``: one GEMM over several Linear layers' weights without a weight copy that autograd keeps.

The Q-Former's query/key/value projections (and the key/value projections of every cross-attention layer)
read the same input, so one GEMM against their concatenated weights does the work of three (or 2 x 6). Done
with ``torch.cat`` in plain autograd, the concatenated weight is a fresh tensor that autograd saves for the
backward: 81 MiB of weight copies per step of the default Q-Former. ``concat_linear`` keeps HF's separate
Parameters (so ``apply_blipfast_to_blip2`` can share them) and saves only the input and references to the
Parameters; the concatenation is a temporary in the forward and is made again in the backward.

Autocast: the GEMM runs in the dtype autocast picks (the forward's output dtype); the backward computes in
that dtype too and returns each gradient in its input's dtype, as autocast's own ``linear`` does. The input is
saved in the compute dtype (what autocast saves).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _acc(dt: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the bias gradients: fp32, fp64 for fp64."""
    return torch.float64 if dt == torch.float64 else torch.float32


class _ConcatLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n: int, *params):
        weights, biases = params[:n], params[n:]
        w = torch.cat(weights)
        b = torch.cat(biases) if biases else None
        y = F.linear(x, w, b)  # under autocast: the autocast dtype
        dt = y.dtype
        ctx.n, ctx.has_bias, ctx.x_dtype = n, bool(biases), x.dtype
        ctx.rows = [t.shape[0] for t in weights]
        ctx.save_for_backward(x.to(dt), *weights)
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, *weights = ctx.saved_tensors
        dt = xc.dtype
        gy = gy.to(dt)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ torch.cat(weights).to(dt)).to(ctx.x_dtype)
        g2 = gy.reshape(-1, gy.shape[-1])
        if any(ctx.needs_input_grad[2:2 + ctx.n]):
            gw = (g2.t() @ xc.reshape(-1, xc.shape[-1])).split(ctx.rows)
            gw = [g.to(w.dtype) for g, w in zip(gw, weights)]
        else:
            gw = [None] * ctx.n
        if ctx.has_bias:
            if any(ctx.needs_input_grad[2 + ctx.n:]):
                gb = [g.to(w.dtype) for g, w in zip(g2.sum(0, dtype=_acc(dt)).split(ctx.rows), weights)]
            else:
                gb = [None] * ctx.n
        else:
            gb = []
        return (gx, None, *gw, *gb)


def concat_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None):
    """``F.linear(x, cat(weights), cat(biases))`` whose backward keeps no concatenated weight (see module doc).
    ``biases`` is None or one bias per weight."""
    weights = tuple(weights)
    biases = tuple(biases) if biases is not None else ()
    if biases and len(biases) != len(weights):
        raise ValueError("concat_linear: give one bias per weight (or none)")
    return _ConcatLinear.apply(x, len(weights), *weights, *biases)


class _GeluMLP(torch.autograd.Function):
    """y = gelu(x W1^T + b1) W2^T; saves x and the pre-activation, recomputes the activation in the backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, approximate: str):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # 2-D GEMMs: no view/unview around each of them
        u = F.linear(x2, w1, b1)
        y = F.linear(F.gelu(u, approximate=approximate), w2)
        dt = u.dtype
        ctx.approximate, ctx.x_shape, ctx.x_dtype = approximate, shape, x.dtype
        ctx.has_bias = b1 is not None
        ctx.save_for_backward(x2.to(dt), u, w1, w2)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, u, w1, w2 = ctx.saved_tensors
        dt = u.dtype
        gy2 = gy.to(dt).reshape(-1, gy.shape[-1])
        gw2 = (gy2.t() @ F.gelu(u, approximate=ctx.approximate)).to(w2.dtype) if ctx.needs_input_grad[3] else None
        gu = torch.ops.aten.gelu_backward(gy2 @ w2.to(dt), u, approximate=ctx.approximate)
        gx = (gu @ w1.to(dt)).to(ctx.x_dtype).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw1 = (gu.t() @ x2).to(w1.dtype) if ctx.needs_input_grad[1] else None
        gb1 = gu.sum(0, dtype=_acc(dt)).to(w1.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw1, gb1, gw2, None


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2)`` (the FFN without its output bias,
    which the post-LN epilogue adds) whose backward recomputes the GELU instead of keeping its [rows, 4d]
    output: one activation tensor of the FFN less per layer in memory, one elementwise pass more."""
    return _GeluMLP.apply(x, w1, b1, w2, approximate)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean label-smoothed cross-entropy of ``x W^T + b`` over the rows whose target is not -100, computed in row
    chunks; saves x and one log-sum-exp per row, and recomputes each chunk's logits in the backward."""

    @staticmethod
    def forward(ctx, x, w, b, targets, label_smoothing: float, chunk: int):
        n = x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        valid = targets != -100
        count = valid.sum().clamp_min(1).to(acc)
        lse = torch.empty(n, dtype=acc, device=x.device)
        total = torch.zeros((), dtype=acc, device=x.device)
        dt = x.dtype  # the GEMM's dtype: autocast's where it is on (the backward repeats it in that dtype)
        for r in range(0, n, chunk):
            logits = F.linear(x[r:r + chunk], w, b)
            dt = logits.dtype
            logits = logits.to(acc)
            tgt = targets[r:r + chunk]
            lse_c = torch.logsumexp(logits, dim=1)
            lse[r:r + chunk] = lse_c
            z_t = logits.gather(1, tgt.clamp_min(0).unsqueeze(1)).squeeze(1)
            row = lse_c - (1.0 - label_smoothing) * z_t - label_smoothing * logits.mean(dim=1)
            total = total + torch.where(valid[r:r + chunk], row, 0.0).sum()
        ctx.save_for_backward(x.to(dt), w, b if b is not None else x.new_empty(0), targets, lse, count)
        ctx.has_bias, ctx.ls, ctx.chunk, ctx.x_dtype = b is not None, label_smoothing, chunk, x.dtype
        return total / count

    @staticmethod
    def backward(ctx, g):
        x, w, b, targets, lse, count = ctx.saved_tensors
        b = b if ctx.has_bias else None
        ls, n, v = ctx.ls, x.shape[0], w.shape[0]
        acc = lse.dtype
        scale = g.to(acc) / count
        dt = x.dtype  # the forward's GEMM dtype (autocast's, or the inputs')
        wc, bc = w.to(dt), (None if b is None else b.to(dt))
        gx = torch.empty(x.shape, dtype=ctx.x_dtype, device=x.device) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        gb = torch.zeros(v, dtype=acc, device=w.device) if ctx.has_bias and ctx.needs_input_grad[2] else None
        for r in range(0, n, ctx.chunk):
            xc = x[r:r + ctx.chunk]
            logits = F.linear(xc, wc, bc)
            tgt = targets[r:r + ctx.chunk]
            grad = torch.exp(logits.to(acc) - lse[r:r + ctx.chunk].unsqueeze(1)) - ls / v
            grad.scatter_add_(1, tgt.clamp_min(0).unsqueeze(1),
                              torch.full((grad.shape[0], 1), ls - 1.0, dtype=grad.dtype, device=grad.device))
            grad = grad * torch.where(tgt != -100, scale, 0.0).unsqueeze(1)
            gl = grad.to(dt)
            if gx is not None:
                gx[r:r + ctx.chunk] = (gl @ wc).to(ctx.x_dtype)
            if gw is not None:
                gw += (gl.t() @ xc).to(acc)
            if gb is not None:
                gb += grad.sum(0)
        return (gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype), None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, *,
                         label_smoothing: float = 0.0, chunk: int = 1024) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=-100, label_smoothing=...)`` (the mean over
    the rows with a target; 0 when there is none) without keeping the [rows, vocab] logits or log-probabilities for
    the backward: x [N, d], targets [N]. The logits are made ``chunk`` rows at a time, in the forward and again in
    the backward (one extra GEMM of the LM head, instead of N x vocab floats of memory). Under autocast both GEMMs
    run in the autocast dtype (the backward runs outside autocast: the input is saved in that dtype)."""
    if x.dim() != 2 or targets.shape != (x.shape[0],):
        raise ValueError(f"linear_cross_entropy: x must be [N, d] and targets [N], got {list(x.shape)} and "
                         f"{list(targets.shape)}")
    return _LinearCrossEntropy.apply(x, weight, bias, targets, float(label_smoothing), int(chunk))
