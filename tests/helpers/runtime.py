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
