"""pytest-benchmark suite of the fused ITC loss + hard-negative sampling (issue 4); the cases are those of
``blipfast bench`` (blipfast/bench/itc.py), so both report the same groups.

    pytest benchmarks/test_itc.py --benchmark \
        --benchmark-json=benchmarks/results/itc-pytest.json

Each candidate is a benchmark in its case's group (blipfast, the eager LAVIS formulation with its
per-row multinomial loop, and torch.compile of the reference with a batched multinomial); extra_info
carries the FLOP and byte formulas, the derived TFLOP/s and TB/s of the median and the peak memory of
one call above what was allocated before it. torch.compile(reference) is optional (n/a when Inductor
cannot run here); any other error fails. Without CUDA the suite is one skip with the reason.
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.itc import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_itc(benchmark, case):
    run_case(benchmark, case, "ITC")
