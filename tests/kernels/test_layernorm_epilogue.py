"""bias_dropout_add_layernorm: y = LayerNorm(dropout(x + bias) + residual).

CPU (always): the torch backend of the custom op against the pure reference and float64 ground truth
(the tolerance rule, docs/design.md#the-tolerance-rule), the Philox dropout mask bit for bit, keep-rate statistics,
every gradient (and gradcheck in float64), awkward shapes, validation, opcheck and torch.compile.
Extension (when blipfast._C is built, on CPU too): op schemas, build_info, and the C++ Philox header
(the CPU implementations of blipfast_C::philox_u32 / philox4_u32) against blipfast/ops/_philox.py.
GPU (``-m gpu``): the CUDA kernels against the reference for fp32/fp16/bf16 on many shapes, identical
masks, determinism, CUDA-graph capture and replay, large inputs, the C++ argument checks.
"""
from __future__ import annotations

import pytest
import torch

from blipfast import _ext
from blipfast.ops import bias_dropout_add_layernorm, bias_dropout_add_layernorm_ref
from blipfast.ops import layernorm_epilogue as LE
from blipfast.ops._philox import philox4_u32, philox_u32
from tests.helpers.layernorm import EXT, NAMES, check_against_reference, check_raw_op, make_inputs, rule_keep, run
from tests.helpers.runtime import HAS_CUDA
from tests.helpers.tolerance import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
fwd_op = torch.ops.blipfast.bias_dropout_add_layernorm_fwd
bwd_op = torch.ops.blipfast.bias_dropout_add_layernorm_bwd


# ----------------------------------------------------------------------------------------------
# CPU: torch backend


# bias together with dropout: test_nd_inputs_match_reference (the Philox stream in torch ops is slow on a CPU)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.1)], ids=["bias", "nobias-drop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("n", [1, 7, 768, 1000])
def test_torch_backend_matches_reference(n, rows, dtype, bias, p):
    inputs, dy = make_inputs((rows, n), dtype, bias=bias)
    check_against_reference(inputs, dy, dtype, "torch", p, torch.tensor([1234567]) if p else None)


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 1, 768), (2, 2, 2, 33)])
def test_nd_inputs_match_reference(shape):
    inputs, dy = make_inputs(shape, torch.float32)
    check_against_reference(inputs, dy, torch.float32, "torch", 0.2, torch.tensor([99]))


def test_mixed_input_dtypes_promote():
    x = torch.randn(4, 16, dtype=torch.float16)
    res = torch.randn(4, 16)
    w, lb = torch.ones(16, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.float64)
    y = bias_dropout_add_layernorm(x, None, res, w, lb, backend="torch")
    assert y.dtype == torch.float32
    ref = bias_dropout_add_layernorm_ref(x.double(), None, res.double(), w.double(), lb, eps=1e-12)
    assert_close(y, ref, dtype=torch.float32)


@pytest.mark.parametrize("n", [100, 7, 3])  # N <= 2: every LayerNorm gradient vanishes
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_the_philox_mask(p, n):
    rows = 37
    x = torch.rand(rows, n) + 0.5  # never 0: z == 0 exactly where dropped
    seed = torch.tensor([2**40 + 12345])
    y, z, stats = fwd_op(x, None, torch.zeros_like(x), torch.ones(n), torch.zeros(n), seed, 1e-5, p, "torch")
    keep = rule_keep(seed, rows, n, p)
    assert torch.equal(z != 0, keep)
    assert_close(z[keep], x[keep] / (1.0 - p), dtype=torch.float32)
    # backward regenerates the very same mask: dx is exactly 0 where the forward dropped (and where dz itself is
    # 0: a row whose only kept element stands among equal zeros has dz = 0 there, likely for small N)
    dx, dres, *_ = bwd_op(torch.randn(rows, n), z, stats, torch.ones(n), seed, p, "torch")
    assert torch.equal(dx == 0, ~keep | (dres == 0))
    assert (dres != 0).float().mean() > 0.5
    assert_close(dx[keep], dres[keep] / (1.0 - p), dtype=torch.float32)
    # the public op with that seed is the reference with that seed (same mask everywhere)
    inputs, _ = make_inputs((rows, n), torch.float32)
    got = bias_dropout_add_layernorm(*inputs, dropout_p=p, seed=seed, backend="torch")
    assert_close(got, bias_dropout_add_layernorm_ref(*inputs, dropout_p=p, seed=seed), dtype=torch.float32)


