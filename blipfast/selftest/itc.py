"""Self-test cases of the fused ITC loss (``itc_loss``, Triton; docs/selftest.md).

Each case simulates one rank of a world through ``itc_loss_from_gathered`` (the own pairs at a non-zero column
offset whenever the world has more than one rank) and holds the loss, both logit matrices and the gradients of the
image features, the text features and the temperature to the tolerance rule against the float64 reference, with
the reference in the tested dtype as PyTorch's yardstick. Quick: B = 1, a small world with image ids (several
positives per row) and label smoothing, the Q-Former's 32 queries. Full adds a 64 x 4 batch, 256-wide features
without label smoothing, tied logits (the softmax mass split between equal columns) and a temperature far from 1.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import ops
from .case import FULL, QUICK, Case, rule

NAMES = ("loss", "s_i2t", "s_t2i", "d image_feats", "d text_feats", "d temp")


def _inputs(inp, b, world, q, e, dtype, ids, ties):
    bw = b * world
    img_all = inp.randn(bw, q, e)
    txt_all = inp.randn(bw, e)
    if ties:  # columns in identical pairs: every row's largest logits tie
        img_all[1::2], txt_all[1::2] = img_all[0::2], txt_all[0::2]
    img_all, txt_all = F.normalize(img_all, dim=-1).to(dtype), F.normalize(txt_all, dim=-1).to(dtype)
    ids_all = inp.randint(0, max(1, bw // 2), (bw,)) if ids else None
    temp = (0.05 + 0.05 * inp.rand(())).to(dtype)  # rounded to dtype: exactly representable there
    return img_all, txt_all, ids_all, temp


def run_rank(img_all, txt_all, ids_all, temp, rank, b, dtype, backend, ls, grad_scale):
    """(loss, s_i2t, s_t2i, d img, d txt, d temp) of one rank in ``dtype`` on ``backend``."""
    img = img_all[rank * b:(rank + 1) * b].to(dtype).clone().requires_grad_()
    txt = txt_all[rank * b:(rank + 1) * b].to(dtype).clone().requires_grad_()
    t = temp.to(dtype).clone().requires_grad_()
    kw = dict(rank=rank, label_smoothing=ls, return_logits=True)
    if ids_all is not None:
        kw.update(image_ids=ids_all[rank * b:(rank + 1) * b], image_ids_all=ids_all)
    loss, s1, s2 = ops.itc_loss_from_gathered(img, txt, img_all.to(dtype), txt_all.to(dtype), t, backend=backend,
                                              **kw)
    gi, gt, gtemp = torch.autograd.grad(loss * grad_scale, [img, txt, t])
    return [loss.detach(), s1.detach(), s2.detach(), gi, gt, gtemp]


def _case(inp, backend, dtype, b, world, q, e, ls, ids, ties=False, temp_scale=1.0):
    img_all, txt_all, ids_all, temp = _inputs(inp, b, world, q, e, dtype, ids, ties)
    temp = (temp.float() * temp_scale).to(dtype)
    rank = world - 1
    g = 1.3  # an upstream gradient other than 1
    ref = run_rank(img_all, txt_all, ids_all, temp, rank, b, torch.float64, "torch", ls, g)
    low = run_rank(img_all, txt_all, ids_all, temp, rank, b, dtype, "torch", ls, g)
    fast = run_rank(img_all, txt_all, ids_all, temp, rank, b, dtype, backend, ls, g)
    return [rule(n, f, r, lo, dtype) for n, f, r, lo in zip(NAMES, fast, ref, low)]


# (B, world, Q, E, label_smoothing, image_ids, ties, temperature scale, note)
QUICK_SHAPES = [
    (1, 1, 32, 256, 0.1, False, False, 1.0, "B=1"),
    (6, 3, 32, 256, 0.1, True, False, 1.0, "image ids"),
]
FULL_SHAPES = [
    (64, 4, 32, 256, 0.0, False, False, 1.0, ""),
    (64, 2, 32, 256, 0.1, True, False, 1.0, "image ids"),
    (9, 2, 7, 40, 0.1, False, True, 1.0, "tied logits"),
    (16, 2, 32, 256, 0.1, False, False, 20.0, "temperature ~1.5"),
]


def itc_cases(backend: str, dtype: torch.dtype, level: str) -> list:
    shapes = [(s, QUICK) for s in QUICK_SHAPES] + ([(s, FULL) for s in FULL_SHAPES] if level == FULL else [])
    out = []
    for (b, world, q, e, ls, ids, ties, ts, note), lvl in shapes:
        label = f"B={b} world={world} Q={q} E={e} ls={ls}" + (f" ({note})" if note else "")
        run = functools.partial(_case, backend=backend, dtype=dtype, b=b, world=world, q=q, e=e, ls=ls, ids=ids,
                                ties=ties, temp_scale=ts)
        out.append(Case("itc_loss", backend, dtype, label, run, lvl))
    return out


CASES = {("itc_loss", "triton"): itc_cases}
