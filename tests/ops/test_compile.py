"""The blipfast:: custom ops are well-formed (torch.library.opcheck: schema, fake impl, autograd
registration, AOT dispatch), torch.compile(fullgraph=True) sees through every public op forward and
backward with the eager result, and no op synchronises with the host (meta tensors)."""
from __future__ import annotations

import pytest
import torch

import blipfast.ops as O

F32 = torch.float32
ops = torch.ops.blipfast


def rg(*shape, dtype=F32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# opcheck: forward ops with inputs that need grad (checks the autograd registration), then the backward
# op on the forward's real outputs


def _qa_fwd_args(dropout):
    b, lq, lk, h, d = 2, 5, 7, 2, 8
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[1, 5:] = False
    seed = torch.tensor([1234]) if dropout else None
    return (rg(b, lq, h, d), rg(b, lk, h, d), rg(b, lk, h, d), kpm, seed, 3, "causal", 0.2 if dropout else 0.0,
            d ** -0.5, "torch")


def _ca_fwd_args(dropout):
    n, m, lq, lk, h, d = 3, 2, 4, 6, 2, 8
    kpm = torch.ones(m, lk, dtype=torch.bool)
    kpm[0, 4:] = False
    return (rg(n, lq, h, d), rg(m, lk, h, d), rg(m, lk, h, d), torch.tensor([1, 0, 1]), kpm,
            torch.tensor([99]) if dropout else None, 0.3 if dropout else 0.0, d ** -0.5, "torch")


def _itc_fwd_args(dropout):
    b, q, e = 3, 4, 8
    img = torch.nn.functional.normalize(torch.randn(b, q, e), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b, e), dim=-1).requires_grad_()
    ids = torch.tensor([0, 1, 0])
    pos = ids.view(-1, 1) == ids.view(1, -1)
    return (img, txt, img.detach().clone(), txt.detach().clone(), torch.tensor(0.07, requires_grad=True), pos, 0.1,
            "torch")


def _ln_fwd_args(dropout):
    r, n = 6, 16
    return (rg(r, n), rg(n), rg(r, n), rg(n), rg(n), torch.tensor([5]) if dropout else None, 1e-12,
            0.1 if dropout else 0.0, "torch")


def _qa_bwd_args(fwd_args, out):
    q, k, v, kpm, seed, nq, mode, p, scale, backend = fwd_args
    det = [t.detach() for t in (q, k, v)]
    return (torch.randn_like(out[0]), *det, out[0].detach(), out[1].detach(), kpm, seed, nq, mode, p, scale, backend)


def _ca_bwd_args(fwd_args, out):
    q, k, v, kv_index, kpm, seed, p, scale, backend = fwd_args
    det = [t.detach() for t in (q, k, v)]
    return (torch.randn_like(out[0]), *det, out[0].detach(), out[1].detach(), kv_index, kpm, seed, p, scale, backend)


def _itc_bwd_args(fwd_args, out):
    img, txt, img_all, txt_all, temp, pos, ls, backend = fwd_args
    # the backward takes the forward's saved outputs after the loss, whatever their number
    return (torch.tensor(1.3), img.detach(), txt.detach(), img_all, txt_all, temp.detach(), pos,
            *[o.detach() for o in out[1:]], ls, backend)


def _ln_bwd_args(fwd_args, out):
    x, bias, res, w, lb, seed, eps, p, backend = fwd_args
    y, z, stats = (o.detach() for o in out)
    return (torch.randn_like(y), z, stats, w.detach(), seed, p, backend)


PAIRS = {
    "qformer_attention": (ops.qformer_attention_fwd, ops.qformer_attention_bwd, _qa_fwd_args, _qa_bwd_args),
    "cross_attention": (ops.cross_attention_fwd, ops.cross_attention_bwd, _ca_fwd_args, _ca_bwd_args),
    "itc_loss": (ops.itc_loss_fwd, ops.itc_loss_bwd, _itc_fwd_args, _itc_bwd_args),
    "bias_dropout_add_layernorm": (ops.bias_dropout_add_layernorm_fwd, ops.bias_dropout_add_layernorm_bwd,
                                   _ln_fwd_args, _ln_bwd_args),
}


@pytest.mark.parametrize("name,dropout", [(n, p) for n in PAIRS for p in (False, True) if not (n == "itc_loss" and p)],
                         ids=lambda x: x if isinstance(x, str) else ("dropout" if x else "p0"))
