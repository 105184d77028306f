"""The check functions of the fused ITC loss (tests/kernels/test_itc.py, and the mutation tests that run them against
wrong kernels): loss, both logit matrices and every gradient of the Triton path against the float64 reference, with
the reference in the tested dtype as the yardstick."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blipfast.ops import itc_loss, itc_loss_ref
from blipfast.selftest.itc import run_rank as _run
from tests.helpers.tolerance import assert_within_torch_error


def _inputs(b, world, q, e, dtype, device, ids=False, scale=1.0, normalize=True, ties=False):
    """Gathered features (rounded to ``dtype``), the local rank's slice, ids and a temperature. ``ties``:
    columns come in identical pairs, so every row's largest logits tie (softmax mass split, not one-hot)."""
    bw = b * world
    img_all = torch.randn(bw, q, e, device=device)
    txt_all = torch.randn(bw, e, device=device)
    if ties:
        img_all[1::2], txt_all[1::2] = img_all[0::2], txt_all[0::2]
    if normalize:
        img_all, txt_all = F.normalize(img_all, dim=-1), F.normalize(txt_all, dim=-1)
    img_all, txt_all = (img_all * scale).to(dtype), (txt_all * scale).to(dtype)
    ids_all = torch.randint(0, max(1, bw // 2), (bw,), device=device) if ids else None
    temp = torch.empty((), device=device).uniform_(0.05, 0.1).to(dtype)  # exactly representable in dtype
    return img_all, txt_all, ids_all, temp


NAMES = ("loss", "s_i2t", "s_t2i", "d image_feats", "d text_feats", "d temp")


def _check_against_reference(b, world, q, e, ls, ids, dtype, device, scale=1.0, normalize=True, ties=False):
    img_all, txt_all, ids_all, temp = _inputs(b, world, q, e, dtype, device, ids, scale, normalize, ties)
    rank = world - 1  # a non-zero offset of the own pairs whenever world > 1
    g = float(torch.empty(()).uniform_(0.5, 2.0))
    ref = _run(img_all, txt_all, ids_all, temp, rank, b, torch.float64, "torch", ls, g)
    low = _run(img_all, txt_all, ids_all, temp, rank, b, dtype, "torch", ls, g)
    fast = _run(img_all, txt_all, ids_all, temp, rank, b, dtype, "triton", ls, g)
    _check_outputs(fast, ref, low, dtype)


def _check_outputs(fast, ref, low, dtype):
    """The tolerance rule (docs/design.md#the-tolerance-rule) for each of NAMES (fast, ref, low as _run returns
    them)."""
    for name, f, r, lo in zip(NAMES, fast, ref, low):
        assert f.dtype == (torch.float32 if name in ("loss", "s_i2t", "s_t2i") else dtype), name
        assert_within_torch_error(f.detach(), r.detach(), lo.detach(), dtype=dtype, name=name)


def check_public_op(b, q, e, device):
    img = F.normalize(torch.randn(b, q, e, device=device), dim=-1)
    txt = F.normalize(torch.randn(b, e, device=device), dim=-1)
    ids = torch.randint(0, max(1, b // 2), (b,), device=device)
    temp = torch.empty((), device=device).uniform_(0.05, 0.1)
    outs = []
    for fn, dtype in ((lambda *a, **k: itc_loss(*a, backend="triton", **k), torch.float32),
                      (itc_loss_ref, torch.float64), (itc_loss_ref, torch.float32)):
        x, y, t = (v.detach().to(dtype).requires_grad_() for v in (img, txt, temp))
        loss, s1, s2 = fn(x, y, t, image_ids=ids, return_logits=True)
        outs.append((loss, s1, s2) + torch.autograd.grad(loss, [x, y, t]))
    _check_outputs(*outs, torch.float32)
