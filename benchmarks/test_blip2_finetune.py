"""pytest-benchmark suite of one BLIP-2 caption fine-tuning step with the ViT-g trained (BLIP-2 downstream issue):
blipfast's Blip2Stage2 with its fused ViT against LAVIS' step restated in PyTorch (eager, and its checkpointed step
under torch.compile), forward + backward + AdamW at B = 16, 364 px, OPT-2.7b-shaped frozen LLM, bf16 autocast
(blipfast/bench/blip2_finetune.py; the counted costs and the counted memory per GPU are printed by
`blipfast bench --only blip2_finetune` on any device).

    pytest benchmarks/test_blip2_finetune.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.blip2_finetune import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_blip2_finetune(benchmark, case):
    run_case(benchmark, case, "BLIP-2 fine-tuning step", rounds=10)