def test_dropout_keep_rate_and_independence():
    rows, n, p = 256, 1000, 0.1
    x = torch.rand(rows, n) + 0.5
    zeros, ones = torch.zeros_like(x), torch.ones(n)

    def kept(seed):
        return fwd_op(x, None, zeros, ones, torch.zeros(n), torch.tensor([seed]), 1e-5, p, "torch")[1] != 0

    k1, k2 = kept(11), kept(12)
    m = rows * n
    sigma = ((1 - p) * p / m) ** 0.5
    for k in (k1, k2):
        assert abs(k.float().mean().item() - (1 - p)) < 6 * sigma
        # no structure along rows or columns: every column and row keeps about 1 - p
        assert (k.float().mean(0) - (1 - p)).abs().max() < 6 * ((1 - p) * p / rows) ** 0.5
        assert (k.float().mean(1) - (1 - p)).abs().max() < 6 * ((1 - p) * p / n) ** 0.5
    both = (k1 & k2).float().mean().item()  # two seeds: independent masks
    assert abs(both - (1 - p) ** 2) < 6 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / m) ** 0.5
    assert not torch.equal(k1, k2)
    # without a seed every call draws a fresh one
    inputs, _ = make_inputs((8, 64), torch.float32)
    a = bias_dropout_add_layernorm(*inputs, dropout_p=0.5, backend="torch")
    b = bias_dropout_add_layernorm(*inputs, dropout_p=0.5, backend="torch")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("p,bias", [(0.0, True), (0.3, True), (0.3, False)])
def test_gradcheck_float64(p, bias):
    inputs, _ = make_inputs((3, 7), torch.float64, bias=bias)
    inputs = [None if t is None else t.double().requires_grad_(True) for t in inputs]
    seed = torch.tensor([5])

    def f(*args):
        return bias_dropout_add_layernorm(*args, eps=1e-5, dropout_p=p, seed=seed, backend="torch")

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.filterwarnings(r"ignore:var\(\)")
def test_empty_rows():
    inputs, dy = make_inputs((0, 16), torch.float32)
    y, g = run(bias_dropout_add_layernorm, inputs, dy, backend="torch")
    assert y.shape == (0, 16)
    assert torch.equal(g["weight"], torch.zeros(16)) and torch.equal(g["bias"], torch.zeros(16))


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=[1.0]), TypeError, r"\bx must be a torch.Tensor"),
    (dict(residual=torch.randn(3, 9)), ValueError, r"residual must have the shape of x"),
    (dict(weight=torch.randn(9)), ValueError, r"weight must have shape \[8\]"),
    (dict(bias=torch.randn(2, 8)), ValueError, r"\bbias must have shape \[8\]"),
    (dict(ln_bias=torch.ones(8, dtype=torch.int32)), TypeError, r"ln_bias must have dtype"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float"),
    (dict(eps=-1e-5), ValueError, r"eps must be a finite positive float"),
    (dict(seed=torch.tensor([1, 2])), ValueError, r"seed must have exactly one element"),
    (dict(seed=torch.tensor([1.0])), TypeError, r"seed must have dtype"),
    (dict(backend="cuda"), ValueError, r"backend 'cuda' cannot run on a cpu tensor"),
])
def test_validation_names_the_argument(over, exc, match):
    args = dict(x=torch.randn(3, 8), bias=torch.randn(8), residual=torch.randn(3, 8), weight=torch.randn(8),
                ln_bias=torch.randn(8), dropout_p=0.1)
    args.update(over)
    pos = [args.pop(n) for n in NAMES]
    with pytest.raises(exc, match=match):
        bias_dropout_add_layernorm(*pos, **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.25)])
def test_opcheck(dtype, bias, p):
    rows, n = 5, 24
    inputs, dy = make_inputs((rows, n), dtype, bias=bias)
    x, b, res, w, lb = [None if t is None else t.requires_grad_(True) for t in inputs]
    seed = torch.tensor([77]) if p else None
    args = (x, b, res, w, lb, seed, 1e-6, p, "torch")
    torch.library.opcheck(fwd_op, args)
    y, z, stats = fwd_op(*args)
    assert z.dtype == dtype and stats.dtype == torch.float32 and stats.shape == (2, rows)
    torch.library.opcheck(bwd_op, (dy, z.detach(), stats.detach(), w.detach(), seed, p, "torch"))


