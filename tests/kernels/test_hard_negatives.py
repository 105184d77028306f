"""ITM hard-negative sampling: the torch reference, the C++ CPU kernel and the CUDA kernel.

The draw is a function of (logits, drawable mask, seed, global row): the CUDA kernel and the CPU build of
the same C++ code (csrc/hard_negatives.cu) must return the reference's indices exactly. Statistics:
chi-square of many draws against the masked softmax (fixed seed, so the test is deterministic).
The C++ CPU kernel is part of blipfast._C (built by `pip install -e .`); on a machine without the
extension those tests skip, unless BLIPFAST_TEST_OPS_LIB names a library that registers blipfast_C ops.
"""
from __future__ import annotations

import os

import pytest
import torch

from blipfast.ops import sample_hard_negatives, sample_hard_negatives_from_gathered, sample_hard_negatives_ref
from blipfast.ops.hard_negatives import drawable_mask


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


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of ``counts`` against ``probs`` (cells with expectation < 5 pooled)."""
    n = counts.sum().double()
    exp = probs.double() * n
    big = exp >= 5
    obs_c = torch.cat([counts.double()[big], counts.double()[~big].sum().view(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    df = obs_c.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


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


# ----------------------------------------------------------------------------------------------
# reference (CPU)


def test_reference_chi_square_cpu():
    _chi_square_check(lambda *a: sample_hard_negatives_ref(*a), "cpu")


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


def test_reference_extreme_logits_cpu():
    check_draw_rules(sample_hard_negatives_ref, "cpu")


def test_image_ids_exclusion_and_single_pair():
    """Same-image columns are never drawn; a row whose every column shows its image returns -1 (B*W=1)."""
    s = torch.randn(6, 6)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    for seed in range(20):
        nt, ni = sample_hard_negatives(s, s.T.contiguous(), image_ids=ids, seed=seed)
        for idx in (nt, ni):
            assert bool((ids[idx] != ids).all())
    nt, ni = sample_hard_negatives(torch.randn(1, 1), torch.randn(1, 1), seed=3)
    assert nt.tolist() == [-1] and ni.tolist() == [-1]
    nt, ni = sample_hard_negatives(torch.randn(3, 3), torch.randn(3, 3), image_ids=torch.tensor([7, 7, 7]), seed=3)
    assert nt.tolist() == [-1] * 3 and ni.tolist() == [-1] * 3


def test_seed_and_generator_reproducible():
    s1, s2 = torch.randn(8, 8), torch.randn(8, 8)
    a = sample_hard_negatives(s1, s2, generator=torch.Generator().manual_seed(5))
    b = sample_hard_negatives(s1, s2, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    draws = {tuple(sample_hard_negatives(s1, s2, seed=k)[0].tolist()) for k in range(8)}
    assert len(draws) > 1


def test_gathered_rows_match_single_process():
    """Rows of a rank (row_offset = rank * B) draw what the same rows draw in the full [BW, BW] matrix."""
    bw, b = 12, 4
    s1, s2 = torch.randn(bw, bw), torch.randn(bw, bw)
    full = sample_hard_negatives(s1, s2, seed=11)
    for rank in range(3):
        part = sample_hard_negatives_from_gathered(s1[rank * b:(rank + 1) * b], s2[rank * b:(rank + 1) * b], rank=rank,
                                                   seed=11)
        for x, y in zip(part, full):
            assert torch.equal(x, y[rank * b:(rank + 1) * b])


# ----------------------------------------------------------------------------------------------
# the C++ kernel's CPU build (same per-element code as the CUDA kernel)


def check_matches_reference(op, device, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """op(s_i2t, s_t2i, drawable, seed, row_offset) returns the reference's indices exactly, on awkward sizes,
    extreme logits and rank offsets, for every logit dtype."""
    for dtype in dtypes:
        for s1, s2, d, seed, off in _cases(device, dtype):
            ref = sample_hard_negatives_ref(s1, s2, d, seed, off)
            got = op(s1, s2, d, seed, off)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (dtype, tuple(s1.shape), off)


def test_cpp_cpu_matches_reference_bit_for_bit():
    op = _cpp_op()
    if op is None:
        pytest.skip("blipfast._C is not built here (pip install -e . builds it)")
    check_matches_reference(op, "cpu")


def test_cpp_cpu_chi_square():
    op = _cpp_op()
    if op is None:
        pytest.skip("blipfast._C is not built here (pip install -e . builds it)")
    _chi_square_check(lambda s1, s2, d, seed: op(s1, s2, d, seed, 0), "cpu")


def test_cpp_validation():
    op = _cpp_op()
    if op is None:
        pytest.skip("blipfast._C is not built here (pip install -e . builds it)")
    s = torch.randn(2, 4)
    d = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="drawable"):
        op(s, s, d.float(), torch.tensor([1]), 0)
    with pytest.raises(RuntimeError, match="row_offset"):
        op(s, s, d, torch.tensor([1]), -1)
    with pytest.raises(RuntimeError, match="seed"):
        op(s, s, d, torch.tensor([1, 2]), 0)


# ----------------------------------------------------------------------------------------------
# CUDA


def _cuda_op():
    op = _cpp_op()
    assert op is not None, "blipfast._C is not built: run `pip install -e . --no-build-isolation` first"
    return op


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference_index_for_index(dtype):
    op = _cuda_op()
    cases = _cases("cuda", dtype)
    b, bw = 128, 8192  # the benchmark shape, with a rank offset
    cases.append(((torch.randn(b, bw, device="cuda") * 5).to(dtype), (torch.randn(b, bw, device="cuda") * 5).to(dtype),
                  drawable_mask(b, bw, 3 * b, device="cuda"), torch.randint(0, 2**62, (1,), device="cuda"), 3 * b))
    for s1, s2, d, seed, off in cases:
        ref = sample_hard_negatives_ref(s1, s2, d, seed, off)
        got = op(s1, s2, d, seed, off)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (dtype, tuple(s1.shape), off)
        cpu = sample_hard_negatives_ref(s1.cpu(), s2.cpu(), d.cpu(), seed.cpu(), off)
        assert torch.equal(got[0].cpu(), cpu[0]) and torch.equal(got[1].cpu(), cpu[1])


@pytest.mark.gpu
def test_cuda_chi_square():
    op = _cuda_op()
    _chi_square_check(lambda s1, s2, d, seed: op(s1, s2, d, seed, 0), "cuda")


@pytest.mark.gpu
def test_cuda_public_op_no_host_sync_and_graph_capture():
    """The public op dispatches to the kernel, syncs nothing, and replays in a CUDA graph with a new seed."""
    _cuda_op()
    s1, s2 = torch.randn(64, 256, device="cuda"), torch.randn(64, 256, device="cuda")
    seed = torch.tensor([42], device="cuda")
    d = drawable_mask(64, 256, 0, device="cuda")
    ref = sample_hard_negatives_ref(s1, s2, d, seed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample_hard_negatives(s1, s2, seed=seed, backend="cuda")
        got_gen = sample_hard_negatives(s1, s2, backend="cuda")  # a fresh seed drawn on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got_gen[0].shape == (64,)
    static_seed = seed.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        sample_hard_negatives(s1, s2, seed=static_seed, backend="cuda")  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = sample_hard_negatives(s1, s2, seed=static_seed, backend="cuda")
    torch.cuda.synchronize()
    static_seed.fill_(777)
    graph.replay()
    torch.cuda.synchronize()
    ref = sample_hard_negatives_ref(s1, s2, d, torch.tensor([777], device="cuda"))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
