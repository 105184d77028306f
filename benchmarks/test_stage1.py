"""pytest-benchmark suite of one BLIP-2 stage-1 training step (issue 8): blipfast.Blip2Stage1 against LAVIS' step
restated in PyTorch (eager and torch.compile), forward + backward + AdamW at B = 128 under bf16 autocast, and the
bf16 matmul that MFU is measured against (blipfast/bench/stage1.py; the counted costs are printed by
`blipfast bench --only stage1` on any device).

    pytest benchmarks/test_stage1.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.stage1 import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_stage1(benchmark, case):
    run_case(benchmark, case, "stage-1 step", rounds=10)
