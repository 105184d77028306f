"""Visual Dialog (VisDial v1.0) metrics as the VisDial challenge's starter code computes them
(``visdialch/metrics.py``): each round ranks its 100 candidate answers by the model's scores (rank 1: the highest
score; ties in the candidates' order, Python's stable sort), then

- from the ground-truth answer's rank r of every round: R@1, R@5, R@10 (the share of rounds with r <= k), the mean
  rank and the mean reciprocal rank (MRR);
- NDCG from the dense relevance annotations (the rounds that have them; relevance in [0, 1] per candidate): with
  ``k`` the number of candidates of nonzero relevance, DCG of the model's top k over DCG of the ideal top k, each
  ``sum(relevance / log2(position + 1))``.

R@k, MRR and NDCG are reported in percent (the BLIP paper's unit), the mean rank as it is. Nothing here imports
torch: scores are sequences of numbers.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["ndcg", "scores_to_ranks", "visdial_metrics"]


def scores_to_ranks(scores: Sequence[float]) -> list:
    """The rank (1 = best) of each candidate by descending score; ties keep the candidates' order."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    ranks = [0] * len(scores)
    for pos, i in enumerate(order):
        ranks[i] = pos + 1
    return ranks


def _dcg(candidates: Sequence[int], relevance: Sequence[float]) -> float:
    return sum(float(relevance[c]) / math.log2(pos + 2) for pos, c in enumerate(candidates))


def ndcg(scores: Sequence[float], relevance: Sequence[float]) -> float:
    """NDCG of one round (a fraction): the starter code's ``NDCG.observe`` for one row."""
    if len(scores) != len(relevance):
        raise ValueError(f"ndcg: {len(scores)} scores for {len(relevance)} relevance values")
    k = sum(1 for r in relevance if r != 0)
    if k == 0:
        raise ValueError("ndcg: the round has no relevant candidate (its NDCG is undefined)")
    ranks = scores_to_ranks(scores)
    ranked = sorted(range(len(scores)), key=lambda i: ranks[i])
    best = sorted(range(len(relevance)), key=lambda i: -float(relevance[i]))
    return _dcg(ranked[:k], relevance) / _dcg(best[:k], relevance)


def visdial_metrics(scores: Mapping, gt_index: Mapping, relevance: Mapping = None) -> dict:
    """``{"r@1", "r@5", "r@10", "mean_rank", "mrr"[, "ndcg"], "rounds"}`` of ``scores`` (round id -> the scores of
    its candidates) against ``gt_index`` (round id -> the index of the ground-truth answer) and, for NDCG,
    ``relevance`` (round id -> the dense relevance of every candidate; only the rounds annotated). Every round of
    ``gt_index`` needs scores."""
    missing = [r for r in gt_index if r not in scores]
    if missing:
        raise ValueError(f"visdial_metrics: no scores for {len(missing)} round(s), e.g. {missing[:3]}")
    ranks = []
    for r, gt in gt_index.items():
        s = scores[r]
        if not isinstance(gt, int) or isinstance(gt, bool) or not 0 <= gt < len(s):
            raise ValueError(f"visdial_metrics: round {r!r}: the ground-truth index must be an int in [0, "
                             f"{len(s)}), got {gt!r}")
        ranks.append(scores_to_ranks(s)[gt])
    if not ranks:
        raise ValueError("visdial_metrics: no rounds to score")
    n = len(ranks)
    out = {f"r@{k}": 100.0 * sum(r <= k for r in ranks) / n for k in (1, 5, 10)}
    out["mean_rank"] = sum(ranks) / n
    out["mrr"] = 100.0 * sum(1.0 / r for r in ranks) / n
    if relevance:
        absent = [r for r in relevance if r not in scores]
        if absent:
            raise ValueError(f"visdial_metrics: relevance for round(s) without scores, e.g. {absent[:3]}")
        out["ndcg"] = 100.0 * sum(ndcg(scores[r], rel) for r, rel in relevance.items()) / len(relevance)
    out["rounds"] = n
    return out
