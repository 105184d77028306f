"""Shared test plumbing beyond the tolerance rule: the device, the repository root, call counting, CUDA-graph
replay, a free port for torch.distributed, autocast."""
from __future__ import annotations

import pathlib
import socket

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# the device of the kernel tests: CUDA when there is one, else the CPU (Triton kernels under the interpreter)
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# the repository root (the README, benchmarks/, setup.py, the kernels/ sources)
ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autocast(fn, device: str, dtype):
    """``fn`` run under ``device``'s autocast in ``dtype`` (the backward outside it, as a training loop does)."""
    def run(*args, **kwargs):
        with torch.autocast(device, dtype=dtype):
            return fn(*args, **kwargs)
    return run


# (device, dtype) of the mixed-precision model tests: bf16 autocast on the CPU (the torch backends: what the ops and
# the model layer do under autocast), bf16 and fp16 (LAVIS trains in fp16) on CUDA (the kernels)
AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
            pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu)]


def require_extension():
    """The loaded ``blipfast._C``; when it is missing or does not load: FAIL where a CUDA device is visible and the
    extension was not switched off (BLIPFAST_BUILD_CUDA=0, BLIPFAST_DISABLE_C=1), so that a GPU run never passes
    with no CUDA kernel tested; else skip with the reason. Tests marked ``extension`` call it before they run."""
    from blipfast import _ext

    err = _ext.load_error()
    if err is None:
        return _ext.extension()
    off = _ext.switched_off()
    if torch.cuda.is_available() and off is None:
        pytest.fail(f"{_ext.NAME} is needed on a machine with a CUDA device and is not available: {err}; "
                    f"{_ext.REBUILD_HINT}, or set BLIPFAST_BUILD_CUDA=0 to test without it", pytrace=False)
    where = f"switched off by {off}" if off else "no CUDA device on this machine"
    pytest.skip(f"{_ext.NAME} is not available ({err}{'' if off and off in err else '; ' + where})")


def extension_setup(item) -> None:
    """conftest.py's pytest_runtest_setup: a test marked ``extension`` goes through require_extension first."""
    if item.get_closest_marker("extension") is not None:
        require_extension()
