"""NLVR2 accuracy and consistency, as NLVR2's own ``eval/metrics.py`` computes them, in percent (the BLIP papers'
unit; the NLVR2 script prints fractions).

Consistency: the share of sentences all of whose examples are right; an example's sentence is its identifier
with the third field blanked (``dev-850-0-1`` and ``dev-850-3-1`` are one sentence). It is reported only when
every identifier has NLVR2's four fields (``split-set-pair-sentence``); the BLIP / LAVIS lists, keyed by row
number, have none.
"""
from __future__ import annotations

from typing import Mapping

from .formats import select


def _sentence(identifier):
    if not isinstance(identifier, str):
        return None
    parts = identifier.split("-")
    if len(parts) != 4:
        return None
    parts[2] = ""
    return "-".join(parts)


def nlvr2_accuracy(predictions: Mapping, labels: Mapping, *, allow_missing: bool = False) -> dict:
    """``{"accuracy", ["consistency"], "coverage"}`` of ``predictions`` (id -> bool) against ``labels`` (id ->
    bool). Every example needs a prediction unless ``allow_missing``."""
    ids, coverage = select(predictions, labels, allow_missing=allow_missing)
    for q in ids:
        for name, table in (("prediction", predictions), ("label", labels)):
            if not isinstance(table[q], bool):
                raise TypeError(f"example {q!r}: the {name} must be a bool, got {table[q]!r}")
    correct = {q: predictions[q] == labels[q] for q in ids}
    out = {"accuracy": 100.0 * sum(correct.values()) / len(ids)}
    sentences = {q: _sentence(q) for q in ids}
    if all(s is not None for s in sentences.values()):
        consistent: dict = {}
        for q in ids:
            consistent[sentences[q]] = consistent.get(sentences[q], True) and correct[q]
        out["consistency"] = 100.0 * sum(consistent.values()) / len(consistent)
    out["coverage"] = coverage
    return out