def test_torch_compile_fullgraph_forward_backward():
    def fn(x, bias, res, w, lb, seed):
        a = bias_dropout_add_layernorm(x, bias, res, w, lb, dropout_p=0.1, seed=seed, backend="torch")
        return bias_dropout_add_layernorm(a, None, res, w, lb, eps=1e-5, backend="torch")

    inputs, dy = make_inputs((2, 3, 40), torch.bfloat16)
    seed = torch.tensor([31])
    torch._dynamo.reset()
    eager_y, eager_g = run(lambda *t: fn(*t, seed), inputs, dy)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    comp_y, comp_g = run(lambda *t: compiled(*t, seed), inputs, dy)
    assert comp_y.dtype == torch.bfloat16
    # the compiled graph calls the same custom ops on the same inputs (the gradient sums between them are
    # the ones eager autograd does, in the same dtype): bit for bit
    assert torch.equal(comp_y, eager_y)
    for name in eager_g:
        assert torch.equal(comp_g[name], eager_g[name]), f"d{name}"


# ----------------------------------------------------------------------------------------------
# the compiled extension (its CPU parts run without a GPU)

# skips without blipfast._C on a machine without a CUDA device, fails with one (require_extension)
needs_ext = pytest.mark.extension

SCHEMAS = {
    "ln_epilogue_fwd": "blipfast_C::ln_epilogue_fwd(Tensor x, Tensor? bias, Tensor residual, Tensor weight, "
                       "Tensor ln_bias, Tensor? seed, float eps, float dropout_p) -> "
                       "(Tensor y, Tensor z, Tensor stats)",
    "ln_epilogue_bwd": "blipfast_C::ln_epilogue_bwd(Tensor dy, Tensor z, Tensor stats, Tensor weight, "
                       "Tensor? seed, float dropout_p) -> "
                       "(Tensor dx, Tensor dresidual, Tensor dweight, Tensor dln_bias, Tensor dbias)",
    "philox_u32": "blipfast_C::philox_u32(Tensor seed, Tensor offsets) -> Tensor",
    "philox4_u32": "blipfast_C::philox4_u32(Tensor seed, Tensor counters) -> Tensor",
}


@needs_ext
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_extension_op_schemas(name):
    assert str(getattr(torch.ops.blipfast_C, name).default._schema) == SCHEMAS[name]


@needs_ext
def test_extension_build_info():
    info = EXT.build_info()
    assert set(SCHEMAS) <= {op.split("::")[1] for op in info["ops"]}
    assert info["torch_compiled"] == torch.__version__.split("+")[0]
    assert info["cuda_archs"] and all(a[:2].isdigit() for a in info["cuda_archs"])
    assert info["cuda_runtime_compiled"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert _ext.build_info()["cuda_archs"] == info["cuda_archs"]


@needs_ext
def test_extension_ln_ops_have_no_cpu_kernel():
    x = torch.randn(2, 8)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.blipfast_C.ln_epilogue_fwd(x, None, x, torch.ones(8), torch.zeros(8), None, 1e-5, 0.0)


def _random_offsets(k):
    lo = torch.randint(0, 2**32, (k,), dtype=torch.int64)
    hi = torch.randint(0, 2**31, (k,), dtype=torch.int64)
    small = torch.arange(k, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**62, 2**63 - 1, -1, -(2**63)], dtype=torch.int64)
    return torch.cat([small, lo, lo + (hi << 32), edges])


