"""The fused Triton ITC loss (kernels/itc.py) against the PyTorch reference.

CPU (CI): the kernels run under TRITON_INTERPRET=1 (set by conftest before the kernel module loads);
fp32 against the float64 ground truth with the tolerance rule (docs/design.md#the-tolerance-rule), for the loss, both
logit matrices and the gradients of image features, text features and the temperature. The same launches
are also compiled for sm_90 (H100) with Triton's own compiler, which needs no GPU, so a kernel that
only the GPU lowering rejects fails here too. GPU (`pytest -m gpu`): bf16/fp16/fp32 on CUDA, the
benchmark shape, torch.compile.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blipfast.ops import itc_loss, itc_loss_from_gathered
from tests.helpers.itc import NAMES, _check_against_reference, _inputs, _run, check_public_op
from tests.helpers.runtime import DEV, ROOT
from tests.helpers.tolerance import assert_close, assert_within_rounding


# ----------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: fp32 against the float64 ground truth

CASES = [
    # B, W, Q, E, label_smoothing, image_ids
    (1, 1, 32, 16, 0.1, False),  # B*W = 1: loss 0, gradients 0
    (3, 1, 5, 24, 0.1, False),
    (3, 4, 7, 40, 0.0, True),  # awkward Q and E, no smoothing, shared image ids
    (3, 3, 2, 16, 0.3, True),
    (64, 1, 8, 32, 0.1, False),
    (64, 8, 8, 32, 0.1, True),  # BW = 512
    (16, 32, 3, 20, 0.0, False),  # BW = 512, few rows
]


@pytest.mark.parametrize("b,world,q,e,ls,ids", CASES)
def test_itc_triton_fp32(b, world, q, e, ls, ids):
    _check_against_reference(b, world, q, e, ls, ids, torch.float32, DEV)


def test_itc_triton_large_logits():
    """Unnormalised features and a small temperature: logits in the thousands, online LSE must not overflow."""
    _check_against_reference(5, 3, 4, 16, 0.1, False, torch.float32, DEV, scale=3.0, normalize=False)


def test_itc_triton_large_logits_gradients():
    """Large logits whose largest values tie in every row (the softmax mass is split, not one-hot): every
    gradient within PyTorch's fp32 error (an lse rounded at the logits' magnitude fails it by hundreds of units)."""
    _check_against_reference(6, 3, 4, 16, 0.1, False, torch.float32, DEV, scale=3.0, normalize=False, ties=True)


def test_itc_triton_multi_chunk(monkeypatch):
    """Few programs: every program walks several column tiles, the row partials of several chunks are
    merged, and d text_feats is accumulated by several programs."""
    from blipfast.kernels import itc as kern

    monkeypatch.setattr(kern, "_TARGET_PROGRAMS", 2)
    b, bw, q, e = 5, 400, 3, 24
    fc = kern._fwd_cfg(b, bw, q, e)
    for bb, bj in ((fc["bb_i"], fc["bj_i"]), (fc["bb_t"], fc["bj_t"])):
        steps, chunks = kern._chunks(-(-b // bb), bw, bj)
        assert steps > 1 and chunks > 1  # the case exercises what it claims to
    _check_against_reference(b, bw // b, q, e, 0.1, True, torch.float32, DEV)


def test_itc_public_op_single_process():
    """ops.itc_loss (no process group) on the triton backend: loss, logits and gradients within PyTorch's
    fp32 error of the float64 reference (image ids with repeats)."""
    check_public_op(6, 4, 16, DEV)


def test_itc_torch_custom_op_float64():
    """The custom op's torch path (the CPU fallback: saved lse / positives / d loss/d temp) equals the
    autograd of the plain reference in float64."""
    img_all, txt_all, ids_all, temp = _inputs(4, 3, 5, 12, torch.float64, "cpu", ids=True)
    a = _run(img_all, txt_all, ids_all, temp, 1, 4, torch.float64, "torch", 0.1, 1.3)
    img = img_all[4:8].clone().requires_grad_()
    txt = txt_all[4:8].clone().requires_grad_()
    t = temp.clone().requires_grad_()
    # the plain reference (einsum + log_softmax, autograd) with the gathered copies as constants
    s1 = torch.einsum("bqe,je->bjq", img, txt_all).max(-1).values / t
    s2 = torch.einsum("be,jqe->bjq", txt, img_all).max(-1).values / t
    pos = ids_all[4:8].view(-1, 1) == ids_all.view(1, -1)
    tgt = 0.9 * pos.double() / pos.sum(1, keepdim=True) + 0.1 / 12
    loss = -((torch.log_softmax(s1, 1) * tgt).sum(1).mean() + (torch.log_softmax(s2, 1) * tgt).sum(1).mean()) / 2
    r = (loss, s1, s2) + torch.autograd.grad(loss * 1.3, [img, txt, t])
    for name, x, y in zip(NAMES, a, r):
        assert_close(x.detach(), y.detach(), dtype=torch.float64, name=name)


def test_itc_fake_matches_triton_outputs():
    """The registered fake (what torch.compile sees) has the dtypes and shapes the Triton kernels return."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blipfast.kernels import itc as kern

    b, q, e, bw = 3, 5, 16, 6
    img_all, txt_all, _, temp = _inputs(b, 2, q, e, torch.float32, DEV)
    pos = torch.zeros(b, bw, dtype=torch.bool, device=DEV)
    pos[torch.arange(b), torch.arange(b) + 3] = True
    args = (img_all[3:].contiguous(), txt_all[3:].contiguous(), img_all, txt_all, temp, pos)
    real = kern.itc_loss_fwd(*args, 0.1)
    with FakeTensorMode() as mode:
        fake = torch.ops.blipfast.itc_loss_fwd(*(mode.from_tensor(t) for t in args), 0.1, "triton")
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert r.dtype == f.dtype and tuple(r.shape) == tuple(f.shape)