def test_opcheck_forward_and_backward(name, dropout):
    fwd, bwd, make_fwd, make_bwd = PAIRS[name]
    args = make_fwd(dropout)
    torch.library.opcheck(fwd, args)
    out = fwd(*args)
    torch.library.opcheck(bwd, make_bwd(args, out))


@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck_sample_hard_negatives(with_ids):
    b = 5
    s = torch.randn(b, b)
    if with_ids:
        ids = torch.tensor([0, 1, 0, 2, 1])
        drawable = ids.view(-1, 1) != ids.view(1, -1)
    else:
        drawable = ~torch.eye(b, dtype=torch.bool)
    torch.library.opcheck(ops.sample_hard_negatives, (s, torch.randn(b, b), drawable, torch.tensor([3]), 0, "torch"))
    torch.library.opcheck(ops.sample_hard_negatives, (s[:2], s[2:4], drawable[:2], torch.tensor([3]), 2, "torch"))


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): forward + backward equal eager


def _compare_compiled(fn, inputs, backend="aot_eager"):
    """Run fn eagerly and compiled (fullgraph) on copies of ``inputs``: outputs and input gradients are equal
    bit for bit. The compiled graph calls the very same custom ops (opaque to the compiler) on the same
    inputs with the same upstream gradient (the loss is formed outside), and what the compiler generates
    around them here is views, copies and the sums of gradient contributions that eager autograd also does
    in the same dtype: nothing is reassociated, so no rounding can differ."""
    def run(f):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
        outs = f(*xs)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.is_floating_point())
        diff = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = torch.autograd.grad(loss, diff) if diff else ()
        return outs, grads

    torch._dynamo.reset()
    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend=backend))
    assert len(eager[0]) == len(compiled[0])
    for i, (a, b) in enumerate(zip(eager[0], compiled[0])):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}"
        assert torch.equal(a, b), f"output {i}: compiled differs from eager by {(a.double() - b.double()).abs().max()}"
    assert len(eager[1]) == len(compiled[1])
    for i, (a, b) in enumerate(zip(eager[1], compiled[1])):
        assert torch.equal(a, b), f"grad {i}: compiled differs from eager by {(a.double() - b.double()).abs().max()}"


def test_compile_qformer_attention():
    b, lq, lk, h, d = 2, 5, 9, 2, 8
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[0, 6:] = False

    def fn(q, k, v, kpm, seed):
        a = O.qformer_attention(q, k, v, num_query=4, mode="causal", key_padding_mask=kpm, backend="torch")
        c = O.qformer_attention(q, k, v, num_query=4, mode="unimodal", key_padding_mask=kpm, dropout_p=0.25,
                                seed=seed, backend="torch")
        return a, c

    _compare_compiled(fn, [rg(b, lq, h, d), rg(b, lk, h, d), rg(b, lk, h, d), kpm, torch.tensor([42])])


def test_compile_cross_attention():
    n, m, lq, lk, h, d = 3, 2, 4, 10, 2, 8
    kpm = torch.ones(m, lk, dtype=torch.bool)
    kpm[1, 7:] = False

    def fn(q, k, v, kv_index, kpm, seed):
        a = O.cross_attention(q, k, v, kv_index=kv_index, key_padding_mask=kpm, backend="torch")
        c = O.cross_attention(q, k, v, kv_index=kv_index, dropout_p=0.2, seed=seed, backend="torch")
        return a, c

    _compare_compiled(fn, [rg(n, lq, h, d), rg(m, lk, h, d), rg(m, lk, h, d), torch.tensor([1, 1, 0]), kpm,
                           torch.tensor([7])])


def test_compile_itc_loss():
    b, q, e = 4, 5, 8
    img = torch.nn.functional.normalize(torch.randn(b, q, e), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b, e), dim=-1).requires_grad_()

    def fn(img, txt, temp, ids):
        loss, s_i2t, s_t2i = O.itc_loss(img, txt, temp, return_logits=True, backend="torch")
        loss2 = O.itc_loss(img, txt, temp, image_ids=ids, label_smoothing=0.0, backend="torch")
        return loss, s_i2t, s_t2i, loss2

    _compare_compiled(fn, [img, txt, torch.tensor(0.07, requires_grad=True), torch.tensor([0, 1, 1, 2])])


def test_compile_sample_hard_negatives():
    b = 6

    def fn(s_i2t, s_t2i, ids, seed):
        return (*O.sample_hard_negatives(s_i2t, s_t2i, seed=seed, backend="torch"),
                *O.sample_hard_negatives(s_i2t, s_t2i, image_ids=ids, seed=seed, backend="torch"))

    _compare_compiled(fn, [torch.randn(b, b), torch.randn(b, b), torch.tensor([0, 1, 0, 2, 2, 3]), torch.tensor([11])])


