"""The pytest-benchmark harness shared by the suites: each suite parametrises over the cases of its
``blipfast.bench.<suite>.cases`` (the ones ``blipfast bench`` times), so both report the same groups.

Each case is a benchmark in its group (blipfast beside its baselines); extra_info carries the case's
parameters, its FLOP and byte formulas, the derived TFLOP/s and TB/s of the median and the peak memory of
one call. A baseline that cannot run here (an import or compile failure) is skipped as n/a; without CUDA
every case skips with the reason.
"""
from __future__ import annotations

import pytest
import torch

from blipfast.bench.common import peak_memory_mb


def cuda_params(make_cases, **kwargs):
    """``pytest.mark.parametrize`` arguments over ``make_cases(cuda, bf16)``, or one placeholder without CUDA."""
    cases = make_cases(torch.device("cuda"), torch.bfloat16, **kwargs) if torch.cuda.is_available() else []
    ids = [f"{c.group} | {c.name}" for c in cases]
    return dict(argnames="case", argvalues=cases or [None], ids=ids or ["no-cuda"])


def run_case(benchmark, case, what: str, rounds: int = 30) -> None:
    if case is None:
        pytest.skip(f"{what} benchmarks need a CUDA device (none here)")

    def timed():
        case.fn()
        torch.cuda.synchronize()

    try:  # first calls: Triton JIT and autotuning, torch.compile
        for _ in range(3):
            timed()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    benchmark.group = case.group
    benchmark.extra_info.update(case.params)
    benchmark.extra_info.update(impl=case.name, baseline=case.baseline, flops=case.flops, bytes=case.bytes)
    benchmark.extra_info["peak_mem_mb"] = peak_memory_mb(case.fn, torch.device("cuda"))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=3, iterations=1)
    med = benchmark.stats.stats.median
    if med:
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / med / 1e12
        if case.bytes:
            benchmark.extra_info["tbps"] = case.bytes / med / 1e12
