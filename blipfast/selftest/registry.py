"""The check cases of every fast backend, by (op, backend) (docs/selftest.md).

Each op module of this package has ``CASES = {(op, backend): builder}`` with ``builder(backend, dtype, level) ->
list[Case]``. ``level`` is "quick" (the few cases that the first-use check runs before an op is trusted on a device,
and ``blipfast selftest --quick``) or "full" (``--full``: the quick cases plus the autotuning buckets, larger and
more awkward shapes, every candidate tiling). The linear ops (``concat_linear``, ``gelu_mlp``,
``linear_cross_entropy``) have no fast backend today (their one backend is PyTorch inside the custom op), so they
have no cases: a fused backend of theirs adds its builder to a module here like the others.
"""
from __future__ import annotations

from typing import Iterable

import torch

from . import attention, itc, layernorm, negatives

BUILDERS = {**attention.CASES, **itc.CASES, **negatives.CASES, **layernorm.CASES}


def registered() -> list:
    """The (op, backend) pairs that have check cases."""
    return sorted(BUILDERS)


def cases(op: str, backend: str, dtype: torch.dtype, level: str) -> list:
    """The check cases of ``op`` on ``backend`` in ``dtype`` at ``level`` (none when the pair has no cases)."""
    builder = BUILDERS.get((op, backend))
    return [] if builder is None else builder(backend, dtype, level)


def select(ops: Iterable[str] | None, dtypes: Iterable[torch.dtype], level: str, runnable) -> list:
    """Every case of ``ops`` (None: all) in ``dtypes`` at ``level`` whose backend ``runnable(backend, dtype)`` says
    can run here, op by op."""
    wanted = None if ops is None else set(ops)
    unknown = (wanted or set()) - {op for op, _ in BUILDERS}
    if unknown:
        raise ValueError(f"no self-test cases for {sorted(unknown)}; ops with a fast backend: "
                         f"{sorted({op for op, _ in BUILDERS})}")
    out = []
    for op, backend in registered():
        if wanted is not None and op not in wanted:
            continue
        for dtype in dtypes:
            if runnable(backend, dtype):
                out.extend(cases(op, backend, dtype, level))
    return out
