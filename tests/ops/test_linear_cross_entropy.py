"""blipfast.ops.linear_cross_entropy against its reference (F.linear + F.cross_entropy, ignore_index=-100) in
float64: the loss and the gradients of x, weight and bias within twice PyTorch's own error in fp32, bf16 and fp16,
under autocast, compiled with fullgraph=True; rows without a target, all rows without one, label smoothing, chunk
boundaries, no bias; what it keeps for the backward; bad input. tests/kernels/test_mutations.py runs the same check
(tests.helpers.linear_ops) on wrong implementations."""
from __future__ import annotations

import pytest
import torch

import blipfast.ops as O
from tests.helpers.linear_ops import assert_compiles_like_eager, saved_for_backward
from tests.helpers.linear_ops import linear_cross_entropy_check as check, linear_cross_entropy_make as make

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_float64(dtype, label_smoothing):
    check(dtype, label_smoothing=label_smoothing)


@pytest.mark.parametrize("n,chunk", [(37, 8), (32, 8), (37, 1), (5, 1024), (1, 3), (0, 4)])
def test_chunk_boundaries(n, chunk):
    """N a multiple of the chunk or not (a short last chunk), one row per chunk, one chunk, no rows."""
    check(n=n, chunk=chunk)


@pytest.mark.parametrize("ignore", ["none", "all"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_rows_without_target(ignore, dtype):
    """No row ignored; every row ignored (loss 0, every gradient 0, where PyTorch's mean is 0/0)."""
    check(dtype, ignore=ignore)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_without_bias_awkward_sizes(dtype):
    check(dtype, n=19, d=7, v=3, bias=False, label_smoothing=0.3, chunk=5)


def test_full_label_smoothing():
    check(label_smoothing=1.0)


@pytest.mark.parametrize("amp", [BF16, F16], ids=str)
def test_autocast(amp):
    """fp32 inputs under autocast: the GEMMs in autocast's dtype (within PyTorch's error under the same autocast),
    an fp32 loss, fp32 gradients."""
    check(F32, autocast=amp)


def test_all_ignored_is_exactly_zero():
    inputs, targets = make(ignore="all")
    x = inputs["x"].requires_grad_()
    loss = O.linear_cross_entropy(x, inputs["weight"], inputs["bias"], targets)
    (g,) = torch.autograd.grad(loss, [x])
    assert loss.item() == 0.0 and not g.any()


def test_gradient_of_some_inputs_only():
    """A frozen head (weight, bias without grad), or a frozen input: the other gradients are unchanged."""
    inputs, targets = make()
    x, w, b = (t.clone().requires_grad_() for t in inputs.values())
    full = torch.autograd.grad(O.linear_cross_entropy(x, w, b, targets, label_smoothing=0.1, chunk=8), [x, w, b])
    (gx,) = torch.autograd.grad(O.linear_cross_entropy(x, w.detach(), b.detach(), targets, label_smoothing=0.1,
                                                       chunk=8), [x])
    gw, gb = torch.autograd.grad(O.linear_cross_entropy(x.detach(), w, b, targets, label_smoothing=0.1, chunk=8),
                                 [w, b])
    assert torch.equal(gx, full[0]) and torch.equal(gw, full[1]) and torch.equal(gb, full[2])


def test_keeps_no_logits_for_backward():
    """Saved: x, the targets, one log-sum-exp per row and the count (the Parameters by reference); no [N, V]."""
    inputs, targets = make(n=40, v=64)
    saved = saved_for_backward(lambda x, weight, bias: O.linear_cross_entropy(x, weight, bias, targets, chunk=16),
                               inputs)
    assert all(torch.Size(s).numel() != 40 * 64 for s, _ in saved), saved
    assert sorted(s for s, _ in saved) == sorted([(40, 24), (64, 24), (64,), (40,), (40,), ()]), saved
    plain = saved_for_backward(lambda x, weight, bias: O.linear_cross_entropy_ref(x, weight, bias, targets), inputs)
    assert any(torch.Size(s).numel() == 40 * 64 for s, _ in plain)  # what it saves the memory of


def test_autocast_saves_x_in_the_autocast_dtype():
    inputs, targets = make()
    x, w = inputs["x"].requires_grad_(), inputs["weight"].requires_grad_()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=BF16):
            loss = O.linear_cross_entropy(x, w, None, targets)
    assert loss.dtype == F32
    assert [t.dtype for t in seen if t.shape == x.shape] == [BF16]
    assert any(t is w for t in seen)  # the weight by reference, not a bf16 copy


@pytest.mark.parametrize("amp", [None, BF16], ids=["fp32", "autocast"])
def test_compiles_fullgraph(amp):
    inputs, targets = make()

    def fn(x, weight, bias):
        return O.linear_cross_entropy(x, weight, bias, targets, label_smoothing=0.1, chunk=8)

    assert_compiles_like_eager(fn, inputs, autocast=amp)


def test_opcheck():
    inputs, targets = make(n=9, d=6, v=7)
    x, w, b = (t.clone().requires_grad_() for t in inputs.values())
    fwd_args = (x, w, b, targets, 0.1, 4, "torch")
    torch.library.opcheck(torch.ops.blipfast.linear_cross_entropy_fwd, fwd_args)
    _, lse, count = torch.ops.blipfast.linear_cross_entropy_fwd(*fwd_args)
    for need in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(torch.ops.blipfast.linear_cross_entropy_bwd,
                              (torch.tensor(1.3), x.detach(), w.detach(), b.detach(), targets, lse.detach(),
                               count.detach(), 0.1, 4, *need, "torch"))


def test_no_host_sync_on_meta():
    x, w, b = (torch.empty(*s, device="meta").requires_grad_() for s in [(5, 8), (11, 8), (11,)])
    t = torch.empty(5, dtype=torch.int64, device="meta")
    for fn in (O.linear_cross_entropy, O.linear_cross_entropy_ref):
        gx, gw, gb = torch.autograd.grad(fn(x, w, b, t), [x, w, b])
        assert gx.shape == (5, 8) and gw.shape == (11, 8) and gb.shape == (11,)


# ----------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument


def _call(**over):
    (inputs, targets), kw = make(n=4, d=3, v=5, ignore="none"), {}
    args = dict(x=inputs["x"], weight=inputs["weight"], bias=inputs["bias"], targets=targets)
    for k, val in over.items():
        (args if k in args else kw)[k] = val
    return lambda: O.linear_cross_entropy(args["x"], args["weight"], args["bias"], args["targets"], **kw)


CASES = [
    ("x-type", _call(x=[[1.0]]), TypeError, r"\bx must be a torch.Tensor"),
    ("x-3d", _call(x=torch.randn(2, 2, 3)), ValueError, r"\bx must have 2 dimensions"),
    ("x-int", _call(x=torch.ones(4, 3, dtype=torch.int64)), TypeError, r"\bx must have dtype"),
    ("weight-d", _call(weight=torch.randn(5, 4)), ValueError, r"\bweight must have shape \[\*, 3\]"),
    ("weight-empty", _call(weight=torch.randn(0, 3), bias=None), ValueError, r"\bweight must have at least one"),
    ("weight-device", _call(weight=torch.randn(5, 3, device="meta")), ValueError, r"\bweight is on meta"),
    ("weight-dtype", _call(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, r"weight=float64"),
    ("bias-shape", _call(bias=torch.randn(4)), ValueError, r"\bbias must have shape \[5\]"),
    ("bias-dtype", _call(bias=torch.randn(5, dtype=BF16)), TypeError, r"bias=bfloat16"),
    ("targets-float", _call(targets=torch.zeros(4)), TypeError, r"\btargets must have dtype"),
    ("targets-int32", _call(targets=torch.zeros(4, dtype=torch.int32)), TypeError, r"\btargets must have dtype"),
    ("targets-shape", _call(targets=torch.zeros(5, dtype=torch.int64)), ValueError, r"\btargets must have shape"),
    ("targets-big", _call(targets=torch.tensor([0, 5, 1, 2])), ValueError, r"\btargets values must be in \[0, 5\)"),
    ("targets-neg", _call(targets=torch.tensor([0, -1, 1, 2])), ValueError, r"or -100, got -1 at position 1"),
    ("ls-big", _call(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    ("ls-bool", _call(label_smoothing=True), TypeError, r"label_smoothing must be a float"),
    ("chunk-0", _call(chunk=0), ValueError, r"chunk must be >= 1"),
    ("chunk-float", _call(chunk=8.0), TypeError, r"chunk must be an int"),
    ("backend", _call(backend="triton"), ValueError, r"backend 'triton' is not implemented"),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
