"""bias_dropout_add_layernorm with NaN/inf input and at the edges of floating point.

NaN or inf in x, residual, bias, weight, ln_bias or the incoming gradient gives NaN exactly where PyTorch's
F.layer_norm (the reference, autograd) gives it, in y and in every gradient; finite values agree with the
float64 reference by the tolerance rule (docs/design.md#the-tolerance-rule). Finite input never gives a NaN of the op's
own making: rows of one constant value (y = ln_bias exactly, as PyTorch's Welford statistics give it, also for
eps = 1e-12 where a 1-ulp error in the mean would otherwise be multiplied by 1 / sqrt(eps) = 1e6), N = 1, values whose
squares overflow fp32 (right up to ~1e19, then y = ln_bias; PyTorch's own fp32 LayerNorm gives ln_bias from 1e18
and NaN from ~1e25), and an eps that float32 cannot hold is rejected instead of turning into 0 (rsqrt(0) =
inf, 0 * inf = NaN). z = x + bias + residual is stored in
the activation dtype, so an fp16 sum beyond 65504 is inf there as in PyTorch's fp16 arithmetic (that row
is NaN); an fp32 residual (as under autocast) promotes the op to fp32 and keeps it finite.
CPU: the torch backend. GPU (``-m gpu``): the same for the CUDA kernels (register and general paths).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blipfast.ops import bias_dropout_add_layernorm, bias_dropout_add_layernorm_ref
from tests.helpers.layernorm import EXT, check_against_reference, make_inputs, run
from tests.helpers.runtime import HAS_CUDA
from tests.helpers.tolerance import assert_within_torch_error

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.extension])]


def _dev(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _poison(inputs, dy, case):
    x, b, res, w, lb = [t.clone() for t in inputs]
    dy = dy.clone()
    if case == "nan-x":
        x[1, 3] = NAN
    elif case == "inf-x":
        x[0, 0] = INF
    elif case == "-inf-residual":
        res[2, -1] = -INF
    elif case == "nan-residual":
        res[0, 5] = NAN
    elif case == "nan-bias":
        b[4] = NAN
    elif case == "nan-weight":
        w[2] = NAN
    elif case == "inf-weight":
        w[-1] = INF
    elif case == "nan-ln_bias":
        lb[1] = NAN
    elif case == "nan-dy":
        dy[1, 6] = NAN
    else:
        raise ValueError(case)
    return [x, b, res, w, lb], dy


CASES = ["nan-x", "inf-x", "-inf-residual", "nan-residual", "nan-bias", "nan-weight", "inf-weight", "nan-ln_bias",
         "nan-dy"]


def _check_nonfinite(inputs, dy, dtype, backend, p=0.0, seed=None, exact_nan=True, eps=1e-12):
    kw = dict(eps=eps, dropout_p=p, seed=seed)
    fast_y, fast_g = run(bias_dropout_add_layernorm, inputs, dy, backend=backend, **kw)
    ref_y, ref_g = run(bias_dropout_add_layernorm_ref, inputs, dy, cast=torch.float64, **kw)
    low_y, low_g = run(bias_dropout_add_layernorm_ref, inputs, dy, cast=torch.float32, **kw)
    for name, f, r, lo in [("y", fast_y, ref_y, low_y)] + [(f"d{k}", fast_g[k], ref_g[k], low_g[k]) for k in fast_g]:
        f, r = f.double(), r.double()
        if exact_nan:
            assert torch.equal(f.isnan(), r.isnan()), \
                f"{name}: NaN at {f.isnan().nonzero().tolist()}, reference at {r.isnan().nonzero().tolist()}"
            assert torch.equal(f.isinf(), r.isinf()) and torch.equal(f[f.isinf()], r[r.isinf()]), name
        else:  # inf in: whether an entry is inf or NaN depends on the order of inf - inf in the formula
            assert torch.equal(torch.isfinite(f), torch.isfinite(r)), \
                f"{name}: non-finite at {(~torch.isfinite(f)).nonzero().tolist()}, reference at " \
                f"{(~torch.isfinite(r)).nonzero().tolist()}"
        fin = torch.isfinite(r)
        if fin.any():
            assert_within_torch_error(f[fin], r[fin], lo.to(dtype).double()[fin], dtype=dtype, name=name)
    return fast_y, fast_g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_nonfinite_input_gives_the_references_nan(case, dtype, backend):
    inputs, dy = make_inputs((4, 24), dtype, _dev(backend))
    inputs, dy = _poison(inputs, dy, case)
    y, g = _check_nonfinite(inputs, dy, dtype, backend, exact_nan="inf" not in case)
    assert not (torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g.values())), "poisons nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_input_with_dropout(backend):
    """Dropout multiplies (NaN * 0 is NaN, as the reference's mask product): a dropped NaN still poisons its row."""
    inputs, dy = make_inputs((6, 40), torch.float32, _dev(backend))
    inputs[0][:, 7] = NAN  # in every row: dropped in some, kept in others
    seed = torch.tensor([5], device=_dev(backend))
    y, g = _check_nonfinite(inputs, dy, torch.float32, backend, p=0.5, seed=seed)
    assert y.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.1, 10.0, -3.0e4, 1.0e-20])