@needs_ext
def test_extension_philox_cpu_matches_torch():
    offsets = _random_offsets(4096)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**62 - 1, -1] + torch.randint(-(2**62), 2**62, (8,)).tolist()
    for s in seeds:
        seed = torch.tensor([s], dtype=torch.int64)
        got = torch.ops.blipfast_C.philox_u32(seed, offsets)
        assert got.dtype == torch.int64 and got.shape == offsets.shape
        assert torch.equal(got, philox_u32(seed, offsets)), f"seed {s}"
    # Random123's known answer (counter 0, key 0), and a non-contiguous 2-D offsets tensor
    assert torch.ops.blipfast_C.philox_u32(torch.tensor([0]), torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5
    off2 = offsets[: 64 * 32].view(64, 32).t()
    assert torch.equal(torch.ops.blipfast_C.philox_u32(torch.tensor([9]), off2), philox_u32(torch.tensor([9]), off2))


@needs_ext
def test_extension_philox4_cpu_matches_torch():
    """csrc/philox.cuh's philox4_u32 (the four words dropout uses) on the host, bit for bit."""
    counters = _random_offsets(2048)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**62 - 1, -1] + torch.randint(-(2**62), 2**62, (6,)).tolist()
    for s in seeds:
        seed = torch.tensor([s], dtype=torch.int64)
        got = torch.ops.blipfast_C.philox4_u32(seed, counters)
        assert got.dtype == torch.int64 and got.shape == (*counters.shape, 4)
        assert torch.equal(got, philox4_u32(seed, counters)), f"seed {s}"
        assert torch.equal(got[:, 0], torch.ops.blipfast_C.philox_u32(seed, counters))
    # Random123's known answers with c2 = c3 = 0: counter 0 / key 0, and counter (ffffffff, ffffffff) / key -1
    kat = torch.ops.blipfast_C.philox4_u32(torch.tensor([0]), torch.zeros(1, dtype=torch.int64))
    assert kat[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    from tests.helpers.philox import M32, philox4x32_10
    got = torch.ops.blipfast_C.philox4_u32(torch.tensor([-1]), torch.tensor([-1]))[0].tolist()
    assert tuple(got) == philox4x32_10((M32, M32, 0, 0), (M32, M32))
    # a non-contiguous 2-D counters tensor
    c2 = counters[: 64 * 32].view(64, 32).t()
    assert torch.equal(torch.ops.blipfast_C.philox4_u32(torch.tensor([9]), c2), philox4_u32(torch.tensor([9]), c2))
    assert torch.ops.blipfast_C.philox4_u32(torch.tensor([9]), counters[:0]).shape == (0, 4)


@needs_ext
def test_extension_philox4_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="philox4_u32: seed must have exactly one element"):
        torch.ops.blipfast_C.philox4_u32(torch.tensor([1, 2]), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="counters must be int64"):
        torch.ops.blipfast_C.philox4_u32(torch.tensor([1]), torch.zeros(3, dtype=torch.int32))


@needs_ext
def test_extension_philox_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="seed must have exactly one element"):
        torch.ops.blipfast_C.philox_u32(torch.tensor([1, 2]), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="offsets must be int64"):
        torch.ops.blipfast_C.philox_u32(torch.tensor([1]), torch.zeros(3, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels

gpu = pytest.mark.gpu
needs_cuda_ext = pytest.mark.extension
CUDA_N = [1, 7, 64, 768, 1000, 1408, 2049, 4096]


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.0), (True, 0.1)], ids=["bias", "nobias", "bias-drop"])
@pytest.mark.parametrize("rows", [1, 3, 1000])
@pytest.mark.parametrize("n", CUDA_N)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype, n, rows, bias, p):
    inputs, dy = make_inputs((rows, n), dtype, "cuda", bias=bias)
    check_against_reference(inputs, dy, dtype, "cuda", p, torch.tensor([987654321], device="cuda") if p else None)


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(3, 5000), (300, 6000), (2, 16385), (5, 20000)])
def test_cuda_general_path_matches_reference(dtype, rows, n):
    """N beyond the register paths (backward above 4096, forward above 16384)."""
    inputs, dy = make_inputs((rows, n), dtype, "cuda")
    check_against_reference(inputs, dy, dtype, "cuda", 0.1, torch.tensor([4242], device="cuda"))


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [768, 1024])
def test_cuda_misaligned_inputs_take_the_scalar_path(dtype, n):
    rows = 33
    inputs, dy = make_inputs((rows, n), dtype, "cuda")
    buf = torch.empty(rows * n + 1, dtype=dtype, device="cuda")
    x = buf[1:].view(rows, n)  # contiguous, but 2 or 4 bytes off a 16-byte boundary
    x.copy_(inputs[0])
    assert x.data_ptr() % 16 != 0
    inputs[0] = x
    check_against_reference(inputs, dy, dtype, "cuda", 0.1, torch.tensor([17], device="cuda"))


