"""pytest-benchmark suite of the ``blipfast train`` data path (issue 9): one stage-1 training step end to end from
cached ViT tokens against from images through the (EVA ViT-g shaped) ViT, on the cases of ``blipfast bench``
(blipfast/bench/train_data.py).

    pytest benchmarks/test_train_data.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.train_data import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_train_data(benchmark, case):
    run_case(benchmark, case, "train data path", rounds=20)
