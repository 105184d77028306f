"""What the tests of the linear ops (concat_linear, gelu_mlp, linear_cross_entropy) share: run an op and its
reference on fresh leaf copies of the same inputs, forward and backward, and hold the op's output and EVERY
gradient to the repository's rule (tests/conftest.py: within twice PyTorch's own error in the dtype under test,
both against the float64 reference); run an op compiled with fullgraph=True against eager; collect what autograd
saves for the backward."""
from __future__ import annotations

import contextlib

import torch

from tests.conftest import assert_within_torch_error


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