def test_itc_validation_messages():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="text_feats"):
        itc_loss(x, torch.randn(3, 4), torch.tensor(0.07))
    with pytest.raises(TypeError, match="text_feats"):
        itc_loss(x, torch.randn(2, 4, dtype=torch.float64), torch.tensor(0.07))
    with pytest.raises(ValueError, match="rank"):
        itc_loss_from_gathered(x, torch.randn(2, 4), torch.randn(4, 3, 4), torch.randn(4, 4), torch.tensor(0.07),
                               rank=2)
    with pytest.raises(ValueError, match="image_ids_all"):
        itc_loss_from_gathered(x, torch.randn(2, 4), torch.randn(4, 3, 4), torch.randn(4, 4), torch.tensor(0.07),
                               image_ids=torch.arange(2))


# ----------------------------------------------------------------------------------------------
# the same launches compiled for the H100 (sm_90) by Triton's compiler: no GPU needed

_TRITON_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
              torch.int32: "i32", torch.int64: "i64"}


def _record_launches(b, bw, q, e, dtype):
    """The kernel launches of one forward + backward, recorded (not run) on meta tensors."""
    from blipfast.kernels import itc as kern

    launches = []
    saved = kern._launch
    kern._launch = lambda k, grid, *a, num_warps=4, **c: launches.append((k, a, c, num_warps))
    try:
        meta = dict(device="meta", dtype=dtype)
        img, txt = torch.empty(b, q, e, **meta), torch.empty(b, e, **meta)
        img_all, txt_all = torch.empty(bw, q, e, **meta), torch.empty(bw, e, **meta)
        temp = torch.empty((), device="meta")
        pos = torch.empty(b, bw, device="meta", dtype=torch.bool)
        out = kern.itc_loss_fwd(img, txt, img_all, txt_all, temp, pos, 0.1)
        kern.itc_loss_bwd(torch.empty((), device="meta"), img, txt, img_all, txt_all, temp, pos, *out[1:], 0.1)
    finally:
        kern._launch = saved
    return launches


def _compile_sm90(kernel, args, constexprs, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    runtime = iter(args)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        a = next(runtime)
        if isinstance(a, torch.Tensor):
            sig[n] = "*" + _TRITON_TY[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(a, float):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]  # as the JIT specialises such ints
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps})


