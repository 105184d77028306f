"""The runner, the cases and the measures of the self-test (blipfast/selftest/runner.py, case.py, tolerance.py): every
fast backend of every op in every fused dtype has quick cases and more full ones (the attention kernels' full cases
include every candidate tiling in fp16 and bf16), labels are unique, building the cases runs nothing; a case that
raises has failed, with its error; a NaN or infinite error never passes; the clean context a check runs in."""
from __future__ import annotations

import math
import os

import pytest
import torch

from blipfast.ops import _common as C
from blipfast.selftest import runner
from blipfast.selftest.case import Case, Measure, rule
from blipfast.selftest.tolerance import torch_error

CPU = torch.device("cpu")


def _case(run, shape="s"):
    return Case("op", "triton", torch.float32, shape, run)


def test_measures():
    ref = torch.randn(64, dtype=torch.float64)
    low = ref.float()
    assert rule("x", low, ref, low, torch.float32).ok
    assert not rule("x", low * 1.01, ref, low, torch.float32).ok
    nan = low.clone()
    nan[3] = float("nan")
    assert not rule("x", nan, ref, low, torch.float32).ok  # a NaN is an infinite error
    assert not rule("x", low, ref, nan, torch.float32).ok  # a NaN yardstick is no bound
    err, bound, err_torch = torch_error(low, ref, low)
    assert err == err_torch and bound > err
    assert not Measure("m", math.inf, math.inf).ok and Measure("m", 0.0, 0.0).ok


def test_failures_and_exceptions_are_reported():
    def raises(inp):
        raise RuntimeError("out of resource: shared memory")

    results = runner.run_cases([_case(lambda inp: [Measure("a", 1.0, 2.0)], "good"),
                                _case(lambda inp: [Measure("a", 1.0, 2.0), Measure("b", 3.0, 2.0)], "bad"),
                                _case(raises, "raises"), _case(lambda inp: [], "empty")], CPU)
    assert [r.ok for r in results] == [True, False, False, False]
    assert results[1].worst.name == "b" and "b 3 > 2" in results[1].error_text()
    assert "RuntimeError: out of resource" in results[2].error_text()
    verdict = runner.verdicts(results)[("op", "triton", torch.float32)]
    assert verdict[0] is False and verdict[2] == 4 and "bad" in verdict[1]
    table = runner.format_table(results)
    assert "4 checks: 1 passed, 3 failed" in table and "raised RuntimeError" in table
    js = runner.to_json(results, "quick", {"gpu": "cpu"})
    assert js["passed"] == 1 and js["cases"][2]["exception"].startswith("raises")
    stopped = runner.run_cases([_case(raises), _case(lambda inp: [Measure("a", 0.0, 1.0)])], CPU,
                               stop_on_failure=True)
    assert len(stopped) == 1


def test_a_case_runs_with_gradients_without_autocast_and_leaves_the_rng_alone(monkeypatch):
    monkeypatch.delenv("BLIPFAST_AUTOTUNE", raising=False)
    seen = {}

    def run(inp):
        seen.update(grad=torch.is_grad_enabled(), autocast=torch.is_autocast_enabled("cpu"),
                    tune=os.environ.get("BLIPFAST_AUTOTUNE"), x=inp.randn(3))
        return [Measure("a", 0.0, 1.0)]

    state = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert runner.run_cases([_case(run)], CPU, autotune=False)[0].ok
    assert seen["grad"] and not seen["autocast"] and seen["tune"] == "0"
    assert torch.equal(torch.get_rng_state(), state)
    assert "BLIPFAST_AUTOTUNE" not in os.environ
    again = {}
    runner.run_cases([_case(lambda inp: again.update(x=inp.randn(3)) or [])], CPU)
    assert torch.equal(seen["x"], again["x"])  # inputs are a function of the case


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_every_fast_backend_has_cases():
    assert runner.registered() == [("bias_dropout_add_layernorm", "cuda"), ("cross_attention", "triton"),
                                     ("itc_loss", "triton"), ("qformer_attention", "triton"),
                                     ("sample_hard_negatives", "cuda")]
    for op, backend in runner.registered():
        for dtype in DTYPES:
            quick = runner.cases(op, backend, dtype, "quick")
            full = runner.cases(op, backend, dtype, "full")
            assert quick and len(full) > len(quick), (op, dtype)
            assert {c.shape for c in quick} <= {c.shape for c in full}
            assert {c.key for c in full} == {(op, backend, dtype)}
            labels = [c.shape for c in full]
            assert len(labels) == len(set(labels)), labels


@pytest.mark.skipif(not C.TRITON_OK, reason="needs Triton")
def test_full_attention_checks_every_candidate_tiling_in_half_precision():
    for op in ("qformer_attention", "cross_attention"):
        tiled = [c for c in runner.cases(op, "triton", torch.bfloat16, "full") if "tiling" in c.shape]
        assert len(tiled) >= 2, op
        assert not [c for c in runner.cases(op, "triton", torch.float32, "full") if "tiling" in c.shape]


def test_select_filters_and_names_unknown_ops():
    got = runner.select(["itc_loss"], [torch.float32], "quick", lambda b, d: True)
    assert got and {c.op for c in got} == {"itc_loss"}
    assert runner.select(None, DTYPES, "quick", lambda b, d: False) == []
    with pytest.raises(ValueError, match="gelu_mlp"):
        runner.select(["gelu_mlp"], DTYPES, "quick", lambda b, d: True)
