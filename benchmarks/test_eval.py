"""pytest-benchmark suite of ``blipfast eval caption``'s generation, the generation cases of ``blipfast bench --only
eval`` (blipfast/bench/eval.py): a BLIP-2 OPT-2.7b-shaped model at 224 px (blipfast's Generator model against
transformers' ``Blip2ForConditionalGeneration.generate``, LAVIS' ``coco`` settings) and a BLIP-base-shaped
captioner at 384 px (blipfast's decoder swapped in against transformers' model), random bf16 weights. Without a
CUDA device the suite is one skip; the caption scorer's own time is timed on any device by ``blipfast bench
--only eval``.

    pytest benchmarks/test_eval.py --benchmark
"""

from __future__ import annotations

import pytest
from _harness import cuda_params, run_case

from blipfast.bench.eval import generation_cases


@pytest.mark.parametrize(**cuda_params(generation_cases))
def test_eval_caption_generation(benchmark, case):
    run_case(benchmark, case, "eval caption generation", rounds=5)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.stats.median:
        benchmark.extra_info["images_per_s"] = case.params["images"] / stats.stats.median
