"""The self-test cases of ITM hard-negative sampling (blipfast/selftest/negatives.py). The CUDA sampler needs a GPU;
on the CPU the cases run its C++ build through the op's "cuda" backend where blipfast._C registers it, else the
reference ("torch"): it passes, and each wrong sampler of the mutation tests (tests.helpers.mutants) fails."""
from __future__ import annotations

import pytest
import torch

from blipfast.selftest import negatives, runner
from tests.helpers.hard_negatives import _cpp_op
from tests.helpers.mutants import SAMPLER_MUTANTS

CPU = torch.device("cpu")
BACKEND = "cuda" if _cpp_op() is not None else "torch"


def _run(dtype=torch.float32):
    return runner.run_cases(negatives.sampler_cases(BACKEND, dtype, "quick"), CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sampler_passes(dtype):
    results = _run(dtype)
    assert all(r.ok for r in results), runner.format_table(results)
    assert len({m.name for r in results for m in r.measures}) == 6


@pytest.mark.parametrize("name", list(SAMPLER_MUTANTS))
def test_wrong_samplers_fail(monkeypatch, name):
    real, calls = negatives.draw, []

    def wrong(backend, s1, s2, d, seed, off, floor=0.0):
        calls.append(1)
        return SAMPLER_MUTANTS[name][0](lambda *a: real(backend, *a, floor), s1, s2, d, seed, off)

    monkeypatch.setattr(negatives, "draw", wrong)
    results = _run()
    assert calls and not all(r.ok for r in results), runner.format_table(results)
