"""pytest-benchmark suite of BLIP VQA rank inference, the cases of ``blipfast bench --only blip_vqa``
(blipfast/bench/blip_vqa.py): Q = 32 questions at 480 px (ViT-B/16 + BERT-base MED), k = 128 candidates of 3,128
answers, bf16 autocast, blipfast.BlipVQA against Salesforce BLIP's ``rank_answer`` inference restated in PyTorch.
Without a CUDA device the suite is one skip; the counted costs (FLOPs, operators, host syncs) print on any device
with ``blipfast bench --only blip_vqa`` (and tests/bench/test_blip_vqa.py checks them in CI).

    pytest benchmarks/test_blip_vqa.py --benchmark
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.blip_vqa import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_blip_vqa_rank(benchmark, case):
    run_case(benchmark, case, "BLIP VQA rank inference", rounds=10)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.stats.median:
        benchmark.extra_info["questions_per_s"] = case.params["questions"] / stats.stats.median
