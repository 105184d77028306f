"""pytest-benchmark suite of BLIP (v1) pre-training and CapFilt (issue 11), the cases of ``blipfast bench --only
blip_pretrain`` (blipfast/bench/blip_pretrain.py): one training step (forward, backward, AdamW) at B = 64, 224 px,
ViT-B/16 + BERT-base MED, queue 57600, bf16 autocast, blipfast.BlipPretrain (eager and torch.compile) against
Salesforce BLIP's step restated in PyTorch (eager and compiled); CapFilt images/s (BLIP-base captioner and filter at
384 px, 2 web captions per image) against the HF models. Without a CUDA device the suite is one skip; the counted
costs (FLOPs, saved bytes, operators, host syncs) print on any device with ``blipfast bench --only blip_pretrain``
(and tests/bench/test_blip_pretrain.py checks them in CI).

    pytest benchmarks/test_blip_pretrain.py --benchmark
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.blip_pretrain import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_blip_pretrain(benchmark, case):
    run_case(benchmark, case, "BLIP pre-training", rounds=10)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.stats.median:
        benchmark.extra_info["images_per_s"] = case.params["batch"] / stats.stats.median