@pytest.mark.parametrize("n", [1, 7, 768, 5000])
def test_constant_rows_give_ln_bias(value, n, dtype, backend):
    """A row of one value has variance 0: y = ln_bias exactly (PyTorch's fp32 LayerNorm gives exactly that),
    and the gradients are right; a second row is ordinary. eps = 1e-12 (BERT's); the gradients of a constant
    row are 1 / sqrt(eps) = 1e6 times dy, beyond fp16, so fp16 checks them with eps = 1e-5."""
    inputs, dy = make_inputs((3, n), dtype, _dev(backend), bias=False)
    inputs[0][0] = value
    inputs[2][0] = 0.0
    inputs[0][2] = value
    inputs[2][2] = torch.tensor(value, dtype=dtype) * 0.5  # z = 1.5 * value (rounded), still one value per row
    y = bias_dropout_add_layernorm(*inputs, backend=backend)
    lb = inputs[4].to(dtype)
    assert torch.equal(y[0], lb) and torch.equal(y[2], lb)
    if dtype != torch.float16:
        check_against_reference(inputs, dy, dtype, backend, 0.0, None)
        return
    y, g = _check_nonfinite(inputs, dy, dtype, backend, eps=1e-5)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1e18, 1e19, 1e25, 1e30])
def test_huge_values_stay_finite(scale, dtype, backend):
    """|z| ~ 1e18..1e19: the squared deviations of a row sum beyond fp32 (PyTorch's fp32 LayerNorm returns
    ln_bias there), but mean(d * (d / N)) does not: y is the float64 reference's to fp32 rounding. |z| ~ 1e25
    and more: even one d^2 / N overflows, rstd = 0 and y = ln_bias exactly (PyTorch's is NaN at 1e25).
    Never NaN; the gradients are finite."""
    inputs, dy = make_inputs((5, 768), dtype, _dev(backend), scale=scale)
    y, g = run(bias_dropout_add_layernorm, inputs, dy, backend=backend)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g.values())
    if scale < 1e20:
        ref = bias_dropout_add_layernorm_ref(*[None if t is None else t.double() for t in inputs], eps=1e-12)
        assert_within_torch_error(y, ref, ref.to(dtype), dtype=dtype, name="y")
    else:
        assert torch.equal(y, inputs[4].to(dtype).expand_as(y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_sum_beyond_its_range(backend):
    """z is stored in fp16: x + residual = 8e4 is inf there, as in PyTorch's fp16 addition, and only that row
    is NaN (y and gradients), as PyTorch's LayerNorm of the fp16 sum gives; an fp32 residual promotes the op
    to fp32 and the same values are finite and right."""
    dev = _dev(backend)
    inputs, dy = make_inputs((3, 64), torch.float16, dev, bias=False)
    inputs[0][1, 5] = 4.0e4
    inputs[2][1, 5] = 4.0e4
    y, g = run(bias_dropout_add_layernorm, inputs, dy, backend=backend)
    z16 = inputs[0] + inputs[2]  # PyTorch's fp16 addition
    ref_y, ref_g = run(lambda x, b, r, w, lb: F.layer_norm(x + r, (64,), w, lb, 1e-12), inputs, dy,
                       cast=None)
    assert z16[1, 5] == INF
    assert torch.equal(y.isnan(), ref_y.isnan()) and y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()
    for k in ("x", "residual"):
        assert torch.equal(g[k].isnan(), ref_g[k].isnan()) and torch.isfinite(g[k][[0, 2]]).all()
    mixed = [inputs[0], None, inputs[2].float(), inputs[3], inputs[4]]  # fp16 x, fp32 residual: fp32 math
    y32, _ = run(bias_dropout_add_layernorm, mixed, dy, backend=backend)
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    fp32 = [inputs[0].float(), None, inputs[2].float(), inputs[3], inputs[4]]
    assert torch.equal(y32, bias_dropout_add_layernorm(*fp32, backend=backend))
    check_against_reference(fp32, dy.float(), torch.float32, backend, 0.0, None)


@pytest.mark.parametrize("eps", [1e-39, 1e-50, 5e-324, 1e39])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eps_that_float32_cannot_hold_is_rejected(eps, dtype):
    x = torch.randn(2, 8, dtype=dtype)
    w, lb = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"bias_dropout_add_layernorm: eps .*float32"):
        bias_dropout_add_layernorm(x, None, x, w, lb, eps=eps)


def test_eps_at_the_float32_limits_and_float64():
    x = torch.full((2, 8), 3.0)
    w, lb = torch.ones(8), torch.randn(8)
    tiny = torch.finfo(torch.float32).tiny  # the smallest normal float32: accepted
    y = bias_dropout_add_layernorm(x, None, x, w, lb, eps=tiny, backend="torch")
    assert torch.equal(y, lb.expand(2, 8))
    # float64 inputs run the reference in float64, where 1e-50 is an ordinary eps
    y64 = bias_dropout_add_layernorm(x.double(), None, x.double(), w, lb, eps=1e-50)
    assert torch.equal(y64, lb.double().expand(2, 8))


@pytest.mark.gpu
@pytest.mark.extension
def test_cuda_op_rejects_eps_below_float32():
    x = torch.randn(4, 8, device="cuda")
    w, lb = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    for eps in (1e-39, 1e39):
        with pytest.raises(RuntimeError, match="eps must be a normal float32"):
            torch.ops.blipfast_C.ln_epilogue_fwd(x, None, x, w, lb, None, eps, 0.0)
