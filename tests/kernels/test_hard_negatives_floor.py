"""``sample_hard_negatives(..., floor=f)``: BLIP (v1)'s ITM negatives, drawn with weights softmax(s) + f and the
own pair (or same-image columns) set to 0, on every implementation (the torch reference, the C++ kernel's CPU
build, the CUDA kernel).

The distribution is checked against BLIP's own formula, restated here (``F.softmax(s, dim=1) + 1e-4``, then
``fill_diagonal_(0)``, normalised as ``torch.multinomial`` does) with a chi-square test over many rows; the
implementations must agree index for index; ``floor=0`` must stay the plain softmax draw, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blipfast.ops import sample_hard_negatives, sample_hard_negatives_from_gathered, sample_hard_negatives_ref
from blipfast.ops.hard_negatives import drawable_mask, gumbel_noise, row_log_norm
from tests.helpers.hard_negatives import _chi_square_pvalue, _cpp_op_or_skip, _repeated_rows

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _blip_weights(logits: torch.Tensor, drawable_row: torch.Tensor, floor: float) -> torch.Tensor:
    """BLIP_Pretrain's weights for one row: softmax over the whole row + floor, excluded columns 0, normalised."""
    w = F.softmax(logits.double(), dim=0) + floor
    w = w.masked_fill(~drawable_row, 0.0)
    return w / w.sum()


def _chi_square(sampler, device, floor, scale=6.0):
    """Draws of 4000 copies of one row (each its own Philox stream) against BLIP's weights."""
    g = torch.Generator().manual_seed(4321)
    logits = torch.randn(11, generator=g) * scale  # wide: most of the softmax's columns live off the floor
    drawable = torch.ones(11, dtype=torch.bool)
    drawable[[0, 6]] = False  # the own pair and a same-image column; their softmax mass stays in the normaliser
    s, d = _repeated_rows(logits, drawable, 4000)
    seed = torch.tensor([20240601], dtype=torch.int64)
    neg_text, neg_image = sampler(s.to(device), (s * 0.25).to(device), d.to(device), seed.to(device), floor)
    for direction, (idx, lg) in enumerate(((neg_text, logits), (neg_image, logits * 0.25))):
        idx = idx.cpu()
        assert bool((idx >= 0).all()) and not bool((~drawable[idx]).any()), "drew an excluded column"
        probs = _blip_weights(lg, drawable, floor)
        p = _chi_square_pvalue(torch.bincount(idx, minlength=11), probs)
        assert p > 1e-4, f"chi-square p = {p:.2e}: draws do not follow softmax + {floor}"
        if floor >= 0.01 and direction == 0:  # columns the plain softmax (almost) never draws: drawn at the floor
            low = (F.softmax(lg.double(), 0) < 1e-4) & drawable
            assert bool(low.any()) and int(torch.isin(idx, torch.nonzero(low).flatten()).sum()) > 0


def _ref_sampler(s1, s2, d, seed, floor):
    return sample_hard_negatives_ref(s1, s2, d, seed, 0, floor)


@pytest.mark.parametrize("floor", [1e-4, 0.02])
def test_reference_follows_blip_weights(floor):
    _chi_square(_ref_sampler, "cpu", floor)


def test_public_op_is_blips_local_draw():
    """The public op over a local [B, B] block with floor 1e-4 draws from BLIP's weights (own pair excluded)."""
    b = 5
    g = torch.Generator().manual_seed(9)
    s = torch.randn(b, b, generator=g) * 4
    counts = torch.zeros(b, b)
    for k in range(1500):
        nt, _ = sample_hard_negatives(s, s.T.contiguous(), seed=k, floor=1e-4)
        counts[torch.arange(b), nt] += 1
    assert float(counts.diagonal().sum()) == 0.0, "drew the own pair"
    for i in range(b):
        d = torch.ones(b, dtype=torch.bool)
        d[i] = False
        p = _chi_square_pvalue(counts[i].long(), _blip_weights(s[i], d, 1e-4))
        assert p > 1e-4, f"row {i}: chi-square p = {p:.2e}"


