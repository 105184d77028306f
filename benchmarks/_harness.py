"""The pytest-benchmark harness shared by the suites: each suite parametrises over the cases of its
``blipfast.bench.<suite>.cases`` (the ones ``blipfast bench`` times), so both report the same groups.

Each case is a benchmark in its group (blipfast beside its baselines); extra_info carries the case's
parameters, its FLOP and byte formulas, the derived TFLOP/s and TB/s of the median and the peak memory of
one call. A case that raises fails the test, except a baseline marked ``optional`` (an optional library
or a feature this torch/device lacks), which is skipped as n/a with its reason. Without CUDA each suite
is one skip that names the device it needs. ``pytest benchmarks/ --benchmark`` (conftest.py) runs them.
"""
from __future__ import annotations

import pytest
import torch

from blipfast.bench.common import describe_error, peak_memory_mb


def cuda_params(make_cases, **kwargs):
    """``pytest.mark.parametrize`` arguments over ``make_cases(cuda, bf16)``, or one placeholder without CUDA."""
    cases = make_cases(torch.device("cuda"), torch.bfloat16, **kwargs) if torch.cuda.is_available() else []
    ids = [f"{c.group} | {c.name}" for c in cases]
    return dict(argnames="case", argvalues=cases or [None], ids=ids or ["no-cuda"])


def run_case(benchmark, case, what: str, rounds: int = 30) -> None:
    if case is None:
        pytest.skip(f"the {what} benchmarks need a CUDA device (torch.cuda.is_available() is False here)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def timed():
        case.fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:  # first calls: Triton JIT and autotuning, torch.compile
        for _ in range(3):
            timed()
    except Exception as exc:  # noqa: BLE001
        if case.optional is None:  # blipfast (or a required baseline) raised: a failure, not a skip
            raise
        pytest.skip(f"n/a: {case.optional} ({describe_error(exc)})")
    benchmark.group = case.group
    benchmark.extra_info.update(case.params)
    benchmark.extra_info.update(impl=case.name, baseline=case.baseline, flops=case.flops, bytes=case.bytes)
    benchmark.extra_info["peak_mem_mb"] = peak_memory_mb(case.fn, device)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    med = stats.stats.median if stats is not None else None
    if med:
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / med / 1e12
        if case.bytes:
            benchmark.extra_info["tbps"] = case.bytes / med / 1e12
