"""itc_loss with NaN and +-inf inputs: every backend gives what PyTorch's reference gives.

NaN in must give NaN out, with no NaN of the kernel's own making and no clean loss from poisoned input:
- NaN in features or temp: the loss, s_i2t, s_t2i and every gradient are NaN exactly where the float64
  reference (itc_loss_ref, autograd) has NaN, and finite values agree with it by the tolerance rule
  (docs/design.md#the-tolerance-rule);
- +-inf in features: s_i2t / s_t2i equal the reference's (the same +-inf and NaN), the loss too (NaN or
  +inf), and the gradient of a row (a local image's [Q, E], a text's [E]) is non-finite exactly when the
  reference's is (which entries of such a row are inf rather than NaN depends on the order in which a
  matrix product adds inf * 0, so rows are compared, not entries); d temp equals the reference's.
Backends: "torch" (the custom op's PyTorch path, the CPU default) and "triton" (under the interpreter on
CPU, where numpy's IEEE warnings are silenced but any other warning, e.g. the "All-NaN slice" of a NaN
reduction, is an error). temp <= 0, inf or NaN is rejected by the public ops (tests/ops/test_validation.py),
so NaN temp reaches the kernels through the custom op directly, as it does on CUDA where the check is an
asynchronous device assert that fires after the kernels have run.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from blipfast.ops import itc_loss_from_gathered, itc_loss_ref
from blipfast.ops.itc_loss import positive_mask
from tests.helpers.runtime import HAS_CUDA
from tests.helpers.tolerance import assert_within_torch_error

DEV = "cuda" if HAS_CUDA else "cpu"
NAN, INF = float("nan"), float("inf")
NAMES = ("loss", "s_i2t", "s_t2i", "d image_feats", "d text_feats", "d temp")


@contextlib.contextmanager
def _strict_warnings(backend, ieee=True):
    """For the interpreter every warning is an error (the "All-NaN slice" of a NaN reduction was one, and so is
    an invalid operation, a division by 0 or an overflow; exp's underflow to 0 is intended) except, with
    ``ieee``, numpy's floating-point ones: inf in must make NaN (inf - inf, 0 * inf), NaN in need not."""
    if backend != "triton" or HAS_CUDA:
        yield
        return
    import numpy as np

    modes = dict(all="ignore") if ieee else dict(invalid="warn", divide="warn", over="warn", under="ignore")
    with warnings.catch_warnings(), np.errstate(**modes):
        warnings.simplefilter("error")
        yield


def _poison(img_all, txt_all, temp, case):
    """NaN/inf in the gathered features of a world of 2 x 3 rows (rank 1 holds rows 3, 4, 5) or in temp."""
    img_all, txt_all, temp = img_all.clone(), txt_all.clone(), temp.clone()
    if case == "nan-element":
        img_all[1, 2, 3] = NAN
    elif case == "nan-query":
        img_all[5, 1] = NAN
    elif case == "nan-image":  # every query of one image
        img_all[0] = NAN
    elif case == "nan-text":
        txt_all[1, 0] = NAN
    elif case == "nan-everywhere":
        img_all[1] = NAN
        txt_all[:, 2] = NAN
    elif case == "+inf-text":
        txt_all[1, 3] = INF
    elif case == "-inf-text":
        txt_all[5, 0] = -INF
    elif case == "+inf-image":  # in a local image, against texts positive there
        txt_all[:, 1] = txt_all[:, 1].abs() + 0.1
        img_all[4, 4, 1] = INF
    elif case == "-inf-image":
        # a query that is never any text's arg-max: the loss stays finite, but the gradient of every text
        # is NaN where the product with the query gradient adds 0 * -inf (autograd's matmul does)
        txt_all[:, 1] = txt_all[:, 1].abs() + 0.1
        img_all[4, 4, 1] = -INF
    elif case == "-inf-logits":
        # a gathered text (not a local row) whose dot with every query is -inf: a column of -inf in s_i2t
        # and nothing else non-finite (an all -inf tile in the online log-sum-exp)
        img_all[..., 0] = img_all[..., 0].abs() + 0.1
        txt_all[0, 0] = -INF
    elif case == "nan-temp":
        temp.fill_(NAN)
    else:
        raise ValueError(case)
    return img_all, txt_all, temp


def _run(img_all, txt_all, temp, rank, b, ls, backend, dtype):
    """(loss, s_i2t, s_t2i, d img, d txt, d temp) of rank ``rank`` (B local rows) on ``backend``; "ref" is
    itc_loss_ref's formula under autograd (with the gathered copies as constants)."""
    img_all, txt_all = img_all.to(dtype), txt_all.to(dtype)
    img = img_all[rank * b:(rank + 1) * b].clone().requires_grad_()
    txt = txt_all[rank * b:(rank + 1) * b].clone().requires_grad_()
    t = temp.to(dtype).clone().requires_grad_()
    if backend == "ref":
        s1 = torch.einsum("bqe,je->bjq", img, txt_all).max(-1).values / t
        s2 = torch.einsum("be,jqe->bjq", txt, img_all).max(-1).values / t
        pos = positive_mask(b, img_all.shape[0], rank * b, device=img.device).to(dtype)
        tgt = (1 - ls) * pos / pos.sum(1, keepdim=True) + ls / pos.shape[1]
        loss = -((torch.log_softmax(s1, 1) * tgt).sum(1).mean() + (torch.log_softmax(s2, 1) * tgt).sum(1).mean()) / 2
    elif temp.isnan().any():  # the public op rejects it: the custom op, as the CUDA path runs it
        pos = positive_mask(b, img_all.shape[0], rank * b, device=img.device)
        loss, s1, s2 = torch.ops.blipfast.itc_loss_fwd(img, txt, img_all, txt_all, t, pos, ls, backend)[:3]
    else:
        loss, s1, s2 = itc_loss_from_gathered(img, txt, img_all, txt_all, t, rank=rank, label_smoothing=ls,
                                              return_logits=True, backend=backend)
    grads = torch.autograd.grad(loss, [img, txt, t])
    return tuple(x.detach() for x in (loss, s1, s2) + grads)


def _rows_nonfinite(g):
    return ~torch.isfinite(g).reshape(g.shape[0], -1).all(1) if g.dim() else ~torch.isfinite(g)


def _compare(fast, ref, low, has_inf):
    for i, (name, f, r, lo) in enumerate(zip(NAMES, fast, ref, low)):
        f, r = f.double(), r.double()
        where = f"{name}: fast non-finite at {(~torch.isfinite(f)).nonzero().tolist()}, reference at " \
                f"{(~torch.isfinite(r)).nonzero().tolist()}"
        if has_inf and i in (3, 4):  # feature gradients of inf inputs: which rows are poisoned
            assert torch.equal(_rows_nonfinite(f), _rows_nonfinite(r)), where
        else:
            assert torch.equal(f.isnan(), r.isnan()), where
            assert torch.equal(f.isinf(), r.isinf()) and torch.equal(f[f.isinf()], r[r.isinf()]), where
        fin = torch.isfinite(r) & torch.isfinite(f)
        if fin.any():
            assert_within_torch_error(f[fin], r[fin], lo.double()[fin], dtype=torch.float32, name=name)


CASES = ["nan-element", "nan-query", "nan-image", "nan-text", "nan-everywhere", "+inf-text", "-inf-text",
         "+inf-image", "-inf-image", "-inf-logits", "nan-temp"]


@pytest.mark.parametrize("ls", [0.1, 0.0])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_itc_nonfinite_inputs_match_reference(case, backend, ls):
    world, b, q, e = 2, 3, 5, 24
    img_all = F.normalize(torch.randn(world * b, q, e, device=DEV, dtype=torch.float64), dim=-1)
    txt_all = F.normalize(torch.randn(world * b, e, device=DEV, dtype=torch.float64), dim=-1)
    temp = torch.tensor(0.07, device=DEV, dtype=torch.float64)
    img_all, txt_all, temp = _poison(img_all, txt_all, temp, case)
    rank = 1
    ref = _run(img_all, txt_all, temp, rank, b, ls, "ref", torch.float64)
    low = _run(img_all, txt_all, temp, rank, b, ls, "ref", torch.float32)
    with _strict_warnings(backend, ieee="inf" in case):
        fast = _run(img_all, txt_all, temp, rank, b, ls, backend, torch.float32)
    assert not all(torch.isfinite(r).all() for r in ref), "the case poisons nothing"
    _compare(fast, ref, low, has_inf="inf" in case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_itc_one_nan_image_leaves_other_images_gradients_finite(backend):
    """NaN in image 0 poisons the loss, every text gradient and image 0's arg-max query, but the gradient
    of another local image stays finite, and image 0's other queries get exactly 0 (as autograd gives)."""
    b, q, e = 4, 3, 16
    img = F.normalize(torch.randn(b, q, e, device=DEV), dim=-1)
    txt = F.normalize(torch.randn(b, e, device=DEV), dim=-1)
    img[0, 1] = NAN
    with _strict_warnings(backend, ieee=False):
        loss, _, _, gi, gt, gtemp = _run(img, txt, torch.tensor(0.07, device=DEV), 0, b, 0.1, backend, torch.float32)
    assert loss.isnan() and gtemp.isnan() and gt.isnan().all()
    assert gi[0, 1].isnan().all() and (gi[0, [0, 2]] == 0).all()
    assert torch.isfinite(gi[1:]).all() and (gi[1:] != 0).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_itc_huge_finite_logits_stay_finite(backend):
    """Finite inputs never give a non-finite result: logits of 1e5 (temp 1e-5) overflow nothing."""
    b, q, e = 3, 4, 16
    img = F.normalize(torch.randn(b, q, e, device=DEV), dim=-1)
    txt = F.normalize(torch.randn(b, e, device=DEV), dim=-1)
    with _strict_warnings(backend, ieee=False):
        out = _run(img, txt, torch.tensor(1e-5, device=DEV), 0, b, 0.1, backend, torch.float32)
    for name, x in zip(NAMES, out):
        assert torch.isfinite(x).all(), name


@pytest.mark.parametrize("programs", [256, 1], ids=["tile-per-chunk", "one-program"])
def test_itc_triton_tile_of_only_minus_inf(programs, monkeypatch):
    """A whole column tile of -inf logits (128 gathered texts at -inf against every query, the other
    texts finite): the online log-sum-exp must add exp(-inf) = 0 for it, not exp(-inf - -inf) = NaN. The
    loss is +inf (label smoothing gives those columns weight), d temp -inf, d text_feats finite."""
    from blipfast.kernels import itc as kern

    monkeypatch.setattr(kern, "_TARGET_PROGRAMS", programs)
    world, b, q, e = 128, 2, 3, 16
    img_all = F.normalize(torch.randn(world * b, q, e, device=DEV, dtype=torch.float64), dim=-1)
    txt_all = F.normalize(torch.randn(world * b, e, device=DEV, dtype=torch.float64), dim=-1)
    img_all[..., 0] = img_all[..., 0].abs() + 0.1
    txt_all[:128, 0] = -INF
    assert kern._fwd_cfg(b, world * b, q, e)["bj_i"] == 128
    rank = world - 1
    temp = torch.tensor(0.07, device=DEV, dtype=torch.float64)
    ref = _run(img_all, txt_all, temp, rank, b, 0.1, "ref", torch.float64)
    low = _run(img_all, txt_all, temp, rank, b, 0.1, "ref", torch.float32)
    with _strict_warnings("triton"):
        fast = _run(img_all, txt_all, temp, rank, b, 0.1, "triton", torch.float32)
    assert ref[0] == INF and ref[5] == -INF and torch.isfinite(ref[4]).all()
    _compare(fast, ref, low, has_inf=True)


# ----------------------------------------------------------------------------------------------
# temp must be finite and > 0 where it is validated (the public ops)

BAD_TEMPS = [0.0, -0.0, -0.07, INF, -INF, NAN]


@pytest.mark.parametrize("value", BAD_TEMPS, ids=str)
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0d", "1elem"])
def test_itc_rejects_temp_that_is_not_finite_and_positive(value, shape):
    from blipfast.ops import itc_loss

    img, txt = torch.randn(3, 4, 8), torch.randn(3, 8)
    temp = torch.full(shape, value, requires_grad=True)
    with pytest.raises(ValueError, match=r"itc_loss: temp must be finite and > 0"):
        itc_loss(img, txt, temp)
    with pytest.raises(ValueError, match=r"itc_loss: temp must be finite and > 0"):
        itc_loss_from_gathered(img, txt, torch.randn(6, 4, 8), torch.randn(6, 8), temp, rank=1)
    ok = torch.full(shape, 1e-7, dtype=torch.float16)  # a subnormal, still > 0: accepted
    assert 0 < float(ok) < 1e-6
    assert torch.isfinite(itc_loss(img.half(), txt.half(), ok, backend="torch"))


def test_itc_temp_check_compiles_without_graph_break_and_is_asynchronous():
    """Under torch.compile(fullgraph=True) the check is torch._assert_async (no bool() of a tensor, no graph
    break); it still fires, naming temp. (On CUDA the same assert runs on the device: test_itc_temp_check_cuda.)"""
    from blipfast.ops import itc_loss

    torch._dynamo.reset()
    fn = torch.compile(lambda i, t, temp: itc_loss(i, t, temp, backend="torch"), fullgraph=True, backend="aot_eager")
    img, txt = F.normalize(torch.randn(3, 4, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    good = fn(img, txt, torch.tensor(0.07))
    assert torch.allclose(good, itc_loss_ref(img, txt, torch.tensor(0.07)))
    for value in (-0.07, NAN):
        with pytest.raises(RuntimeError, match=r"itc_loss: temp must be finite and > 0"):
            fn(img, txt, torch.tensor(value))


_CUDA_TEMP_CHILD = r"""
import sys, torch
from blipfast.ops import itc_loss
img = torch.nn.functional.normalize(torch.randn(4, 8, 16, device="cuda"), dim=-1)
txt = torch.nn.functional.normalize(torch.randn(4, 16, device="cuda"), dim=-1)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
loss = itc_loss(img, txt, torch.tensor(0.07, device="cuda"))  # a valid temp: no host sync
loss_bad = itc_loss(img, txt, torch.tensor(float(sys.argv[1]), device="cuda"))  # queued, no sync either
torch.cuda.set_sync_debug_mode("default")
print("QUEUED", flush=True)
try:
    torch.cuda.synchronize()
except RuntimeError as e:
    print("ASSERTED", str(e).splitlines()[0], flush=True)
    sys.exit(3)
print("NOT ASSERTED", flush=True)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("value", [-0.07, NAN, 0.0])
def test_itc_temp_check_cuda(value):
    """On CUDA a bad temp is a device-side assert (a fresh process: it ends the CUDA context), and neither a
    good nor a bad temp makes itc_loss synchronise with the host."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CUDA_TEMP_CHILD, repr(value)], capture_output=True, text=True,
                          timeout=300)
    assert "QUEUED" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0 and "NOT ASSERTED" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