def compile_all_for_sm90(shapes) -> list[str]:
    """Compile every launch of forward + backward for each (B, BW, Q, E, dtype name); returns the kernels.
    Must run in a process where TRITON_INTERPRET is off (the interpreter patches triton.language)."""
    done = []
    for b, bw, q, e, dt in shapes:
        for kernel, args, constexprs, num_warps in _record_launches(b, bw, q, e, getattr(torch, dt)):
            compiled = _compile_sm90(kernel, args, constexprs, num_warps)
            assert compiled.asm.get("cubin"), kernel.fn.__name__
            done.append(f"{kernel.fn.__name__}[{b},{bw},{q},{e},{dt}]")
    return done


SM90_SHAPES = [(128, 8192, 32, 256, "bfloat16"), (3, 40, 5, 40, "float32")]


def test_itc_kernels_compile_for_sm90():
    """Triton's compiler lowers every launch (benchmark shape in bf16, awkward shapes, fp16/fp32 dots) to an
    sm_90 cubin: wgmma layouts, reshapes, reductions and register allocation pass without a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its CUDA backend")
    root = str(ROOT)
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = ("import json, tests.kernels.test_itc as t; "
            f"print(json.dumps(t.compile_all_for_sm90({SM90_SHAPES!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(done) == 6 * len(SM90_SHAPES), done


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,world,q,e,ls,ids", [(128, 8, 32, 256, 0.1, False), (3, 5, 7, 40, 0.1, True),
                                                (1, 1, 32, 256, 0.1, False), (64, 16, 32, 256, 0.0, True)])
def test_itc_triton_gpu(dtype, b, world, q, e, ls, ids):
    _check_against_reference(b, world, q, e, ls, ids, dtype, "cuda")


@pytest.mark.gpu
def test_itc_triton_gpu_compile_fullgraph():
    """torch.compile(fullgraph=True) through the custom ops gives the eager result: the same kernels on the
    same inputs, so the loss, logits and d image_feats bit for bit; d text_feats sums fp32 atomics in a
    run-dependent order before its rounding to bf16, so each element may round one unit apart."""
    img_all, txt_all, _, temp = _inputs(32, 4, 32, 256, torch.bfloat16, "cuda")
    img = img_all[:32].clone().requires_grad_()
    txt = txt_all[:32].clone().requires_grad_()

    def step(x, y, xa, ya, t):
        loss, s1, s2 = itc_loss_from_gathered(x, y, xa, ya, t, return_logits=True)
        return loss, s1, s2

    eager = step(img, txt, img_all, txt_all, temp)
    g_eager = torch.autograd.grad(eager[0], [img, txt])
    comp = torch.compile(step, fullgraph=True)(img, txt, img_all, txt_all, temp)
    g_comp = torch.autograd.grad(comp[0], [img, txt])
    for name, a, b in zip(NAMES, eager, comp):
        assert torch.equal(a, b), name
    assert torch.equal(g_comp[0], g_eager[0]), "d image_feats"
    assert_within_rounding(g_comp[1], g_eager[1], name="d text_feats")


@pytest.mark.gpu
def test_itc_triton_gpu_memory_is_linear():
    """No [B, BW, Q] tensor: the forward + backward allocate O(B * BW) beyond inputs and outputs."""
    b, bw, q, e = 128, 8192, 32, 256
    img_all, txt_all, _, temp = _inputs(b, bw // b, q, e, torch.bfloat16, "cuda")
    img = img_all[:b].clone().requires_grad_()
    txt = txt_all[:b].clone().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = itc_loss_from_gathered(img, txt, img_all, txt_all, temp)
    torch.autograd.grad(loss, [img, txt])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    per_pair = extra / (b * bw)
    assert per_pair < 24, f"{extra / 2**20:.1f} MiB = {per_pair:.1f} bytes per (row, column); a [B, BW, Q] " \
                          f"bf16 tensor alone would be {2 * q} bytes per pair"
    assert math.isfinite(float(loss))
