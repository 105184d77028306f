"""``blipfast selftest`` and the first-use check: every fused kernel verifies itself against its reference on the
device it is about to run on, and a kernel that fails is never dispatched to (docs/selftest.md).

Public names:

- :func:`run` (``blipfast selftest``): run the quick or full check cases of every fast backend that can run on a
  device; returns the results (``runner.format_table`` / ``runner.to_json`` print and serialise them);
- :func:`verify`: the first-use check up front, for a device and dtypes (before ``torch.compile`` or a CUDA-graph
  capture, where no check can run);
- :func:`check`: the quick check of one (op, backend, dtype) now, its verdict cached;
- :class:`SelfTestWarning` / :class:`SelfTestError`: a failed check (``BLIPFAST_SELFTEST=strict`` raises);
- :func:`reset`: forget this process's verdicts (tests).

``import blipfast`` installs the first-use hook into the ops' dispatch (``firstuse.install``); the cases, the
runner and the cache are imported when a check first runs.
"""
from __future__ import annotations

import torch

from .case import DTYPES, LEVELS
from .firstuse import SelfTestError, SelfTestWarning, check, install, reset, verify

__all__ = ["SelfTestError", "SelfTestWarning", "check", "reset", "run", "verify"]


def run(device, level: str = "quick", ops=None, dtypes=DTYPES, progress: bool = False, record: bool = True) -> list:
    """Run the ``level`` ("quick" or "full") cases of ``ops`` (default: every op with a fast backend) in ``dtypes``
    on ``device`` for every fast backend that can run there (on a CPU: the Triton backends under
    TRITON_INTERPRET=1, else none); returns the list of ``runner.Result``. With ``record`` the verdict of each
    (op, backend, dtype) is cached for the first-use checks of the processes that come after (a failed one is
    never dispatched to there)."""
    from ..ops import _common as C
    from . import cache, runner

    if level not in LEVELS:
        raise ValueError(f"selftest: level must be 'quick' or 'full', got {level!r}")
    device = torch.device(device)
    cases = runner.select(ops, dtypes, level, lambda backend, dtype: C._runnable(backend, device, dtype))
    results = runner.run_cases(cases, device, autotune=level == "full", progress=progress)
    if record:
        key = cache.device_key(device)
        for (op, backend, dtype), (ok, error, n) in runner.verdicts(results).items():
            cache.store(key, op, backend, dtype, ok, error, level, n)
    return results


install()
