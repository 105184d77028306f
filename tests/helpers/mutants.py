"""Deliberately wrong kernels, shared by the mutation tests (tests/kernels/test_mutations.py) and the self-test's
tests (tests/selftest/): a check that cannot fail proves nothing. :class:`Mutant` replaces an entry point with a
wrong one built from the real one; the dicts hold wrong variants of the post-LN epilogue's fused contract and of
the hard-negative sampler."""
from __future__ import annotations

import torch


class Mutant:
    """Replaces ``module.name`` by ``wrong(original, *args, **kwargs)`` and counts the calls."""

    def __init__(self, monkeypatch, module, name, wrong):
        self.calls = 0
        original = getattr(module, name)

        def patched(*args, **kwargs):
            self.calls += 1
            return wrong(original, *args, **kwargs)

        monkeypatch.setattr(module, name, patched)


def outputs(transform):
    """A wrong kernel that runs the real one and transforms its outputs."""
    return lambda f, *a, **k: transform(*f(*a, **k))


# the post-LN epilogue's fused contract (blipfast.ops.layernorm_epilogue._fwd_torch / _bwd_torch, or the CUDA
# kernels' raw ops): f(x, bias, residual, weight, ln_bias, seed, eps, p) -> (y, z, stats) and
# f(dy, z, stats, weight, seed, p) -> (dx, dresidual, dweight, dln_bias, dbias)


def _ln_fwd_rms(f, x, bias, res, w, lb, seed, eps, p):
    """RMSNorm instead of LayerNorm: the row mean is not subtracted."""
    y, z, stats = f(x, bias, res, w, lb, seed, eps, p)
    zf = z.to(stats.dtype)
    rms = torch.rsqrt(zf.square().mean(1) + eps)
    y = (zf * rms[:, None] * w.to(zf.dtype) + lb.to(zf.dtype)).to(y.dtype)
    return y, z, torch.stack([torch.zeros_like(rms), rms])


def _ln_fwd_unbiased(f, x, bias, res, w, lb, seed, eps, p):
    """rstd from the unbiased variance (N - 1)."""
    y, z, stats = f(x, bias, res, w, lb, seed, eps, p)
    mean, n = stats[0], z.shape[1]
    zc = z.to(stats.dtype) - mean[:, None]
    rstd = torch.rsqrt(zc.square().sum(1) / (n - 1) + eps)
    y = (zc * rstd[:, None] * w.to(zc.dtype) + lb.to(zc.dtype)).to(y.dtype)
    return y, z, torch.stack([mean, rstd])


def _ln_fwd_no_rescale(f, x, bias, res, w, lb, seed, eps, p):
    """Dropout without the 1 / (1 - p) rescale."""
    h = x.float() if bias is None else x.float() + bias
    return f((h * (1 - p)).to(x.dtype), None, res, w, lb, seed, eps, p)


def _ln_bwd_half_dweight(f, *a):
    dx, dres, dw, dlb, db = f(*a)
    return dx, dres, dw / 2, dlb, db


def _ln_bwd_other_seed(f, dy, z, stats, w, seed, p):
    return f(dy, z, stats, w, None if seed is None else seed + 1, p)


def _ln_bwd_no_dbias(f, *a):
    dx, dres, dw, dlb, db = f(*a)
    return dx, dres, dw, dlb, torch.zeros_like(db)


LN_FWD_MUTANTS = {"rmsnorm": _ln_fwd_rms, "unbiased_var": _ln_fwd_unbiased, "no_dropout_rescale": _ln_fwd_no_rescale}
LN_BWD_MUTANTS = {"half_dweight": _ln_bwd_half_dweight, "mask_of_another_seed": _ln_bwd_other_seed,
                  "no_dbias": _ln_bwd_no_dbias}


SAMPLER_MUTANTS = {
    # (mutant of op(s_i2t, s_t2i, drawable, seed, row_offset), the checks that must reject it)
    "own_pair_drawable": (lambda op, s1, s2, d, seed, off: op(s1, s2, torch.ones_like(d), seed, off),
                          ("chi", "rules", "exact")),
    "temperature_doubled": (lambda op, s1, s2, d, seed, off: op(s1 * 2, s2 * 2, d, seed, off), ("chi", "exact")),
    "directions_swapped": (lambda op, s1, s2, d, seed, off: op(s2, s1, d, seed, off), ("chi", "exact")),
    # the two directions' Philox streams swapped: the right distributions, so only the exact check sees it
    "streams_swapped": (lambda op, s1, s2, d, seed, off: op(s2, s1, d, seed, off)[::-1], ("exact",)),
    "row_offset_off_by_one": (lambda op, s1, s2, d, seed, off: op(s1, s2, d, seed, off + 1), ("exact",)),
    "nan_logit_drawable": (lambda op, s1, s2, d, seed, off: op(torch.nan_to_num(s1, nan=1e4), s2, d, seed, off),
                           ("rules", "exact")),
}
