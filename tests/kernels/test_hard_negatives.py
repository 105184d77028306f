"""ITM hard-negative sampling: the torch reference, the C++ CPU kernel and the CUDA kernel.

The draw is a function of (logits, drawable mask, seed, global row): the CUDA kernel and the CPU build of
the same C++ code (csrc/hard_negatives.cu) must return the reference's indices exactly. Statistics:
chi-square of many draws against the masked softmax (fixed seed, so the test is deterministic).
The C++ CPU kernel is part of blipfast._C (built by `pip install -e .`); on a machine without the
extension those tests skip (or fail where a CUDA device is visible: tests/helpers/runtime.py require_extension), unless
BLIPFAST_TEST_OPS_LIB names a library that registers blipfast_C ops.
"""
from __future__ import annotations

import pytest
import torch

from blipfast.ops import sample_hard_negatives, sample_hard_negatives_from_gathered, sample_hard_negatives_ref
from blipfast.ops.hard_negatives import drawable_mask
from tests.helpers.hard_negatives import (_cases, _chi_square_check, _cpp_op, _cpp_op_or_skip, _cuda_op, check_draw_rules,
                                         check_matches_reference)


# ----------------------------------------------------------------------------------------------
# reference (CPU)


def test_reference_chi_square_cpu():
    _chi_square_check(lambda *a: sample_hard_negatives_ref(*a), "cpu")


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


def test_cpp_cpu_matches_reference_bit_for_bit():
    op = _cpp_op_or_skip()
    check_matches_reference(op, "cpu")


def test_cpp_cpu_chi_square():
    op = _cpp_op_or_skip()
    _chi_square_check(lambda s1, s2, d, seed: op(s1, s2, d, seed, 0), "cpu")


def test_cpp_validation():
    op = _cpp_op_or_skip()
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
