"""blipfast.ops.concat_linear against its reference (F.linear over the concatenated weights and biases) in float64:
the output and the gradients of x and of every weight and bias within twice PyTorch's own error in fp32, bf16 and
fp16, under autocast, compiled with fullgraph=True; one weight, many, of different sizes, no bias; what it keeps
for the backward; bad input. tests/kernels/test_mutations.py runs the same check (tests.helpers.linear_ops) on wrong implementations."""
from __future__ import annotations

import pytest
import torch

import blipfast.ops as O
from tests.helpers.linear_ops import assert_compiles_like_eager, saved_for_backward
from tests.helpers.linear_ops import _concat_split as _split
from tests.helpers.linear_ops import concat_linear_check as check, concat_linear_make as make

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_float64(dtype, bias):
    check(dtype, bias=bias)


@pytest.mark.parametrize("shape,k,rows", [((11,), 3, (1,)), ((2, 3, 5), 7, (3, 3, 3)), ((0,), 4, (2, 6)),
                                          ((4,), 5, (1, 9, 2, 4, 1, 8))])
def test_awkward_sizes(shape, k, rows):
    check(shape=shape, k=k, rows=rows)


@pytest.mark.parametrize("amp", [BF16, F16], ids=str)
def test_autocast(amp):
    """fp32 inputs under autocast: the GEMMs in autocast's dtype (within PyTorch's error under the same autocast),
    the output in that dtype, fp32 gradients."""
    check(F32, autocast=amp)


def test_gradient_of_some_inputs_only():
    t = {n: v.clone().requires_grad_() for n, v in make().items()}
    x, ws, bs = _split(t)
    full = torch.autograd.grad(O.concat_linear(x, ws, bs).sum(), [x, *ws, *bs])
    (gx,) = torch.autograd.grad(O.concat_linear(x, [w.detach() for w in ws], [b.detach() for b in bs]).sum(), [x])
    gws = torch.autograd.grad(O.concat_linear(x.detach(), ws, [b.detach() for b in bs]).sum(), ws)
    gbs = torch.autograd.grad(O.concat_linear(x.detach(), [w.detach() for w in ws], bs).sum(), bs)
    for a, b in zip((gx, *gws, *gbs), full):
        assert torch.equal(a, b)


def test_keeps_no_concatenated_weight_for_backward():
    """Saved: x and the weights by reference; no [sum of rows, K] copy (plain autograd's torch.cat keeps one)."""
    inputs = make(shape=(2, 9), k=16, rows=(5, 12, 7))
    saved = saved_for_backward(lambda **t: O.concat_linear(*_split(t)), inputs)
    assert sorted(s for s, _ in saved) == sorted([(2, 9, 16), (5, 16), (12, 16), (7, 16)]), saved
    plain = saved_for_backward(lambda **t: O.concat_linear_ref(*_split(t)), inputs)
    assert any(sorted(s) == [16, 24] for s, _ in plain)  # the concatenated weight (transposed)


def test_autocast_output_and_saved_dtypes():
    t = {n: v.requires_grad_() for n, v in make().items()}
    x, ws, bs = _split(t)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: seen.append(s) or s, lambda s: s):
        with torch.autocast("cpu", dtype=BF16):
            y = O.concat_linear(x, ws, bs)
    assert y.dtype == BF16
    assert [s.dtype for s in seen if s.shape == x.shape] == [BF16]
    assert all(any(s is w for s in seen) for w in ws)  # by reference, no bf16 copies


@pytest.mark.parametrize("amp", [None, BF16], ids=["fp32", "autocast"])
def test_compiles_fullgraph(amp):
    assert_compiles_like_eager(lambda **t: O.concat_linear(*_split(t)), make(), autocast=amp)


def test_opcheck():
    t = {n: v.clone().requires_grad_() for n, v in make(shape=(3,), k=4, rows=(2, 5)).items()}
    x, ws, bs = _split(t)
    torch.library.opcheck(torch.ops.blipfast.concat_linear_fwd, (x, ws, bs, "torch"))
    torch.library.opcheck(torch.ops.blipfast.concat_linear_fwd, (x, ws, [], "torch"))
    gy = torch.randn(3, 7)
    for need_x, need_w, bias_dtype in [(True, True, F32), (False, True, None), (True, False, None)]:
        torch.library.opcheck(torch.ops.blipfast.concat_linear_bwd,
                              (gy, x.detach(), [w.detach() for w in ws], need_x, need_w, bias_dtype, "torch"))


def test_no_host_sync_on_meta():
    x = torch.empty(2, 5, 8, device="meta").requires_grad_()
    ws = [torch.empty(n, 8, device="meta").requires_grad_() for n in (3, 4)]
    bs = [torch.empty(n, device="meta").requires_grad_() for n in (3, 4)]
    for fn in (O.concat_linear, O.concat_linear_ref):
        grads = torch.autograd.grad(fn(x, ws, bs).sum(), [x, *ws, *bs])
        assert [g.shape for g in grads] == [t.shape for t in (x, *ws, *bs)]


# ----------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument


def _call(x=None, weights=None, biases="default", **kw):
    x = torch.randn(2, 3) if x is None else x
    weights = [torch.randn(4, 3), torch.randn(2, 3)] if weights is None else weights
    biases = [torch.randn(4), torch.randn(2)] if isinstance(biases, str) else biases
    return lambda: O.concat_linear(x, weights, biases, **kw)


CASES = [
    ("x-type", _call(x=[1.0, 2.0]), TypeError, r"\bx must be a torch.Tensor"),
    ("x-0d", _call(x=torch.tensor(1.0)), ValueError, r"\bx must have at least one dimension"),
    ("weights-tensor", _call(weights=torch.randn(4, 3)), TypeError, r"\bweights must be a list or tuple"),
    ("weights-empty", _call(weights=[], biases=None), ValueError, r"\bweights must hold at least one"),
    ("weights-shape", _call(weights=[torch.randn(4, 3), torch.randn(2, 5)]), ValueError,
     r"\bweights\[1\] must have shape \[\*, 3\]"),
    ("weights-none", _call(weights=[torch.randn(4, 3), None]), TypeError, r"\bweights\[1\] must be a torch.Tensor"),
    ("weights-dtypes", _call(weights=[torch.randn(4, 3), torch.randn(2, 3, dtype=F16)]), TypeError,
     r"weights\[0\], weights\[1\] must share one dtype"),
    ("weights-device", _call(weights=[torch.randn(4, 3, device="meta"), torch.randn(2, 3)]), ValueError,
     r"\bweights\[0\] is on meta"),
    ("biases-count", _call(biases=[torch.randn(4)]), ValueError, r"\bbiases must be None or hold one tensor per"),
    ("biases-none-entry", _call(biases=[torch.randn(4), None]), TypeError, r"\bbiases\[1\] must be a torch.Tensor"),
    ("biases-shape", _call(biases=[torch.randn(4), torch.randn(3)]), ValueError,
     r"\bbiases\[1\] must have shape \[2\]"),
    ("x-dtype", _call(x=torch.randn(2, 3, dtype=torch.float64)), TypeError, r"x=float64"),
    ("backend", _call(backend="triton"), ValueError, r"backend 'triton' is not implemented"),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
