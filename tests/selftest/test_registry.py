"""The registry of check cases (blipfast/selftest/registry.py): every fast backend of every op in every fused dtype
has quick cases and more full ones, the attention kernels' full cases include every candidate tiling in fp16 and
bf16, labels are unique; building the cases runs nothing."""
from __future__ import annotations

import pytest
import torch

from blipfast.ops import _common as C
from blipfast.selftest import registry

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_every_fast_backend_has_cases():
    assert registry.registered() == [("bias_dropout_add_layernorm", "cuda"), ("cross_attention", "triton"),
                                     ("itc_loss", "triton"), ("qformer_attention", "triton"),
                                     ("sample_hard_negatives", "cuda")]
    for op, backend in registry.registered():
        for dtype in DTYPES:
            quick = registry.cases(op, backend, dtype, "quick")
            full = registry.cases(op, backend, dtype, "full")
            assert quick and len(full) > len(quick), (op, dtype)
            assert {c.shape for c in quick} <= {c.shape for c in full}
            assert {c.key for c in full} == {(op, backend, dtype)}
            labels = [c.shape for c in full]
            assert len(labels) == len(set(labels)), labels


@pytest.mark.skipif(not C.TRITON_OK, reason="needs Triton")
def test_full_attention_checks_every_candidate_tiling_in_half_precision():
    for op in ("qformer_attention", "cross_attention"):
        tiled = [c for c in registry.cases(op, "triton", torch.bfloat16, "full") if "tiling" in c.shape]
        assert len(tiled) >= 2, op
        assert not [c for c in registry.cases(op, "triton", torch.float32, "full") if "tiling" in c.shape]


def test_select_filters_and_names_unknown_ops():
    got = registry.select(["itc_loss"], [torch.float32], "quick", lambda b, d: True)
    assert got and {c.op for c in got} == {"itc_loss"}
    assert registry.select(None, DTYPES, "quick", lambda b, d: False) == []
    with pytest.raises(ValueError, match="gelu_mlp"):
        registry.select(["gelu_mlp"], DTYPES, "quick", lambda b, d: True)
