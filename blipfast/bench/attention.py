"""Benchmark cases of the fused Q-Former attention (issue 3) for ``blipfast bench`` and benchmarks/.

Shapes (issue 3): self-attention B=384, H=12, L=32+32 and 32+64 (32 queries + text, a quarter of the
text padded), D=64, each mask mode; cross-attention N=384 row-sets over M=128 images (the ITM pattern:
[positives, one negative image per text, positives]), Lq=32, Lk=257 and 677, D=64. Forward and
forward+backward, dropout 0 and 0.1, bf16 by default.

Candidates per group: blipfast (Triton kernels) and the baselines: the eager reference with a
materialised mask (blipfast's own reference, fp32 math), an HF-style eager attention in the dtype with an
additive mask, F.scaled_dot_product_attention with a boolean mask (cross-attention: K/V expanded to the
N row-sets with index_select, no mask since image tokens are not padded), and FlexAttention under
torch.compile with a block mask built once outside the timed call (no dropout in FlexAttention: n/a).
FlexAttention is the one optional baseline (n/a when it cannot run here); an error anywhere else fails.
Masks and block masks are built outside the timed functions, which favours the baselines.

bytes = what must move: forward reads q, k, v (cross-attention: each image's K/V once) and writes out;
backward reads q, k, v, out, dout and writes dq, dk, dv. flops = 4 * rows * keys * D per (batch, head)
forward (dense count, masked entries included), 2.5x that backward.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.qformer_attention import allowed_mask
from .common import Case

MODES = ("bidirectional", "causal", "unimodal")


def _itm_index(b: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    neg = (torch.arange(b) + torch.randint(1, b, (b,), generator=g)) % b
    return torch.cat([torch.arange(b), neg, torch.arange(b)]).to(device)


def _eager(q, k, v, allowed, scale, p):
    """HF-style attention in the inputs' dtype: [B, L, H, D] -> [B, H, L, D] matmuls, additive mask."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s + torch.where(allowed, 0.0, torch.finfo(s.dtype).min).to(s.dtype)[:, None]
    a = torch.softmax(s, dim=-1)
    if p > 0:
        a = F.dropout(a, p)
    return torch.matmul(a, vh).transpose(1, 2)


def _sdpa(q, k, v, allowed, p):
    mask = None if allowed is None else allowed[:, None]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          dropout_p=p).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(allowed, b, lq, lk, device):
    from torch.nn.attention.flex_attention import create_block_mask

    if allowed is None:
        return None

    def mask_mod(bi, h, qi, kj):
        return allowed[bi, qi, kj]

    return create_block_mask(mask_mod, b, None, lq, lk, device=device)


def _flex(q, k, v, block_mask, p):
    if p > 0:
        raise NotImplementedError("FlexAttention has no attention-probability dropout")
    if isinstance(block_mask, Exception):  # building the block mask failed: time nothing, report why
        raise block_mask
    return _flex_fn()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask).transpose(1, 2)


def _optional(name: str, p: float):
    """Why a baseline may be unable to run here (None: a required one, whose error fails the run)."""
    if not name.startswith("flex"):
        return None
    if p > 0:
        return "FlexAttention has no attention-probability dropout"
    return "FlexAttention (torch.compile of flex_attention) is missing or does not compile on this torch/device"


def _timed(fwd, inputs, dout, backward: bool):
    """fn() for one candidate: forward only, or forward + backward via autograd.grad (no accumulation)."""
    if not backward:
        def run():
            with torch.no_grad():
                return fwd(*inputs)
        return run

    def run():
        out = fwd(*inputs)
        return torch.autograd.grad(out, inputs, dout)
    return run


