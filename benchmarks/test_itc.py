"""pytest-benchmark suite of the fused ITC loss + hard-negative sampling (issue 4); the cases are those of
``blipfast bench`` (blipfast/bench/itc.py), so both report the same groups.

    pytest benchmarks/test_itc.py --benchmark-only --benchmark-group-by=group \
        --benchmark-json=benchmarks/results/itc-pytest.json

Each candidate is a benchmark in its case's group (blipfast, the eager LAVIS formulation with its
per-row multinomial loop, and torch.compile of the reference with a batched multinomial); extra_info
carries the FLOP and byte formulas, the derived TFLOP/s and TB/s of the median and the peak memory of
one call above what was allocated before it. Without CUDA every case skips with the reason.
"""
from __future__ import annotations

import pytest
import torch

from blipfast.bench.common import peak_memory_mb
from blipfast.bench.itc import cases

_CASES = cases(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else []


def _ids():
    return [f"{c.group} | {c.name}" for c in _CASES]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ITC benchmarks need a CUDA device (none here)")
@pytest.mark.parametrize("case", _CASES or [None], ids=_ids() or ["no-cuda"])
def test_itc(benchmark, case):
    if case is None:
        pytest.skip("ITC benchmarks need a CUDA device (none here)")

    def timed():
        case.fn()
        torch.cuda.synchronize()

    try:  # first calls: Triton JIT, torch.compile; a baseline that cannot run reports n/a
        for _ in range(3):
            timed()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    benchmark.group = case.group
    benchmark.extra_info.update(case.params)
    benchmark.extra_info.update(impl=case.name, baseline=case.baseline, flops=case.flops, bytes=case.bytes)
    benchmark.extra_info["peak_mem_mb"] = peak_memory_mb(case.fn, torch.device("cuda"))
    benchmark.pedantic(timed, rounds=30, warmup_rounds=3, iterations=1)
    med = benchmark.stats.stats.median
    if med:
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / med / 1e12
        if case.bytes:
            benchmark.extra_info["tbps"] = case.bytes / med / 1e12
