"""Shared test plumbing: the tolerance rule of DESIGN.md, GPU skipping, per-run random seeds.

Inputs are fresh random each run: the seed comes from BLIPFAST_TEST_SEED or is drawn at start-up and
printed in pytest's header, so a failure can be replayed with BLIPFAST_TEST_SEED=<seed>.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
# set before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SEED = int(os.environ.get("BLIPFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))

# the absolute floor of the tolerance rule, per dtype, relative to the reference's magnitude
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    return f"blipfast test seed: {_SEED} (replay with BLIPFAST_TEST_SEED={_SEED})"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch/random per test from the run seed and the test's name (fresh each run, replayable)."""
    s = (_SEED * 1000003 + sum(map(ord, request.node.nodeid))) % 2**31
    torch.manual_seed(s)
    random.seed(s)
    yield


def floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    return FLOOR[dtype] * (1.0 + float(ref.abs().max()) if ref.numel() else 1.0)


def assert_within_torch_error(fast: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype=None,
                              name: str = "output", factor: float = 2.0) -> None:
    """DESIGN.md's rule: max|fast - ref64| <= factor * max|torch_lowp - ref64| + floor(dtype).

    ``ref64`` is the float64 ground truth, ``torch_lowp`` PyTorch's own computation in the dtype under
    test (its error is the yardstick), ``dtype`` defaults to fast's dtype.
    """
    dtype = dtype or fast.dtype
    ref64 = ref64.double()
    err_fast = (fast.double() - ref64).abs().max().item() if fast.numel() else 0.0
    err_torch = (torch_lowp.double() - ref64).abs().max().item() if fast.numel() else 0.0
    bound = factor * err_torch + floor(dtype, ref64)
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    assert err_fast <= bound, (f"{name}: max error {err_fast:.3e} exceeds {factor} x torch's {err_torch:.3e} + floor "
                               f"{floor(dtype, ref64):.1e} ({dtype}, seed {_SEED})")


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype=None, name: str = "output", scale: float = 1.0) -> None:
    """Plain closeness at the floor of ``dtype`` (for same-precision comparisons, e.g. fp64 vs fp64)."""
    dtype = dtype or a.dtype
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    bound = scale * floor(dtype, b.double())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.1e} ({dtype}, seed {_SEED})"


def count_calls(monkeypatch, module, *names: str) -> dict:
    """Wrap ``module.<name>`` for each name so that every call adds one to the returned dict's "n" (e.g. to
    show that a backend's kernels ran)."""
    calls = {"n": 0}
    for name in names:
        orig = getattr(module, name)

        def counting(*a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(module, name, counting)
    return calls


def assert_triton_matches_torch(monkeypatch, calls: dict, run) -> None:
    """``run()`` -> (output, {name: grad}) under BLIPFAST_BACKEND=torch, then =triton: the Triton kernels ran
    (``calls`` from :func:`count_calls` on them) and the outputs and every gradient agree (fp32 floor x 10)."""
    monkeypatch.setenv("BLIPFAST_BACKEND", "torch")
    out_ref, g_ref = run()
    n_ref = calls["n"]
    monkeypatch.setenv("BLIPFAST_BACKEND", "triton")
    out_tri, g_tri = run()
    assert n_ref == 0 and calls["n"] > 0, "the triton backend was not used"
    assert_close(out_tri, out_ref, torch.float32, "output", scale=10)
    assert g_tri.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(g_tri[name], g_ref[name], torch.float32, name, scale=10)


def replay_captured_step(train_step, replays: int, on_captured=None):
    """Warm ``train_step`` up on a side stream (Triton JIT and autotuning happen there), capture it in a
    torch.cuda.CUDAGraph with ``torch.cuda.set_sync_debug_mode("error")`` (a host sync fails the capture),
    call ``on_captured()``, replay it ``replays`` times; returns the stacked outputs of the replays (CUDA only)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            train_step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if on_captured is not None:
        on_captured()
    outs = []
    for _ in range(replays):
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    return torch.stack(outs)
