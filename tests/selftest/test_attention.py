"""The self-test cases of the Triton attention kernels (blipfast/selftest/attention.py) under the interpreter: the
real kernels pass the quick cases in fp32; kernels wrong in the ways of the mutation tests fail them."""
from __future__ import annotations

import pytest
import torch

from blipfast.selftest import runner
from tests.helpers.mutants import Mutant, outputs
from tests.helpers.selftest import cases

triton = pytest.importorskip("triton")
from blipfast.kernels import attention as AK  # noqa: E402  (after the triton check)

CPU, F32 = torch.device("cpu"), torch.float32


def _run(op, label=""):
    return runner.run_cases(cases(op, "triton", F32, label), CPU, autotune=False)


@pytest.mark.parametrize("op", ["qformer_attention", "cross_attention"])
def test_real_kernels_pass_the_quick_cases(op):
    results = _run(op)
    assert all(r.ok for r in results), runner.format_table(results)
    names = {m.name for r in results for m in r.measures}
    assert {"out", "dq", "dk", "dv", "dropout mask"} <= names


# (op, kernel entry point, wrong kernel, the label of a case that must reject it)
MUTANTS = {
    "padding mask dropped": ("cross_attention", "cross_attention_fwd",
                             lambda f, q, k, v, idx, kpm, *a, **kw: f(q, k, v, idx, None, *a, **kw), "no kv_index"),
    "wrong image": ("cross_attention", "cross_attention_fwd",
                    lambda f, q, k, v, idx, *a, **kw: f(q, k, v, None if idx is None else (idx + 1) % k.shape[0],
                                                        *a, **kw), "an image all padding"),
    "half dk": ("cross_attention", "cross_attention_bwd", outputs(lambda dq, dk, dv: (dq, dk / 2, dv)), "M=2"),
    "dropout mask of another seed": ("qformer_attention", "qformer_attention_fwd",
                                     lambda f, q, k, v, kpm, s, *a, **kw: f(q, k, v, kpm, s + 1, *a, **kw),
                                     "dropout mask"),
    "backward mask of another seed": ("qformer_attention", "qformer_attention_bwd",
                                      lambda f, do, q, k, v, o, lse, kpm, s, *a, **kw:
                                      f(do, q, k, v, o, lse, kpm, None if s is None else s + 1, *a, **kw), "(dropout)"),
    "softmax scale 1% off": ("qformer_attention", "qformer_attention_fwd",
                             lambda f, *a, **kw: f(*a[:-1], a[-1] * 1.01, **kw), "T=1"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_wrong_kernels_fail(monkeypatch, name):
    op, entry, wrong, label = MUTANTS[name]
    m = Mutant(monkeypatch, AK, entry, wrong)
    results = _run(op, label)
    assert m.calls > 0 and not all(r.ok for r in results), runner.format_table(results)
