"""pytest-benchmark suite of the whole Q-Former, forward and forward+backward (issue 2): blipfast.QFormer
against Hugging Face's Blip2QFormerModel with the same weights, on the cases of ``blipfast bench``
(blipfast/bench/qformer.py): the ITC image pass and the ITM pass, bf16 autocast.

    pytest benchmarks/test_qformer.py --benchmark \
        --benchmark-json=benchmarks/results/qformer-pytest.json
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.qformer import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_qformer(benchmark, case):
    run_case(benchmark, case, "Q-Former")
