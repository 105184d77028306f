"""Model-level integration: the stage-1 ITM path consumes the sampled negatives as index tensors, and the
QFormer runs on the Triton attention kernels when they are selected (interpreter on CPU, CUDA on a GPU)."""
from __future__ import annotations

import pytest

from tests.helpers.integration import check_itm_index_path, check_qformer_on_triton
from tests.helpers.runtime import HAS_CUDA, count_calls


@pytest.mark.parametrize("b,same_images", [(4, None), (5, [0, 1, 1, 2, 0]), (1, None), (2, [3, 3])])
def test_itm_from_sampled_indices_equals_lavis_construction(b, same_images):
    """The index path (kv_index into shared image K/V, weight 0 for missing negatives) gives LAVIS'
    loss and image-feature gradients; B*W = 1 and all-same-image batches train on positives only."""
    negs = check_itm_index_path(b, same_images)
    if b == 1 or (same_images is not None and len(set(same_images)) == 1):
        assert (negs[0] == -1).all() and (negs[1] == -1).all()
    else:
        assert (negs[0] >= 0).all() and (negs[1] >= 0).all()


@pytest.mark.parametrize("mode_case", ["queries+text", "text-only", "itg-cached"])
def test_qformer_runs_on_triton_kernels(monkeypatch, mode_case):
    """With BLIPFAST_BACKEND=triton the model's attention goes through the Triton kernels (interpreter on CPU)
    and matches the float64 reference within PyTorch's fp32 error, in outputs and parameter gradients."""
    pytest.importorskip("triton")
    import blipfast.kernels.attention as kern

    calls = count_calls(monkeypatch, kern, "qformer_attention_fwd", "cross_attention_fwd")
    check_qformer_on_triton(monkeypatch, mode_case, "cuda" if HAS_CUDA else "cpu", calls)