def test_raw_op_check_runs_on_the_torch_implementation():
    """check_raw_op (the CUDA test below) runs on CPU with the torch implementation standing in for the
    kernel, so the check itself is exercised here; tests/kernels/test_mutations.py shows it rejects wrong kernels."""
    for dtype in DTYPES:
        check_raw_op(LE._fwd_torch, LE._bwd_torch, dtype, 130, "cpu")


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 130, 768, 1408, 2049, 5000, 16385])
def test_cuda_raw_op_matches_torch_implementation(dtype, n):
    check_raw_op(torch.ops.blipfast_C.ln_epilogue_fwd, torch.ops.blipfast_C.ln_epilogue_bwd, dtype, n, "cuda")
    x = torch.randn(3, n, device="cuda").to(dtype)
    w = torch.ones(n, device="cuda")
    y, z, stats = torch.ops.blipfast_C.ln_epilogue_fwd(x, None, x, w, w, None, 1e-5, 0.0)
    got0 = torch.ops.blipfast_C.ln_epilogue_bwd(y, z, stats, w, None, 0.0)
    assert got0[0].numel() == 0 and got0[1].shape == (3, n)


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("n", [768, 5000])
def test_cuda_backward_is_deterministic(n):
    inputs, dy = make_inputs((1000, n), torch.float16, "cuda")
    x, b, res, w, lb = inputs
    seed = torch.tensor([3], device="cuda")
    _, z, stats = torch.ops.blipfast_C.ln_epilogue_fwd(x, b, res, w, lb, seed, 1e-12, 0.1)
    first = torch.ops.blipfast_C.ln_epilogue_bwd(dy, z, stats, w, seed, 0.1)
    for _ in range(3):
        again = torch.ops.blipfast_C.ln_epilogue_bwd(dy, z, stats, w, seed, 0.1)
        for a, c in zip(first, again):
            assert torch.equal(a, c)


@gpu
@needs_cuda_ext
def test_cuda_philox_matches_torch():
    offsets = _random_offsets(1 << 16).cuda()
    for s in [0, 2**32 + 7, -(2**40)] + torch.randint(-(2**62), 2**62, (4,)).tolist():
        seed = torch.tensor([s], device="cuda")
        assert torch.equal(torch.ops.blipfast_C.philox_u32(seed, offsets), philox_u32(seed, offsets)), f"seed {s}"
        assert torch.equal(torch.ops.blipfast_C.philox4_u32(seed, offsets), philox4_u32(seed, offsets)), f"seed {s}"


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("n", [768, 5000])
def test_cuda_graph_capture_and_replay(n):
    rows, p = 256, 0.1
    inputs, dy = make_inputs((rows, n), torch.bfloat16, "cuda")
    x, b, res, w, lb = inputs
    seed = torch.tensor([1], device="cuda")

    def step():
        y, z, stats = torch.ops.blipfast_C.ln_epilogue_fwd(x, b, res, w, lb, seed, 1e-12, p)
        return (y, *torch.ops.blipfast_C.ln_epilogue_bwd(dy, z, stats, w, seed, p))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    # new data and a new seed, written into the captured buffers: the replay reads them on the device
    x.copy_(torch.randn_like(x))
    seed.fill_(2**35 + 11)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, c in zip(static_out, eager):
        assert torch.equal(a, c)
    keep = rule_keep(seed, rows, n, p, "cuda")
    assert torch.equal(static_out[1] == 0, ~keep)  # dx of the replay uses the new seed's mask


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype,scale,offset", [(torch.float16, 100.0, 2e4), (torch.bfloat16, 1e15, 0.0),
                                                (torch.float32, 1e15, 3e15)])
def test_cuda_large_inputs_stay_finite(dtype, scale, offset):
    inputs, dy = make_inputs((1000, 768), dtype, "cuda", scale=scale, offset=offset)
    y, g = run(bias_dropout_add_layernorm, inputs, dy, backend="cuda", dropout_p=0.1,
               seed=torch.tensor([8], device="cuda"))
    assert torch.isfinite(y).all()
    for name, t in g.items():
        assert torch.isfinite(t).all(), name
    check_against_reference(inputs, dy, dtype, "cuda", 0.1, torch.tensor([8], device="cuda"))


@gpu
@needs_cuda_ext
def test_cuda_op_checks_its_arguments():
    x = torch.randn(4, 8, device="cuda")
    w, lb = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    op = torch.ops.blipfast_C.ln_epilogue_fwd
    with pytest.raises(RuntimeError, match="bias must be float32"):
        op(x, torch.ones(8, device="cuda", dtype=torch.float16), x, w, lb, None, 1e-5, 0.0)
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        op(x, None, torch.randn(4, 9, device="cuda"), w, lb, None, 1e-5, 0.0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(8, 4, device="cuda").t(), None, x, w, lb, None, 1e-5, 0.0)
    with pytest.raises(RuntimeError, match="needs a seed"):
        op(x, None, x, w, lb, None, 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="seed must be int64"):
        op(x, None, x, w, lb, torch.tensor([1], device="cuda", dtype=torch.int32), 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(x, None, x, torch.ones(7, device="cuda"), lb, None, 1e-5, 0.0)
    with pytest.raises(RuntimeError, match="stats must have shape"):
        torch.ops.blipfast_C.ln_epilogue_bwd(x, x, torch.zeros(2, 3, device="cuda"), w, None, 0.0)
