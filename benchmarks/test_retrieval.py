"""pytest-benchmark suite of BLIP-2 retrieval (issue 10), the cases of ``blipfast bench --only retrieval``
(blipfast/bench/retrieval.py): the Q-Former image pass at B = 256 (HF Blip2QFormerModel with SDPA, eager and under
torch.compile, against blipfast.QFormer), ITM re-rank pairs/s (the HF loop of LAVIS' compute_sim_matrix against
Blip2Retrieval.itm_scores), the counted FLOPs / operators / host syncs of re-ranking 128 candidates of 64 images, and
a synthetic 5k-image / 25k-caption gallery to the recall table. Without a CUDA device the suite is one skip; the
counted costs print on any device with ``blipfast bench --only retrieval`` (and tests/bench/test_retrieval.py checks
them in CI).

    pytest benchmarks/test_retrieval.py --benchmark
"""

from __future__ import annotations

import pytest
import torch
from _harness import cuda_params, run_case

from blipfast.bench import retrieval


def _params():
    p = cuda_params(retrieval.cases)
    if torch.cuda.is_available():
        p["argvalues"] = p["argvalues"] + ["counted", "gallery"]
        p["ids"] = p["ids"] + ["retrieval counted (64 images x 128 candidates)", "retrieval gallery 5k / 25k"]
    return p


@pytest.mark.parametrize(**_params())
def test_retrieval(benchmark, case):
    if case == "counted":  # counted on meta tensors: the time is the counting's own
        table, payload = benchmark.pedantic(retrieval.counted_report, rounds=1, iterations=1)
        benchmark.group = "retrieval counted (64 images x 128 candidates)"
        benchmark.extra_info.update(payload)
        print("\n" + table)
        assert payload["met"]["flops"], payload["ratio"]
        return
    if case == "gallery":
        out = benchmark.pedantic(retrieval.gallery, args=(torch.device("cuda"),), rounds=1, iterations=1)
        benchmark.group = "retrieval gallery 5k images / 25k captions, k = 128"
        benchmark.extra_info.update(out)
        print(f"\n5k/25k gallery: {out['seconds_total']:.1f} s to the recall table ({out})")
        return
    run_case(benchmark, case, "retrieval", rounds=10)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if "pairs" in case.params and stats is not None and stats.stats.median:
        benchmark.extra_info["pairs_per_s"] = case.params["pairs"] / stats.stats.median
