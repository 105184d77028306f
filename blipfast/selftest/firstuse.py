"""The first-use check (docs/selftest.md#first-use): before the dispatch sends an op to a fast backend on a device
for the first time, that op's quick cases run there once, in the dtype of the call, and a backend that fails is
disabled for the op and dtype: one warning naming the op, the dtype and the error, and the dispatch falls back to
the next backend (finally the reference). The verdict is cached on disk (``cache``), so later processes on the same
machine and software stack pay nothing.

``blipfast.ops._common.resolve_backend`` calls :func:`first_use` (installed by :func:`install`) for each fast
backend it is about to pick. It declines (trusts the backend without a check) where no check may or can run: while
torch.compile traces (the dispatch does not even call it there), during a CUDA-graph capture, under a
TorchDispatchMode (fake or meta tensors, the benchmarks' counters), on a device that does not dispatch as CUDA
(the CPU, meta tensors), and inside a check. Such a call does not record a verdict, so the next eager call checks;
:func:`verify` runs the checks up front (e.g. after building a model, before compiling its step).

``BLIPFAST_SELFTEST``: unset or ``1`` checks; ``0`` skips the check (and ignores cached verdicts); ``strict`` turns a
failed check into a :class:`SelfTestError` at every dispatch to that backend.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..ops import _common as C
from .case import DTYPES

ENV = "BLIPFAST_SELFTEST"


class SelfTestError(RuntimeError):
    """A fast backend failed its self-test and BLIPFAST_SELFTEST=strict."""


class SelfTestWarning(UserWarning):
    """A fast backend failed its self-test: the op falls back to the next backend."""


_SEEN: dict = {}  # (op, backend, dtype, device type, index) -> (ok, message) decided in this process
_BUSY = [False]  # a check is running (the ops it calls must not start another)


def mode() -> str:
    """"on", "off" or "strict" from BLIPFAST_SELFTEST (ValueError naming it for another value)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("", "1", "on"):
        return "on"
    if value in ("0", "off"):
        return "off"
    if value == "strict":
        return "strict"
    raise ValueError(f"{ENV} must be 1, 0 or strict, got {os.environ[ENV]!r}")


def _device_id(device: torch.device) -> tuple:
    if device.type == "cuda" and device.index is None:
        return ("cuda", torch.cuda.current_device())
    return (device.type, device.index)


def _can_check(device: torch.device) -> bool:
    if _BUSY[0] or device.type == "meta" or not C._is_cuda(device) or is_in_torch_dispatch_mode():
        return False
    # no capture can be under way before CUDA is initialised (and asking would initialise it)
    return not (device.type == "cuda" and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def first_use(op: str, backend: str, device: torch.device, dtype) -> bool:
    """The hook of the dispatch: may ``op`` run on ``backend`` on ``device`` in ``dtype``? (See the module doc.)"""
    how = mode()
    if how == "off" or dtype is None:
        return True
    seen = _SEEN.get((op, backend, dtype) + _device_id(device))
    if seen is None:
        if not _can_check(device):
            return True
        seen = _decide(op, backend, device, dtype)
    ok, message = seen
    if not ok and how == "strict":
        raise SelfTestError(message)
    return ok


def _decide(op: str, backend: str, device: torch.device, dtype) -> tuple:
    from . import cache

    key = cache.device_key(device)
    verdict = cache.load(key, op, backend, dtype)
    where = ""
    if verdict is None:
        verdict = check(op, backend, device, dtype, key)
    else:
        where = f" (cached verdict of {verdict.get('time', '?')}, under {cache.selftest_dir() / cache.key_id(key)})"
    message = None
    if not verdict["ok"]:
        message = (f"blipfast: the {backend} backend of {op} failed its self-test in {cache.dtype_name(dtype)} on "
                   f"{key['gpu']}{where}: {verdict['error']}. {op} falls back to the next backend for "
                   f"{cache.dtype_name(dtype)} inputs in this process. `blipfast selftest --full` prints the whole "
                   f"report; {ENV}=strict makes this an error, {ENV}=0 skips the check.")
        if mode() != "strict":  # strict: no fallback, first_use raises at every dispatch instead
            C.DISABLED.add((op, backend, dtype))
            warnings.warn(message, SelfTestWarning, stacklevel=6)
    seen = (verdict["ok"], message)
    _SEEN[(op, backend, dtype) + _device_id(device)] = seen
    return seen


def check(op: str, backend: str, device: torch.device, dtype, key: dict | None = None) -> dict:
    """Run the quick cases of ``op`` on ``backend`` in ``dtype`` on ``device`` now (stopping at the first failure)
    and cache the verdict; returns it ({"ok", "error", ...}). A run that ran out of device memory decides
    nothing: its verdict passes and is not cached."""
    from . import cache, runner

    cases = runner.cases(op, backend, dtype, "quick")
    _BUSY[0] = True
    try:
        results = runner.run_cases(cases, device, autotune=False, stop_on_failure=True)
    finally:
        _BUSY[0] = False
    ok, error, n = runner.verdicts(results).get((op, backend, dtype), (True, None, 0))
    if not ok and "OutOfMemoryError" in (error or ""):
        return {"ok": True, "error": None, "level": "quick", "cases": n}
    return cache.store(key or cache.device_key(device), op, backend, dtype, ok, error, "quick", n)


def verify(device, dtypes=DTYPES, ops=None) -> dict:
    """Run the first-use check now for every fast backend that automatic dispatch could pick on ``device`` (a
    ``torch.device`` or its name) in ``dtypes`` (of ``ops``, default all): {(op, backend, dtype): trusted}. Call it
    after building a model and before ``torch.compile`` or a CUDA-graph capture of its step, where no check can
    run. Honours BLIPFAST_SELFTEST (strict raises); on a device that does not dispatch as CUDA there is nothing to
    check (every entry True)."""
    from . import runner

    device = torch.device(device)
    out = {}
    for op, backend in runner.registered():
        if ops is not None and op not in ops:
            continue
        for dtype in dtypes:
            if C._runnable(backend, device, dtype):
                out[(op, backend, dtype)] = C._trusted(op, backend, device, dtype)
    return out


def install() -> None:
    """Make the dispatch call :func:`first_use` (``import blipfast`` does)."""
    C.FIRST_USE = first_use


def reset() -> None:
    """Forget this process's verdicts and re-enable every backend (the cache on disk stays)."""
    _SEEN.clear()
    C.DISABLED.clear()
