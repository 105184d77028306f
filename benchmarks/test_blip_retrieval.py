"""pytest-benchmark suite of BLIP (v1) retrieval fine-tuning (issue 22), the cases of ``blipfast bench --only
blip_retrieval`` (blipfast/bench/blip_retrieval.py): one training step (forward, backward, AdamW) at B = 32, 384 px,
ViT-B/16 + BERT-base MED, queue 57600, bf16 autocast, blipfast.BlipRetrieval (eager and torch.compile) against
Salesforce BLIP's step restated in PyTorch (eager and compiled), as images/s. Without a CUDA device the suite is one
skip; the counted costs (FLOPs, saved bytes, operators, host syncs) print on any device with ``blipfast bench --only
blip_retrieval`` (and tests/bench/test_blip_retrieval.py checks them in CI).

    pytest benchmarks/test_blip_retrieval.py --benchmark
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.blip_retrieval import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_blip_retrieval(benchmark, case):
    run_case(benchmark, case, "BLIP retrieval fine-tuning", rounds=10)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.stats.median:
        benchmark.extra_info["images_per_s"] = case.params["batch"] / stats.stats.median
