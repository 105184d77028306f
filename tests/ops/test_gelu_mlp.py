"""blipfast.ops.gelu_mlp against its reference (F.linear, F.gelu, F.linear) in float64: the output and the gradients
of x, w1, b1 and w2 within twice PyTorch's own error in fp32, bf16 and fp16, both GELUs, under autocast, compiled
with fullgraph=True; no bias, awkward sizes; what it keeps for the backward; bad input. tests/kernels/test_mutations.py
runs the same check (tests.helpers.linear_ops) on wrong implementations."""
from __future__ import annotations

import pytest
import torch

import blipfast.ops as O
from tests.helpers.linear_ops import assert_compiles_like_eager, saved_for_backward
from tests.helpers.linear_ops import gelu_mlp_check as check, gelu_mlp_make as make

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_matches_float64(dtype, approximate):
    check(dtype, approximate=approximate)


@pytest.mark.parametrize("shape,d,h,o", [((13,), 5, 3, 1), ((2, 1, 3), 9, 17, 9), ((0, 4), 8, 16, 8), ((1,), 1, 1, 1)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_awkward_sizes(shape, d, h, o, bias):
    check(shape=shape, d=d, h=h, o=o, bias=bias)


@pytest.mark.parametrize("amp", [BF16, F16], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_autocast(amp, approximate):
    """fp32 inputs under autocast: GEMMs and GELU in autocast's dtype (within PyTorch's error under the same
    autocast), the output in that dtype, fp32 gradients."""
    check(F32, autocast=amp, approximate=approximate)


def test_gradient_of_some_inputs_only():
    x, w1, b1, w2 = (t.clone().requires_grad_() for t in make().values())
    full = torch.autograd.grad(O.gelu_mlp(x, w1, b1, w2).sum(), [x, w1, b1, w2])
    (gx,) = torch.autograd.grad(O.gelu_mlp(x, w1.detach(), b1.detach(), w2.detach()).sum(), [x])
    gb1, gw2 = torch.autograd.grad(O.gelu_mlp(x.detach(), w1.detach(), b1, w2).sum(), [b1, w2])
    (gw1,) = torch.autograd.grad(O.gelu_mlp(x.detach(), w1, b1.detach(), w2.detach()).sum(), [w1])
    for a, b in zip((gx, gw1, gb1, gw2), full):
        assert torch.equal(a, b)


def test_keeps_no_activation_for_backward():
    """Saved: x and the pre-activation u [rows, H] (the Parameters by reference); not gelu(u), which plain autograd
    keeps too."""
    inputs = make(shape=(3, 7), d=24, h=40, o=19)
    saved = saved_for_backward(lambda x, w1, b1, w2: O.gelu_mlp(x, w1, b1, w2), inputs)
    assert sum(torch.Size(s).numel() == 21 * 40 for s, _ in saved) == 1, saved  # u only
    assert sorted(saved) == sorted([((21, 24), F32), ((21, 40), F32), ((40, 24), F32), ((19, 40), F32)]), saved
    plain = saved_for_backward(lambda x, w1, b1, w2: O.gelu_mlp_ref(x, w1, b1, w2), inputs)
    assert sum(torch.Size(s).numel() == 21 * 40 for s, _ in plain) == 2


def test_autocast_output_and_saved_dtypes():
    x, w1, b1, w2 = (t.requires_grad_() for t in make().values())
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=BF16):
            y = O.gelu_mlp(x, w1, b1, w2)
    assert y.dtype == BF16
    assert sorted(str(t.dtype) for t in seen if t is not w1 and t is not w2) == ["torch.bfloat16"] * 2  # x and u
    assert any(t is w1 for t in seen) and any(t is w2 for t in seen)


@pytest.mark.parametrize("amp", [None, BF16], ids=["fp32", "autocast"])
def test_compiles_fullgraph(amp):
    assert_compiles_like_eager(lambda x, w1, b1, w2: O.gelu_mlp(x, w1, b1, w2, approximate="tanh"), make(),
                               autocast=amp)


def test_opcheck():
    x, w1, b1, w2 = (t.clone().requires_grad_() for t in make(shape=(5,), d=6, h=8, o=3).values())
    fwd_args = (x, w1, b1, w2, "tanh", "torch")
    torch.library.opcheck(torch.ops.blipfast.gelu_mlp_fwd, fwd_args)
    y, u = torch.ops.blipfast.gelu_mlp_fwd(*fwd_args)
    for need, b1_dtype in [((True, True, True), F32), ((False, False, True), None)]:
        torch.library.opcheck(torch.ops.blipfast.gelu_mlp_bwd,
                              (torch.randn_like(y), x.detach(), u.detach(), w1.detach(), w2.detach(), "tanh", *need,
                               b1_dtype, "torch"))


def test_no_host_sync_on_meta():
    x, w1, b1, w2 = (torch.empty(*s, device="meta").requires_grad_() for s in [(2, 5, 8), (16, 8), (16,), (4, 16)])
    for fn in (O.gelu_mlp, O.gelu_mlp_ref):
        grads = torch.autograd.grad(fn(x, w1, b1, w2).sum(), [x, w1, b1, w2])
        assert [g.shape for g in grads] == [x.shape, w1.shape, b1.shape, w2.shape]


# ----------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument


def _call(**over):
    args = {**make(shape=(2,), d=3, h=4, o=5), **over}
    kw = {k: args.pop(k) for k in ("approximate", "backend") if k in args}
    return lambda: O.gelu_mlp(args["x"], args["w1"], args["b1"], args["w2"], **kw)


CASES = [
    ("x-type", _call(x=None), TypeError, r"\bx must be a torch.Tensor"),
    ("x-0d", _call(x=torch.tensor(1.0)), ValueError, r"\bx must have a non-empty last dimension"),
    ("x-int", _call(x=torch.ones(2, 3, dtype=torch.int32)), TypeError, r"\bx must have dtype"),
    ("w1-shape", _call(w1=torch.randn(4, 2)), ValueError, r"\bw1 must have shape \[\*, 3\]"),
    ("w1-1d", _call(w1=torch.randn(4)), ValueError, r"\bw1 must have 2 dimensions"),
    ("b1-shape", _call(b1=torch.randn(3)), ValueError, r"\bb1 must have shape \[4\]"),
    ("w2-shape", _call(w2=torch.randn(5, 3)), ValueError, r"\bw2 must have shape \[\*, 4\]"),
    ("w2-device", _call(w2=torch.randn(5, 4, device="meta")), ValueError, r"\bw2 is on meta"),
    ("w2-dtype", _call(w2=torch.randn(5, 4, dtype=F16)), TypeError, r"w2=float16"),
    ("approximate", _call(approximate="erf"), ValueError, r"approximate must be one of"),
    ("backend", _call(backend="cuda"), ValueError, r"backend 'cuda' is not implemented"),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
