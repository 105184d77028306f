"""pytest-benchmark suite of BLIP-2 retrieval (issue 10), the cases of ``blipfast bench --only retrieval``
(blipfast/bench/retrieval.py): the Q-Former image pass at B = 256 (HF Blip2QFormerModel with SDPA, eager and under
torch.compile, against blipfast.QFormer), ITM re-rank pairs/s (the HF loop of LAVIS' compute_sim_matrix against
Blip2Retrieval.itm_scores), a synthetic 5k-image / 25k-caption gallery to the recall table (CUDA), and the counted
FLOPs / operators / host syncs of re-ranking 128 candidates of 64 images (every device).

    pytest benchmarks/test_retrieval.py --benchmark
"""

from __future__ import annotations

import pytest
import torch
from _harness import cuda_params, run_case

from blipfast.bench import retrieval
from blipfast.bench.retrieval import cases


@pytest.mark.parametrize(**cuda_params(cases))
def test_retrieval(benchmark, case):
    run_case(benchmark, case, "retrieval", rounds=10)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if "pairs" in case.params and stats is not None and stats.stats.median:
        benchmark.extra_info["pairs_per_s"] = case.params["pairs"] / stats.stats.median


def test_retrieval_counted(benchmark):
    """Counted on meta tensors with the GPU's dispatch: runs on every device (the time is the counting's own)."""
    table, payload = benchmark.pedantic(retrieval.counted_report, rounds=1, iterations=1)
    print("\n" + table)
    benchmark.group = "retrieval counted (64 images x 128 candidates)"
    benchmark.extra_info.update(payload)
    assert payload["met"]["flops"], payload["ratio"]


def test_retrieval_gallery_5k(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("the 5k-image gallery needs a CUDA device (none here)")
    out = benchmark.pedantic(retrieval.gallery, args=(torch.device("cuda"),), rounds=1, iterations=1)
    benchmark.group = "retrieval gallery 5k images / 25k captions, k = 128"
    benchmark.extra_info.update(out)
    print(f"\n5k/25k gallery: {out['seconds_total']:.1f} s to the recall table ({out})")
