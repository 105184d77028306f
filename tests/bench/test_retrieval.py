"""Counted cost of ITM re-ranking (blipfast/bench/retrieval.py): FLOPs, operators and host syncs of the GPU path,
counted on meta tensors with CUDA's dispatch, against the HF loop of LAVIS' compute_sim_matrix. Properties of the
code, the same on every machine: regression tests here (2 images x 128 candidates; ``blipfast bench`` counts 64)."""
from __future__ import annotations

import torch

from blipfast.bench import retrieval


def test_rerank_meets_the_flop_target_without_host_syncs():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = dict(retrieval.counted(n_images=2, k=128))
    finally:
        torch.set_num_threads(n)
    base, ours = rows[retrieval.BASELINE], rows[retrieval.OURS]
    ratio = ours.ratio(base)
    assert ratio["flops"] <= retrieval.TARGETS["flops"], ratio  # image K/V once per image, query rows only at the end
    assert ratio["ops"] <= 0.5, ratio
    assert ours.host_syncs == 0  # CPU pair indices: the batches are planned on the host
    # the HF loop projects every image's K/V once per candidate: 6 cross layers x 2 GEMMs x 257 x 1408 x 768 per pair
    kv = 2 * 6 * 2 * 257 * 1408 * 768
    assert base.flops - ours.flops >= 0.99 * kv * (2 * 128 - 2)
