"""The self-test cases of the post-LN epilogue (blipfast/selftest/layernorm.py). The CUDA kernel needs a GPU; on the
CPU the cases run the op's "torch" backend, the torch implementation of the same fused contract: it passes, and
each wrong variant of the mutation tests (tests.helpers.mutants) fails, so the cases can fail a CUDA kernel wrong
in the same way. On a GPU the CUDA kernel itself passes them (marked gpu)."""
from __future__ import annotations

import pytest
import torch

from blipfast.ops import layernorm_epilogue as LE
from blipfast.selftest import layernorm, runner
from tests.helpers.mutants import LN_BWD_MUTANTS, LN_FWD_MUTANTS, Mutant

OP = "bias_dropout_add_layernorm"


def _run(backend, dtype, device):
    """The quick cases, built for ``backend`` (the builders take the backend they check)."""
    return runner.run_cases(layernorm.layernorm_cases(backend, dtype, "quick"), torch.device(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cases_pass_on_the_fused_contract(dtype):
    results = _run("torch", dtype, "cpu")
    assert all(r.ok for r in results), runner.format_table(results)
    assert {"y", "dx", "dbias", "dresidual", "dweight", "dln_bias", "forward dropout mask"} <= {
        m.name for r in results for m in r.measures}


@pytest.mark.parametrize("name", list(LN_FWD_MUTANTS) + list(LN_BWD_MUTANTS))
def test_wrong_contracts_fail(monkeypatch, name):
    attr = "_fwd_torch" if name in LN_FWD_MUTANTS else "_bwd_torch"
    m = Mutant(monkeypatch, LE, attr, {**LN_FWD_MUTANTS, **LN_BWD_MUTANTS}[name])
    results = _run("torch", torch.float32, "cpu")
    assert m.calls and not all(r.ok for r in results), runner.format_table(results)


@pytest.mark.gpu
@pytest.mark.extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_kernel_passes(dtype):
    results = _run("cuda", dtype, "cuda")
    assert all(r.ok for r in results), runner.format_table(results)