def test_floor_zero_is_the_plain_softmax_draw_bit_for_bit():
    """floor=0 (explicit) is the default draw, which is argmax(s + Gumbel noise) over the drawable columns."""
    b, bw = 6, 6
    s1, s2 = torch.randn(b, bw) * 3, torch.randn(b, bw) * 3
    d = drawable_mask(b, bw, 0)
    seed = torch.tensor([77])
    plain = sample_hard_negatives_ref(s1, s2, d, seed)
    zero = sample_hard_negatives_ref(s1, s2, d, seed, 0, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(plain, zero))
    for direction, (s, got) in enumerate(zip((s1, s2), plain)):
        key = (s.double() + gumbel_noise(seed, direction, b, bw, "cpu")).masked_fill(~d, -INF)
        assert torch.equal(got, key.argmax(1))
    a = sample_hard_negatives(s1, s2, seed=5)
    c = sample_hard_negatives(s1, s2, seed=5, floor=0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_floor_changes_the_draw_and_keeps_the_stream():
    """The same Philox stream: with a vanishing floor the draw equals the plain one, a large floor moves it
    towards uniform (low-probability columns get drawn)."""
    b = 64
    s = torch.randn(b, b) * 8
    d = drawable_mask(b, b, 0)
    seed = torch.tensor([3])
    plain = sample_hard_negatives_ref(s, s, d, seed)
    tiny = sample_hard_negatives_ref(s, s, d, seed, 0, 1e-300)
    assert torch.equal(plain[0], tiny[0]) and torch.equal(plain[1], tiny[1])
    big = sample_hard_negatives_ref(s, s, d, seed, 0, 10.0)
    assert not torch.equal(plain[0], big[0])


def _nonfinite_case(dtype):
    g = torch.Generator().manual_seed(2)
    b, bw = 6, 300
    s1 = torch.randn(b, bw, generator=g, dtype=torch.float64) * 3
    s2 = torch.randn(b, bw, generator=g, dtype=torch.float64) * 3
    s1[0, [290, 7]] = INF     # +inf still wins: the first drawable one
    s1[1, :] = NAN             # nothing drawable
    s1[2, :150] = NAN          # NaN never drawn, and left out of the normaliser
    s1[3, :] = -INF
    s1[3, 40] = 1.0            # the only drawable column
    s2[4, 4] = INF             # +inf at the own pair only: an ordinary draw among the finite columns
    s2[5, :] = -INF            # nothing drawable
    return s1.to(dtype), s2.to(dtype), drawable_mask(b, bw, 0)


def _check_nonfinite(draws):
    nt, ni = (x.cpu().tolist() for x in draws)
    assert nt[0] == 7 and nt[1] == -1 and nt[2] >= 150 and nt[3] == 40
    assert ni[4] not in (-1, 4) and ni[5] == -1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rules_with_a_floor(dtype):
    s1, s2, d = _nonfinite_case(dtype)
    for seed in (0, 11, 2**40 + 1):
        _check_nonfinite(sample_hard_negatives_ref(s1, s2, d, torch.tensor([seed]), 0, 1e-4))
        _check_nonfinite(sample_hard_negatives_from_gathered(s1, s2, seed=seed, floor=1e-4, backend="torch"))


def test_row_log_norm_leaves_nan_out():
    s = torch.tensor([[0.0, NAN, 1.0], [NAN, NAN, NAN]])
    ln = row_log_norm(s, s)
    assert ln.dtype == torch.float64 and ln.shape == (2, 2)
    assert ln[0, 0].item() == pytest.approx(float(torch.logsumexp(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)))
    assert ln[0, 1].item() == -INF


def test_floor_validation():
    s = torch.randn(3, 3)
    for bad in (-1e-4, float("nan"), float("inf"), True, "1e-4", None):
        with pytest.raises(ValueError, match="floor"):
            sample_hard_negatives(s, s, floor=bad)
        with pytest.raises(ValueError, match="floor"):
            sample_hard_negatives_from_gathered(s, s, floor=bad)


def test_compiles_fullgraph_with_a_floor():
    s = torch.randn(4, 4)
    fn = torch.compile(lambda a, seed: sample_hard_negatives_from_gathered(a, a, seed=seed, floor=1e-4),
                       fullgraph=True, backend="eager")
    seed = torch.tensor([9])
    got = fn(s, seed)
    ref = sample_hard_negatives_ref(s, s, drawable_mask(4, 4, 0), seed, 0, 1e-4)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ----------------------------------------------------------------------------------------------
# the C++ kernel's CPU build and the CUDA kernel


def _cases(device, dtype):
    out = []
    for b, bw, off in [(1, 1, 0), (3, 12, 3), (5, 5, 0), (64, 512, 448), (2, 300, 17)]:
        s1 = (torch.randn(b, bw, device=device) * 6).to(dtype)
        s2 = (torch.randn(b, bw, device=device) * 6).to(dtype)
        d = drawable_mask(b, bw, off, device=device)
        if bw > 2:
            s1[0, :2] = NAN
            s2[-1, -1] = -INF
            s1[-1, 1] = INF
            d[min(1, b - 1)] = False
        out.append((s1, s2, d, torch.randint(0, 2**62, (1,), device=device), off))
    return out


def _need_cpp():
    return _cpp_op_or_skip()


@pytest.mark.parametrize("floor", [1e-4, 0.3])
def test_cpp_cpu_matches_reference_index_for_index(floor):
    op = _need_cpp()
    for dtype in DTYPES:
        for s1, s2, d, seed, off in _cases("cpu", dtype):
            ln = row_log_norm(s1, s2)
            ref = sample_hard_negatives_ref(s1, s2, d, seed, off, floor, ln)
            got = op(s1, s2, d, seed, off, floor, ln)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (dtype, tuple(s1.shape), off)


def test_cpp_cpu_chi_square_and_nonfinite():
    op = _need_cpp()
    _chi_square(lambda s1, s2, d, seed, f: op(s1, s2, d, seed, 0, f, row_log_norm(s1, s2)), "cpu", 0.02)
    for dtype in DTYPES:
        s1, s2, d = _nonfinite_case(dtype)
        _check_nonfinite(op(s1, s2, d, torch.tensor([5]), 0, 1e-4, row_log_norm(s1, s2)))


def test_cpp_floor_validation():
    op = _need_cpp()
    s = torch.randn(2, 4)
    d = torch.ones(2, 4, dtype=torch.bool)
    seed = torch.tensor([1])
    with pytest.raises(RuntimeError, match="log_norm"):
        op(s, s, d, seed, 0, 1e-4)
    with pytest.raises(RuntimeError, match="log_norm"):
        op(s, s, d, seed, 0, 1e-4, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="floor"):
        op(s, s, d, seed, 0, -1.0)
    zero = op(s, s, d, seed, 0, 0.0)  # floor 0 ignores log_norm: the plain draw
    assert torch.equal(zero[0], op(s, s, d, seed, 0)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference_index_for_index(dtype):
    op = _cpp_op_or_skip()
    cases = _cases("cuda", dtype)
    b, bw = 128, 8192
    cases.append(((torch.randn(b, bw, device="cuda") * 5).to(dtype), (torch.randn(b, bw, device="cuda") * 5).to(dtype),
                  drawable_mask(b, bw, 3 * b, device="cuda"), torch.randint(0, 2**62, (1,), device="cuda"), 3 * b))
    for floor in (1e-4, 0.3):
        for s1, s2, d, seed, off in cases:
            ln = row_log_norm(s1, s2)
            ref = sample_hard_negatives_ref(s1, s2, d, seed, off, floor, ln)
            got = op(s1, s2, d, seed, off, floor, ln)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (dtype, tuple(s1.shape), off, floor)
            pub = sample_hard_negatives_from_gathered(s1, s2, rank=off // s1.shape[0], seed=seed, floor=floor,
                                                      backend="cuda") if off % s1.shape[0] == 0 else got
            assert torch.equal(pub[0], got[0]) and torch.equal(pub[1], got[1])


@pytest.mark.gpu
def test_cuda_chi_square_nonfinite_and_no_sync():
    op = _cpp_op_or_skip()
    _chi_square(lambda s1, s2, d, seed, f: op(s1, s2, d, seed, 0, f, row_log_norm(s1, s2)), "cuda", 0.02)
    for dtype in DTYPES:
        s1, s2, d = _nonfinite_case(dtype)
        s1, s2, d = s1.cuda(), s2.cuda(), d.cuda()
        _check_nonfinite(op(s1, s2, d, torch.tensor([5], device="cuda"), 0, 1e-4, row_log_norm(s1, s2)))
    s = torch.randn(64, 64, device="cuda")
    seed = torch.tensor([42], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample_hard_negatives_from_gathered(s, s, seed=seed, floor=1e-4, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = sample_hard_negatives_ref(s, s, drawable_mask(64, 64, 0, device="cuda"), seed, 0, 1e-4)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
