"""Shared plumbing of the self-test's tests (tests/selftest/): a private verdict cache with the first-use check on,
the CPU dispatching as a CUDA device (the seam that makes the first-use check testable without a GPU: the Triton
backends run under TRITON_INTERPRET=1), and the cases of an op picked by their label."""
from __future__ import annotations

import contextlib

import torch

from blipfast import selftest
from blipfast.ops import _common as C
from blipfast.selftest import runner


def isolated(monkeypatch, tmp_path, mode: str = "1") -> None:
    """The first-use check on (``mode``: BLIPFAST_SELFTEST), verdicts cached under ``tmp_path``, nothing decided
    yet in this process; the process's verdicts are forgotten again when the test ends."""
    monkeypatch.setenv("BLIPFAST_SELFTEST", mode)
    monkeypatch.setenv("BLIPFAST_CACHE_DIR", str(tmp_path))
    selftest.reset()
    monkeypatch.setattr(selftest.firstuse, "_SEEN", {})
    monkeypatch.setattr(C, "DISABLED", set())


@contextlib.contextmanager
def cpu_as_cuda():
    """CPU tensors dispatch as CUDA tensors (dispatch_rules; the fused backends that can run on a CPU, i.e. Triton
    under the interpreter, are picked and checked on first use)."""
    def is_cuda(device, *, default):
        return device.type == "cpu" or default(device)

    def runnable(backend, device, dtype=None, *, default):
        return default(backend, device, dtype)

    with C.dispatch_rules(is_cuda, runnable):
        yield


def cases(op: str, backend: str, dtype: torch.dtype, label: str = "", level: str = "quick") -> list:
    """The cases of (op, backend, dtype) at ``level`` whose label contains ``label``."""
    out = [c for c in runner.cases(op, backend, dtype, level) if label in c.shape]
    assert out, f"no {level} case of {op}/{backend} with {label!r} in its label"
    return out
