"""The self-test cases of the fused ITC loss (blipfast/selftest/itc.py) under the interpreter: the real kernel passes
the quick cases in fp32 and fp16, wrong gradients fail them."""
from __future__ import annotations

import pytest
import torch

from blipfast.selftest import runner
from tests.helpers.mutants import Mutant, outputs
from tests.helpers.selftest import cases

triton = pytest.importorskip("triton")
from blipfast.kernels import itc as IK  # noqa: E402  (after the triton check)

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_real_kernel_passes(dtype):
    """fp16 too (Triton's interpreter cannot run the kernel's bf16 dots; bf16 runs on a GPU)."""
    results = runner.run_cases(cases("itc_loss", "triton", dtype), CPU)
    assert all(r.ok for r in results), runner.format_table(results)


@pytest.mark.parametrize("wrong", [
    outputs(lambda di, dt, dtemp: (di, dt, dtemp * 1.05)),
    outputs(lambda di, dt, dtemp: (di, dt / 2, dtemp)),
], ids=["temperature gradient 5% off", "half d text_feats"])
def test_wrong_gradients_fail(monkeypatch, wrong):
    m = Mutant(monkeypatch, IK, "itc_loss_bwd", wrong)
    results = runner.run_cases(cases("itc_loss", "triton", torch.float32, "image ids"), CPU)
    assert m.calls and not results[0].ok, runner.format_table(results)
