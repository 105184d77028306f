"""pytest-benchmark suite of the fused Q-Former attention (issue 3); the cases are those of
``blipfast bench`` (blipfast/bench/attention.py), so both report the same groups.

    pytest benchmarks/test_attention.py --benchmark \
        --benchmark-json=benchmarks/results/attention-pytest.json

Each candidate is a benchmark in its case's group (blipfast and its baselines side by side); extra_info
carries the FLOP and byte formulas and the derived TFLOP/s and TB/s of the median. FlexAttention, the
optional baseline, is skipped as n/a when it cannot run here (import or compile failure, dropout); any
other error fails. Without CUDA the suite is one skip with the reason.
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.attention import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_attention(benchmark, case):
    run_case(benchmark, case, "attention")