def _self_cases(device, dtype, ts, modes, ps, passes, b=384, h=12, nq=32, d=64) -> list[Case]:
    out = []
    for t in ts:
        l = nq + t
        gen = torch.Generator(device=device).manual_seed(t)
        q, k, v, do = (torch.randn(b, l, h, d, device=device, dtype=dtype, generator=gen) for _ in range(4))
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        kpm = torch.ones(b, l, dtype=torch.bool, device=device)
        lens = torch.randint(t // 2, t + 1, (b,), device=device, generator=gen)  # a quarter padded on average
        kpm[:, nq:] = torch.arange(t, device=device)[None, :] < lens[:, None]
        scale = 1.0 / math.sqrt(d)
        io = b * l * h * d * q.element_size()
        for mode in modes:
            allowed = allowed_mask(nq, mode, l, l, device, kpm)  # [B, L, L]: the baselines' materialised mask
            try:
                block_mask = _flex_block_mask(allowed, b, l, l, device)
            except Exception as exc:  # noqa: BLE001 - FlexAttention unavailable: its optional case raises it
                block_mask = exc
            fl = 4.0 * b * h * l * l * d
            for p in ps:
                impls = {
                    "blipfast-triton": lambda q, k, v, p=p, mode=mode, kpm=kpm: ops.qformer_attention(
                        q, k, v, num_query=nq, mode=mode, key_padding_mask=kpm, dropout_p=p, backend="triton"),
                    "torch-ref (mask)": lambda q, k, v, p=p, mode=mode, kpm=kpm: ops.qformer_attention(
                        q, k, v, num_query=nq, mode=mode, key_padding_mask=kpm, dropout_p=p, backend="torch"),
                    "eager-hf (mask)": lambda q, k, v, p=p, a=allowed: _eager(q, k, v, a, scale, p),
                    "sdpa (bool mask)": lambda q, k, v, p=p, a=allowed: _sdpa(q, k, v, a, p),
                    "flex (compiled)": lambda q, k, v, p=p, bm=block_mask: _flex(q, k, v, bm, p),
                }
                for ps_ in passes:
                    bwd = ps_ == "fwd+bwd"
                    group = f"self {mode} B={b} L={nq}+{t} p={p} {ps_}"
                    params = dict(op="qformer_attention", mode=mode, B=b, H=h, L=l, num_query=nq, D=d, dropout_p=p,
                                  passes=ps_, dtype=str(dtype).replace("torch.", ""))
                    for name, fn in impls.items():
                        out.append(Case(group=group, name=name, fn=_timed(fn, (q, k, v), do, bwd),
                                        flops=fl * (3.5 if bwd else 1.0), bytes=io * (12 if bwd else 4),
                                        baseline=name != "blipfast-triton", params=params,
                                        optional=_optional(name, p)))
    return out


def _cross_cases(device, dtype, lks, ps, passes, m=128, lq=32, h=12, d=64) -> list[Case]:
    n = 3 * m  # the ITM pattern
    out = []
    idx = _itm_index(m, device)
    for lk in lks:
        gen = torch.Generator(device=device).manual_seed(lk)
        q, do = (torch.randn(n, lq, h, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        k, v = (torch.randn(m, lk, h, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        scale = 1.0 / math.sqrt(d)
        esz = q.element_size()
        qb, kvb = n * lq * h * d * esz, m * lk * h * d * esz
        fl = 4.0 * n * h * lq * lk * d
        for p in ps:
            impls = {
                "blipfast-triton": lambda q, k, v, p=p: ops.cross_attention(q, k, v, kv_index=idx, dropout_p=p,
                                                                           backend="triton"),
                "torch-ref (expand)": lambda q, k, v, p=p: ops.cross_attention(q, k, v, kv_index=idx, dropout_p=p,
                                                                              backend="torch"),
                "eager-hf (expand)": lambda q, k, v, p=p: _eager(q, k.index_select(0, idx), v.index_select(0, idx),
                                                                 None, scale, p),
                "sdpa (expand)": lambda q, k, v, p=p: _sdpa(q, k.index_select(0, idx), v.index_select(0, idx), None, p),
                "flex (compiled, expand)": lambda q, k, v, p=p: _flex(q, k.index_select(0, idx),
                                                                      v.index_select(0, idx), None, p),
            }
            for ps_ in passes:
                bwd = ps_ == "fwd+bwd"
                group = f"cross N={n} M={m} Lq={lq} Lk={lk} p={p} {ps_}"
                params = dict(op="cross_attention", N=n, M=m, H=h, Lq=lq, Lk=lk, D=d, dropout_p=p, passes=ps_,
                              dtype=str(dtype).replace("torch.", ""))
                nbytes = 2 * qb + 2 * kvb + ((4 * qb + 4 * kvb) if bwd else 0)
                for name, fn in impls.items():
                    out.append(Case(group=group, name=name, fn=_timed(fn, (q, k, v), do, bwd),
                                    flops=fl * (3.5 if bwd else 1.0), bytes=nbytes,
                                    baseline=name != "blipfast-triton", params=params,
                                    optional=_optional(name, p)))
    return out


def cases(device, dtype=torch.bfloat16, quick=False) -> list[Case]:
    """All attention cases on ``device``; [] without CUDA (the kernels only run on a GPU, or interpreted)."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    passes = ("fwd", "fwd+bwd")
    if quick:
        return (_self_cases(device, dtype, (32,), MODES, (0.0,), passes)
                + _cross_cases(device, dtype, (257,), (0.0,), passes))
    return (_self_cases(device, dtype, (32, 64), MODES, (0.0, 0.1), passes)
            + _cross_cases(device, dtype, (257, 677), (0.0, 0.1), passes))
