"""pytest-benchmark suite of the fused Q-Former attention (issue 3); the cases are those of
``blipfast bench`` (blipfast/bench/attention.py), so both report the same groups.

    pytest benchmarks/test_attention.py --benchmark-only --benchmark-group-by=group \
        --benchmark-json=benchmarks/results/attention-pytest.json

Each candidate is a benchmark in its case's group (blipfast and its baselines side by side); extra_info
carries the FLOP and byte formulas and the derived TFLOP/s and TB/s of the median. A baseline that cannot
run here (FlexAttention import or compile failure, dropout in FlexAttention) is skipped as n/a. Without
CUDA every case skips with the reason.
"""
from __future__ import annotations

import pytest
import torch

from blipfast.bench.attention import cases

_CASES = cases(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else []


def _ids():
    return [f"{c.group} | {c.name}" for c in _CASES]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA device (none here)")
@pytest.mark.parametrize("case", _CASES or [None], ids=_ids() or ["no-cuda"])
def test_attention(benchmark, case):
    if case is None:
        pytest.skip("attention benchmarks need a CUDA device (none here)")

    def timed():
        case.fn()
        torch.cuda.synchronize()

    try:  # first call: compiles, autotunes; a baseline that cannot run reports n/a
        for _ in range(3):
            timed()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    benchmark.group = case.group
    benchmark.extra_info.update(case.params)
    benchmark.extra_info.update(impl=case.name, baseline=case.baseline, flops=case.flops, bytes=case.bytes)
    benchmark.pedantic(timed, rounds=30, warmup_rounds=3, iterations=1)
    med = benchmark.stats.stats.median
    if med:
        benchmark.extra_info["tflops"] = case.flops / med / 1e12
        benchmark.extra_info["tbps"] = case.bytes / med / 1e12
