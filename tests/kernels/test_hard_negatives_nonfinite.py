"""sample_hard_negatives on non-finite logits, the same on every implementation (the torch reference, the C++
kernel's CPU build, the CUDA kernel):
- NaN and -inf logits are never drawn; a row with nothing else drawable returns -1 (also several such rows);
- a +inf logit takes all the softmax's mass: the draw is deterministic, the FIRST drawable +inf column
  (whatever the seed, the dtype, or which CUDA thread's slice of the row holds it); a +inf own pair (or
  same-image column) is still never drawn.
"""
from __future__ import annotations

import pytest
import torch

from blipfast.ops import sample_hard_negatives_from_gathered, sample_hard_negatives_ref
from blipfast.ops.hard_negatives import drawable_mask
from tests.helpers.hard_negatives import _cpp_op_or_skip

NAN, INF = float("nan"), float("inf")
B, BW, OFF = 7, 300, 0  # BW > 256: a CUDA block's threads hold strided slices of each row


def _case(dtype, device="cpu"):
    """(s_i2t, s_t2i, drawable, expected neg_text, expected neg_image); the own pair of row b is column b."""
    g = torch.Generator().manual_seed(7)
    s1 = torch.randn(B, BW, generator=g, dtype=torch.float64) * 3
    s2 = torch.randn(B, BW, generator=g, dtype=torch.float64) * 3
    want1, want2 = [None] * B, [None] * B
    # row 0: +inf at 290, 7 and 130: the first, 7 (it lies in another thread's slice than 290 and 130)
    s1[0, [290, 7, 130]] = INF
    want1[0] = 7
    s2[0, [299, 263]] = INF  # 263 = 256 + 7: thread 7's second element, 299 thread 43's
    want2[0] = 263
    # row 1: +inf at the own pair (never drawable) and at 200; NaN before both
    s1[1, 1], s1[1, 200], s1[1, 0] = INF, INF, NAN
    want1[1] = 200
    s2[1, 1] = INF  # only the own pair is +inf: an ordinary draw among the finite columns
    # rows 2 and 3: all NaN -> -1, both directions
    s1[2], s2[2], s1[3], s2[3] = NAN, NAN, NAN, NAN
    want1[2] = want2[2] = want1[3] = want2[3] = -1
    # row 4: -inf everywhere but the own pair -> -1; its s_t2i row: NaN and -inf but for one +inf at the end
    s1[4] = -INF
    s1[4, 4] = 5.0
    want1[4] = -1
    s2[4, :150], s2[4, 150:] = NAN, -INF
    s2[4, 299] = INF
    want2[4] = 299
    # row 5: every drawable column +inf: the first drawable one (0); s_t2i: the own pair is column 0 of row 0,
    # so row 5's first +inf column 5 is the own pair, and the first drawable one is 6
    s1[5] = INF
    want1[5] = 0
    s2[5, 5:] = INF
    want2[5] = 6
    # row 6: finite (an ordinary draw, not checked here), and a NaN row in the other direction
    s2[6] = NAN
    want2[6] = -1
    drawable = drawable_mask(B, BW, OFF, device=device)
    return s1.to(dtype).to(device), s2.to(dtype).to(device), drawable, want1, want2


def _check(draws, want1, want2, seed):
    for got, want in zip(draws, (want1, want2)):
        got = got.cpu().tolist()
        for row, w in enumerate(want):
            if w is not None:
                assert got[row] == w, f"row {row}: drew {got[row]}, want {w} (seed {seed})"
            else:
                assert got[row] >= 0 and got[row] != row, f"row {row}: drew {got[row]} (seed {seed})"


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_and_public_op(dtype):
    s1, s2, d, want1, want2 = _case(dtype)
    for seed in (0, 1, 2**40 + 3):
        _check(sample_hard_negatives_ref(s1, s2, d, torch.tensor([seed]), OFF), want1, want2, seed)
        _check(sample_hard_negatives_from_gathered(s1, s2, seed=seed, backend="torch"), want1, want2, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_cpu_build(dtype):
    op = _cpp_op_or_skip()
    s1, s2, d, want1, want2 = _case(dtype)
    for seed in (0, 5, -(2**50)):
        got = op(s1, s2, d, torch.tensor([seed]), OFF)
        _check(got, want1, want2, seed)
        ref = sample_hard_negatives_ref(s1, s2, d, torch.tensor([seed]), OFF)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel(dtype):
    op = _cpp_op_or_skip()
    s1, s2, d, want1, want2 = _case(dtype, "cuda")
    for seed in (0, 5, -(2**50)):
        seed_t = torch.tensor([seed], device="cuda")
        got = op(s1, s2, d, seed_t, OFF)
        _check(got, want1, want2, seed)
        ref = sample_hard_negatives_ref(s1, s2, d, seed_t, OFF)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        _check(sample_hard_negatives_from_gathered(s1, s2, seed=seed_t, backend="cuda"), want1, want2, seed)
