"""The check functions of ITM hard-negative sampling (tests/kernels/test_hard_negatives*.py, and the mutation tests
that run them against wrong kernels): the C++ op of blipfast._C, chi-square goodness of fit against the masked
softmax, the draw rules on extreme logits, index-for-index equality with the torch reference."""
from __future__ import annotations

import os

import pytest
import torch

from blipfast.ops import sample_hard_negatives_ref
from blipfast.ops.hard_negatives import drawable_mask
from blipfast.selftest.negatives import chi_square_pvalue as _chi_square_pvalue
from tests.helpers.runtime import require_extension


def _cpp_op():
    """torch.ops.blipfast_C.sample_hard_negatives, or None when no build registers it."""
    from blipfast._ext import cuda_extension_available

    cuda_extension_available()  # loads blipfast._C when it was built
    lib = os.environ.get("BLIPFAST_TEST_OPS_LIB")
    if lib and not hasattr(torch.ops.blipfast_C, "sample_hard_negatives"):
        torch.ops.load_library(lib)
    try:
        return torch.ops.blipfast_C.sample_hard_negatives
    except (AttributeError, RuntimeError):
        return None


def _repeated_rows(logits: torch.Tensor, drawable_row: torch.Tensor, rows: int):
    """``rows`` independent draws of one row: the same logits and mask in every row, and each row has its
    own Philox stream (the stream is keyed by the row)."""
    bw = logits.numel()
    s = logits.view(1, bw).expand(rows, bw).contiguous()
    d = drawable_row.view(1, bw).expand(rows, bw).contiguous()
    return s, d


def _softmax_masked(logits, drawable_row):
    x = torch.where(drawable_row, logits.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    return torch.softmax(x, 0)


def _chi_square_check(sampler, device):
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(13, generator=g) * 1.5
    logits[4] = -25.0  # a vanishing probability
    drawable = torch.ones(13, dtype=torch.bool)
    drawable[[2, 9]] = False  # e.g. the own pair and a same-image pair
    rows = 3000
    s, d = _repeated_rows(logits, drawable, rows)
    seed = torch.tensor([987654321987], dtype=torch.int64)
    neg_text, neg_image = sampler(s.to(device), (s * 0.5).to(device), d.to(device), seed.to(device))
    for idx, lg in ((neg_text, logits), (neg_image, logits * 0.5)):
        idx = idx.cpu()
        assert bool((idx >= 0).all()) and not bool(drawable[idx].logical_not().any()), "drew an excluded column"
        counts = torch.bincount(idx, minlength=13)
        p = _chi_square_pvalue(counts, _softmax_masked(lg, drawable))
        assert p > 1e-4, f"chi-square p = {p:.2e}: draws do not follow the masked softmax"


def _cases(device, dtype):
    """(s_i2t, s_t2i, drawable, seed, row_offset) with awkward sizes and extreme values."""
    out = []
    for b, bw, off in [(1, 1, 0), (3, 12, 3), (5, 5, 0), (64, 512, 448), (2, 300, 17)]:
        s1 = (torch.randn(b, bw, device=device) * 3).to(dtype)
        s2 = (torch.randn(b, bw, device=device) * 3).to(dtype)
        d = drawable_mask(b, bw, off, device=device)
        if bw > 2:
            s1[0, :2] = float("nan")
            s2[-1, -1] = float("-inf")
            s1[-1, 1] = float("inf")
            s2[0, 0] = -3e38 if dtype != torch.float16 else -6e4
            s2[0, 1] = 3e38 if dtype != torch.float16 else 6e4
            d[min(1, b - 1)] = False  # a row with nothing drawable
        seed = torch.randint(0, 2**62, (1,), device=device)
        out.append((s1, s2, d, seed, off))
    return out


def check_draw_rules(sampler, device):
    """On extreme logits (NaN, +-inf, +-3e38) and a row with nothing drawable: -1 exactly for rows with no
    drawable column, never a NaN, -inf or excluded column, and a +inf logit always wins."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for s1, s2, d, seed, off in _cases(device, dtype):
            for s, idx in zip((s1, s2), sampler(s1, s2, d, seed, off)):
                ok = d & ~torch.isnan(s.double()) & (s.double() != float("-inf"))
                assert idx.dtype == torch.int64
                has = ok.any(1)
                assert torch.equal(idx >= 0, has), "-1 exactly for rows with nothing drawable"
                rows = torch.nonzero(has).flatten()
                assert bool(ok[rows, idx[rows]].all()), "drew a NaN, -inf or excluded column"
                inf_rows = (s.double() == float("inf")) & ok
                for r in torch.nonzero(inf_rows.any(1)).flatten():
                    assert bool(inf_rows[r, idx[r]]), "a +inf logit must win"


def check_matches_reference(op, device, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """op(s_i2t, s_t2i, drawable, seed, row_offset) returns the reference's indices exactly, on awkward sizes,
    extreme logits and rank offsets, for every logit dtype."""
    for dtype in dtypes:
        for s1, s2, d, seed, off in _cases(device, dtype):
            ref = sample_hard_negatives_ref(s1, s2, d, seed, off)
            got = op(s1, s2, d, seed, off)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (dtype, tuple(s1.shape), off)


def _cpp_op_or_skip():
    """_cpp_op(); without it the test skips (no CUDA device) or fails (a CUDA device is visible):
    tests.helpers.runtime.require_extension."""
    op = _cpp_op()
    if op is None:
        require_extension()
        pytest.fail("blipfast._C loads but registers no blipfast_C::sample_hard_negatives")
    return op


_cuda_op = _cpp_op_or_skip  # the name the CUDA tests (and tests/kernels/test_mutations.py) use
