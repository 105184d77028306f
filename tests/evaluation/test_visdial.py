"""VisDial metrics (blipfast/evaluation/visdial.py) against values worked out by hand and against the VisDial starter
code's NDCG restated with torch (its sort and DCG), on random scores and relevance."""
from __future__ import annotations

import math
import random

import pytest
import torch

from blipfast.evaluation.visdial import ndcg, scores_to_ranks, visdial_metrics


def test_ranks_recalls_mrr_and_mean_rank_by_hand():
    assert scores_to_ranks([0.1, 0.9, 0.5]) == [3, 1, 2]
    assert scores_to_ranks([0.5, 0.5, 0.7]) == [2, 3, 1]  # ties keep the candidates' order
    m = visdial_metrics({"a": [0.1, 0.9, 0.5], "b": [0.9, 0.1, 0.5]}, {"a": 2, "b": 0})
    assert (m["r@1"], m["r@5"], m["r@10"], m["mean_rank"], m["mrr"], m["rounds"]) == (50.0, 100.0, 100.0, 1.5, 75.0, 2)
    scores = {i: [float(j == i % 12) for j in range(100)] for i in range(20)}  # the gt scores 1 when i % 12 < 100
    gt = {i: (i % 12 if i < 10 else 50) for i in range(20)}
    m = visdial_metrics(scores, gt)
    assert m["r@1"] == 50.0 and m["r@10"] == 50.0  # rounds 10..19: the gt at 50 ties at 0 behind candidate i % 12


def test_ndcg_by_hand_and_as_the_starter_code():
    assert ndcg([0.1, 0.9, 0.5], [0, 1, 0.5]) == pytest.approx(1.0)
    assert ndcg([0.9, 0.1, 0.5], [0, 1, 0.5]) == pytest.approx((0.5 / math.log2(3)) / (1 + 0.5 / math.log2(3)))
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.random() for _ in range(100)]
        rel = [rng.choice([0, 0, 0, 0.2, 0.4, 0.6, 1.0]) for _ in range(100)]
        # the starter code's NDCG.observe for one row (no ties among random scores)
        ranks = torch.tensor(scores_to_ranks(scores))
        relevance = torch.tensor(rel)
        k = int((relevance != 0).sum())
        _, rankings = torch.sort(ranks)
        _, best = torch.sort(relevance, descending=True, stable=True)

        def dcg(r):
            return torch.sum(relevance[r].float() / torch.log2(torch.arange(len(r)).float() + 2))

        assert ndcg(scores, rel) == pytest.approx(float(dcg(rankings[:k]) / dcg(best[:k])), rel=1e-6)
    m = visdial_metrics({"a": [0.9, 0.1, 0.5]}, {"a": 1}, {"a": [0, 1, 0.5]})
    assert m["ndcg"] == pytest.approx(100 * (0.5 / math.log2(3)) / (1 + 0.5 / math.log2(3)))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no scores"):
        visdial_metrics({}, {"a": 0})
    with pytest.raises(ValueError, match="ground-truth index"):
        visdial_metrics({"a": [0.1]}, {"a": 3})
    with pytest.raises(ValueError, match="no relevant"):
        ndcg([0.1, 0.2], [0, 0])
