"""What the tests of the linear ops (concat_linear, gelu_mlp, linear_cross_entropy) and their mutation tests share: run an op and its
reference on fresh leaf copies of the same inputs, forward and backward, and hold the op's output and EVERY
gradient to the repository's rule (tests/helpers/tolerance.py: within twice PyTorch's own error in the dtype under test,
both against the float64 reference); run an op compiled with fullgraph=True against eager; collect what autograd
saves for the backward."""
from __future__ import annotations

import contextlib

import torch

import blipfast.ops as O
from tests.helpers.tolerance import assert_within_torch_error


def leaves(inputs: dict, dtype) -> dict:
    """Copies of ``inputs`` ({name: tensor or None}) that require grad, the floating ones in ``dtype``."""
    return {n: None if t is None else t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}


def run(fn, inputs: dict, dtype, *, autocast=None, cotangent=None):
    """``fn(**leaves)`` in ``dtype`` (under ``torch.autocast("cpu", autocast)`` when given) and the gradient of
    <output, cotangent> (a fixed float64 tensor; a scalar output: 1.3) for every input: (output, {name: grad})."""
    xs = leaves(inputs, dtype)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = fn(**xs)
    cot = torch.tensor(1.3, dtype=torch.float64) if cotangent is None else cotangent
    live = {n: t for n, t in xs.items() if t is not None}
    grads = torch.autograd.grad((out.double() * cot).sum(), list(live.values()))
    return out, dict(zip(live, grads))


def check_against_float64(fast, ref, inputs: dict, dtype, *, autocast=None, cotangent=None) -> None:
    """``fast`` in ``dtype`` (with ``autocast``: fp32 inputs under autocast in that dtype) within twice PyTorch's
    error (``ref`` in the same dtype and autocast) of ``ref`` in float64, for the output and every gradient; each
    gradient has its input's dtype."""
    out, grads = run(fast, inputs, dtype, autocast=autocast, cotangent=cotangent)
    low, low_grads = run(ref, inputs, dtype, autocast=autocast, cotangent=cotangent)
    out64, grads64 = run(ref, inputs, torch.float64, cotangent=cotangent)
    rule_dtype = autocast or dtype
    assert out.dtype == low.dtype, f"output dtype {out.dtype}, PyTorch's {low.dtype}"
    assert_within_torch_error(out, out64, low, dtype=rule_dtype, name="output")
    assert grads.keys() == grads64.keys()
    for name, g in grads.items():
        assert g.dtype == dtype, f"d {name}: dtype {g.dtype}, its input's is {dtype}"
        assert_within_torch_error(g, grads64[name], low_grads[name], dtype=rule_dtype, name=f"d {name}")


def assert_compiles_like_eager(fn, inputs: dict, *, autocast=None) -> None:
    """``torch.compile(fn, fullgraph=True)`` (aot_eager: Dynamo, the fake implementations and AOTAutograd around the
    same custom ops) gives eager's output and gradients bit for bit."""
    torch._dynamo.reset()
    eager = run(fn, inputs, torch.float32, autocast=autocast)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs, torch.float32, autocast=autocast)
    assert eager[0].dtype == compiled[0].dtype and torch.equal(eager[0], compiled[0]), "compiled output"
    for name, g in eager[1].items():
        assert torch.equal(g, compiled[1][name]), f"compiled d {name}"


def saved_for_backward(fn, inputs: dict) -> list:
    """Shapes and dtypes of the tensors autograd saves while ``fn(**leaves)`` runs (fp32 leaves)."""
    xs = leaves(inputs, torch.float32)
    seen = []

    def pack(t):
        seen.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**xs)
    return seen


F32 = torch.float32


# ---- concat_linear ---------------------------------------------------------------------------------------


def concat_linear_make(shape=(2, 9), k=16, rows=(5, 12, 7), *, bias=True):
    """Inputs {x [*shape, k], w0.. [rows[i], k], b0.. [rows[i]] (without bias: none)}."""
    inputs = {"x": torch.randn(*shape, k)}
    inputs.update({f"w{i}": torch.randn(n, k) / k ** 0.5 for i, n in enumerate(rows)})
    if bias:
        inputs.update({f"b{i}": torch.randn(n) for i, n in enumerate(rows)})
    return inputs


def _concat_split(t: dict):
    ws = [v for n, v in t.items() if n.startswith("w")]
    bs = [v for n, v in t.items() if n.startswith("b")]
    return t["x"], ws, (bs or None)


def concat_linear_check(dtype=F32, *, shape=(2, 9), k=16, rows=(5, 12, 7), bias=True, autocast=None):
    """The op's output and every gradient against the float64 reference (see the module doc)."""
    inputs = concat_linear_make(shape, k, rows, bias=bias)
    cot = torch.randn(*shape, sum(rows), dtype=torch.float64)
    check_against_float64(lambda **t: O.concat_linear(*_concat_split(t)),
                          lambda **t: O.concat_linear_ref(*_concat_split(t)),
                          inputs, dtype, autocast=autocast, cotangent=cot)


# ---- gelu_mlp --------------------------------------------------------------------------------------------


def gelu_mlp_make(shape=(3, 7), d=24, h=40, o=19, *, bias=True):
    """Inputs {x [*shape, d], w1 [h, d], b1 [h] or None, w2 [o, h]}."""
    return {"x": torch.randn(*shape, d), "w1": torch.randn(h, d) / d ** 0.5, "b1": torch.randn(h) if bias else None,
            "w2": torch.randn(o, h) / h ** 0.5}


def gelu_mlp_check(dtype=F32, *, shape=(3, 7), d=24, h=40, o=19, bias=True, approximate="none", autocast=None):
    """The op's output and every gradient against the float64 reference (see the module doc)."""
    inputs = gelu_mlp_make(shape, d, h, o, bias=bias)
    cot = torch.randn(*shape, o, dtype=torch.float64)
    check_against_float64(lambda x, w1, b1, w2: O.gelu_mlp(x, w1, b1, w2, approximate=approximate),
                          lambda x, w1, b1, w2: O.gelu_mlp_ref(x, w1, b1, w2, approximate=approximate),
                          inputs, dtype, autocast=autocast, cotangent=cot)


# ---- linear_cross_entropy --------------------------------------------------------------------------------


def linear_cross_entropy_make(n=37, d=24, v=53, *, bias=True, ignore="some"):
    """Inputs {x, weight, bias} and targets [n]: ``ignore`` "some" (every third row and a random few are -100),
    "none" or "all"."""
    inputs = {"x": torch.randn(n, d), "weight": torch.randn(v, d) / d ** 0.5, "bias": torch.randn(v) if bias else None}
    targets = torch.randint(0, v, (n,))
    if ignore == "some":
        targets[::3] = -100
        targets[torch.rand(n) < 0.2] = -100
    elif ignore == "all":
        targets[:] = -100
    return inputs, targets


def linear_cross_entropy_check(dtype=F32, *, n=37, d=24, v=53, bias=True, ignore="some", label_smoothing=0.1, chunk=8,
                               autocast=None):
    """The op's loss and every gradient against the float64 reference (see the module doc)."""
    inputs, targets = linear_cross_entropy_make(n, d, v, bias=bias, ignore=ignore)
    check_against_float64(
        lambda x, weight, bias: O.linear_cross_entropy(x, weight, bias, targets, label_smoothing=label_smoothing,
                                                       chunk=chunk),
        lambda x, weight, bias: O.linear_cross_entropy_ref(x, weight, bias, targets, label_smoothing=label_smoothing),
        inputs, dtype, autocast=autocast)