def test_compile_bias_dropout_add_layernorm():
    def fn(x, bias, res, w, lb, seed):
        a = O.bias_dropout_add_layernorm(x, bias, res, w, lb, backend="torch")
        c = O.bias_dropout_add_layernorm(x, None, res, w, lb, dropout_p=0.1, seed=seed, eps=1e-5, backend="torch")
        return a, c

    _compare_compiled(fn, [rg(2, 3, 16), rg(16), rg(2, 3, 16), rg(16), rg(16), torch.tensor([3])])


# ----------------------------------------------------------------------------------------------
# no host synchronisation: on meta tensors (no data) any .item(), bool(tensor) or data-dependent shape
# raises, so every public op (validation, seed drawing, dispatch; the custom op runs its fake) and every
# reference (the code backend "torch" runs) must go through


def test_no_host_sync_on_meta():
    meta = "meta"

    def m(*shape, dtype=F32, grad=False):
        return torch.empty(*shape, dtype=dtype, device=meta).requires_grad_(grad)

    kpm = m(2, 7, dtype=torch.bool)
    out = O.qformer_attention(m(2, 5, 2, 8), m(2, 7, 2, 8), m(2, 7, 2, 8), num_query=3, mode="causal",
                              key_padding_mask=kpm, dropout_p=0.1)
    assert out.device.type == meta and out.shape == (2, 5, 2, 8)
    q, k, v = m(2, 5, 2, 8, grad=True), m(2, 7, 2, 8, grad=True), m(2, 7, 2, 8, grad=True)
    ref = O.qformer_attention_ref(q, k, v, num_query=3, mode="causal", key_padding_mask=kpm, dropout_p=0.1,
                                  seed=m(1, dtype=torch.int64))
    torch.autograd.grad(ref.sum(), (q, k, v))
    idx = m(3, dtype=torch.int64)
    out = O.cross_attention(m(3, 4, 2, 8), m(2, 6, 2, 8), m(2, 6, 2, 8), kv_index=idx, key_padding_mask=m(2, 6),
                            dropout_p=0.1)
    assert out.shape == (3, 4, 2, 8)
    q, k, v = m(3, 4, 2, 8, grad=True), m(2, 6, 2, 8, grad=True), m(2, 6, 2, 8, grad=True)
    ref = O.cross_attention_ref(q, k, v, kv_index=idx, key_padding_mask=m(2, 6, dtype=torch.bool), dropout_p=0.1,
                                seed=m(1, dtype=torch.int64))
    torch.autograd.grad(ref.sum(), (q, k, v))
    img, txt, temp = m(3, 4, 8, grad=True), m(3, 8, grad=True), m((), grad=True)
    loss, s1, s2 = O.itc_loss(img, txt, temp, image_ids=m(3, dtype=torch.int64), return_logits=True)
    assert loss.shape == () and s1.shape == (3, 3)
    ref = O.itc_loss_ref(img, txt, temp, image_ids=m(3, dtype=torch.int64))
    torch.autograd.grad(ref, (img, txt, temp))
    nt, ni = O.sample_hard_negatives(m(3, 3), m(3, 3), image_ids=m(3, dtype=torch.int64))
    assert nt.shape == (3,) and nt.dtype == torch.int64
    x = m(2, 3, 16, grad=True)
    y = O.bias_dropout_add_layernorm(x, m(16), m(2, 3, 16), m(16), m(16), dropout_p=0.1)
    assert y.shape == (2, 3, 16)
    ref = O.bias_dropout_add_layernorm_ref(x, m(16), m(2, 3, 16), m(16), m(16), dropout_p=0.1,
                                           seed=m(1, dtype=torch.int64))
    torch.autograd.grad(ref.sum(), (x,))



def test_compile_inductor_qformer_attention():
    """The default torch.compile backend (inductor) around a custom op, forward and backward; the per-op
    tests above use aot_eager (same Dynamo capture, fake impls and AOTAutograd, no C++ codegen) to keep the
    CPU suite fast."""
    b, lq, h, d = 2, 6, 2, 8
    kpm = torch.ones(b, lq, dtype=torch.bool)
    kpm[1, 4:] = False

    def fn(x, kpm):
        qkv = x.view(b, lq, 3, h, d)  # strided q/k/v views of a fused projection
        return (O.qformer_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], num_query=2, mode="causal",
                                    key_padding_mask=kpm, backend="torch"),)

    _compare_compiled(fn, [rg(b, lq, 3 * h * d), kpm], backend="inductor")
