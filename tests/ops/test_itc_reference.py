"""itc_loss (public op, backend "torch") and itc_loss_ref against a LAVIS-style formulation written here
(Blip2Qformer.forward's ITC block: batched matmuls, max over queries, F.cross_entropy / soft targets)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blipfast.ops import itc_loss, itc_loss_ref
from tests.helpers.tolerance import assert_close as _assert_close
from tests.helpers.tolerance import assert_within_torch_error as _assert_within_torch_error

F64 = torch.float64


def assert_close(a, b, **kw):
    _assert_close(a.detach(), b.detach(), **kw)


def assert_within_torch_error(fast, ref64, lowp, **kw):
    _assert_within_torch_error(fast.detach(), ref64.detach(), lowp.detach(), **kw)


def lavis_itc(image_feats, text_feat, temp, label_smoothing=0.1, image_ids=None):
    """LAVIS' ITC on one process holding the whole batch; the 'gathered' copies are constants, as
    concat_all_gather returns them under DDP. Returns (loss, sim_i2t, sim_t2i)."""
    image_feats_all = image_feats.detach()  # [BW, Q, E]
    text_feat_all = text_feat.detach()  # [BW, E]
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)  # [B, BW, Q]
    sim_i2t, _ = sim_q2t.max(-1)
    sim_i2t = sim_i2t / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(-2)  # [B, BW, Q]
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / temp
    bs = image_feats.size(0)
    if image_ids is None:
        targets = torch.arange(bs, dtype=torch.long)
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    else:
        ids = image_ids.view(-1, 1)
        pos_idx = torch.eq(ids, ids.t()).to(sim_i2t.dtype)
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_targets = (1 - label_smoothing) * sim_targets + label_smoothing * torch.ones_like(sim_targets) / sim_targets.size(1)
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
        loss = (loss_t2i + loss_i2t) / 2
    return loss, sim_i2t, sim_t2i


def make_inputs(b, q, e, dtype):
    img = F.normalize(torch.randn(b, q, e, dtype=F64), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, e, dtype=F64), dim=-1).to(dtype).requires_grad_()
    temp = torch.tensor(0.07, dtype=dtype).requires_grad_()  # Blip2Qformer's init (learnable, not clamped)
    return img, txt, temp


def fresh(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def make_ids(b):
    ids = torch.randint(0, max(1, b // 2), (b,))
    return ids


IMPLS = {
    "op": lambda *a, **kw: itc_loss(*a, backend="torch", **kw),
    "ref": itc_loss_ref,
}


@pytest.mark.parametrize("impl", ["op", "ref"])
@pytest.mark.parametrize("ids", [False, True], ids=["pairs", "image_ids"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("b", [1, 3, 64])
def test_itc_float64_matches_lavis(b, label_smoothing, ids, impl):
    q, e = 8, 16
    img, txt, temp = make_inputs(b, q, e, F64)
    image_ids = make_ids(b) if ids else None
    loss, s_i2t, s_t2i = IMPLS[impl](img, txt, temp, label_smoothing=label_smoothing, image_ids=image_ids,
                                     return_logits=True)
    img2, txt2, temp2 = fresh(img, txt, temp)
    want, w_i2t, w_t2i = lavis_itc(img2, txt2, temp2, label_smoothing, image_ids)
    assert loss.shape == () and s_i2t.shape == (b, b) and s_t2i.shape == (b, b)
    assert loss.dtype == F64 and s_i2t.dtype == F64
    assert_close(loss, want, name="loss")
    assert_close(s_i2t, w_i2t, name="s_i2t")
    assert_close(s_t2i, w_t2i, name="s_t2i")
    g = torch.randn((), dtype=F64)
    got_g = torch.autograd.grad(loss, (img, txt, temp), g)
    want_g = torch.autograd.grad(want, (img2, txt2, temp2), g)
    for name, a, w in zip(("image_feats", "text_feats", "temp"), got_g, want_g):
        assert torch.isfinite(a).all()
        assert_close(a, w, name=f"d {name}")
    if b > 1:  # not a vacuous comparison
        assert all(float(w.abs().max()) > 0 for w in want_g)


@pytest.mark.parametrize("ids", [False, True], ids=["pairs", "image_ids"])
@pytest.mark.parametrize("b", [1, 3, 64])
def test_itc_float32_within_torch_error(b, ids):
    q, e = 32, 48
    img, txt, temp = make_inputs(b, q, e, torch.float32)
    image_ids = make_ids(b) if ids else None
    loss, s_i2t, s_t2i = itc_loss(img, txt, temp, image_ids=image_ids, return_logits=True, backend="torch")
    i64, t64, tp64 = fresh(img, txt, temp, dtype=F64)
    ref, r_i2t, r_t2i = lavis_itc(i64, t64, tp64, 0.1, image_ids)
    i32, t32, tp32 = fresh(img, txt, temp)
    low, l_i2t, l_t2i = lavis_itc(i32, t32, tp32, 0.1, image_ids)
    assert loss.dtype == torch.float32 and s_i2t.dtype == torch.float32
    assert_within_torch_error(loss, ref, low, name="loss")
    assert_within_torch_error(s_i2t, r_i2t, l_i2t, name="s_i2t")
    assert_within_torch_error(s_t2i, r_t2i, l_t2i, name="s_t2i")
    got_g = torch.autograd.grad(loss, (img, txt, temp))
    ref_g = torch.autograd.grad(ref, (i64, t64, tp64))
    low_g = torch.autograd.grad(low, (i32, t32, tp32))
    for name, a, r, lw in zip(("image_feats", "text_feats", "temp"), got_g, ref_g, low_g):
        assert a.dtype == torch.float32
        assert_within_torch_error(a, r, lw, name=f"d {name}")


def test_itc_temp_shapes_and_ref_agree():
    """temp as a 0-d or one-element tensor; the public op and the reference agree; the gradient of a
    [1]-shaped temp keeps its shape."""
    img, txt, _ = make_inputs(5, 4, 8, F64)
    ids = torch.tensor([0, 1, 0, 2, 1])
    for temp in (torch.tensor(0.05, dtype=F64), torch.tensor([0.05], dtype=F64)):
        temp.requires_grad_()
        loss = itc_loss(img, txt, temp, image_ids=ids, label_smoothing=0.2, backend="torch")
        (dt,) = torch.autograd.grad(loss, (temp,))
        assert dt.shape == temp.shape
        ref = itc_loss_ref(img, txt, temp.reshape(()), image_ids=ids, label_smoothing=0.2)
        assert_close(loss, ref)
        want = lavis_itc(img, txt, temp.reshape(()), 0.2, ids)[0]
        assert_close(loss, want)


def test_itc_gathered_copies_are_constants():
    """Gradients reach only the local rows: perturbing the loss through a detached copy changes nothing,
    and the gradient equals LAVIS' with constants, not the one with gradient through the gather."""
    img, txt, temp = make_inputs(4, 4, 8, F64)
    loss = itc_loss(img, txt, temp, backend="torch")
    gi, gt = torch.autograd.grad(loss, (img, txt))
    # autograd through both copies (what LAVIS does without torch.distributed) differs
    i2, t2, tp2 = fresh(img, txt, temp)
    s_i2t = (i2.unsqueeze(1) @ t2.unsqueeze(-1)).squeeze(-1).max(-1)[0] / tp2
    s_t2i = (t2.unsqueeze(1).unsqueeze(1) @ i2.permute(0, 2, 1)).squeeze(-2).max(-1)[0] / tp2
    tgt = torch.arange(4)
    both = (F.cross_entropy(s_i2t, tgt, label_smoothing=0.1) + F.cross_entropy(s_t2i, tgt, label_smoothing=0.1)) / 2
    assert_close(loss, both)
    gi2, _ = torch.autograd.grad(both, (i2, t2))
    assert not torch.allclose(gi, gi2), "gradient flowed through the gathered copies"


def test_itc_label_smoothing_changes_loss_and_max_routes_to_argmax_query():
    img, txt, temp = make_inputs(3, 5, 8, F64)
    a = itc_loss(img, txt, temp, label_smoothing=0.0)
    b = itc_loss(img, txt, temp, label_smoothing=0.1)
    assert not torch.allclose(a, b)
    (gi,) = torch.autograd.grad(b, (img,))
    # every gradient row of image_feats[b, q] is a combination of texts for which q was the arg-max query
    sims = torch.einsum("bqe,je->bjq", img.detach(), txt.detach())
    used = torch.zeros(3, 5, dtype=torch.bool)
    used.scatter_(1, sims.argmax(-1), True)
    assert (gi[~used] == 0).all() and (gi[used].abs().sum(-1) > 0).all()


def lavis_itc_rank(image_feats, text_feat, image_feats_all, text_feat_all, temp, rank, label_smoothing=0.1,
                   image_ids=None, image_ids_all=None):
    """LAVIS' ITC on rank ``rank`` of a world whose gathered features are given (constants)."""
    sim_i2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1).max(-1)[0] / temp
    sim_t2i = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(-2).max(-1)[0] / temp
    bs = image_feats.size(0)
    if image_ids is None:
        targets = torch.linspace(rank * bs, rank * bs + bs - 1, bs, dtype=torch.long)
        return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    pos_idx = torch.eq(image_ids.view(-1, 1), image_ids_all.view(1, -1)).to(sim_i2t.dtype)
    tgt = pos_idx / pos_idx.sum(1, keepdim=True)
    tgt = (1 - label_smoothing) * tgt + label_smoothing / tgt.size(1)
    return -((F.log_softmax(sim_t2i, 1) * tgt).sum(1).mean() + (F.log_softmax(sim_i2t, 1) * tgt).sum(1).mean()) / 2


@pytest.mark.parametrize("ids", [False, True], ids=["pairs", "image_ids"])
def test_itc_from_gathered_matches_lavis_per_rank_and_single_process(ids):
    """Each rank's loss and gradients equal LAVIS' on that rank; the mean of the ranks' losses is the loss
    of one process holding the whole batch (DDP equivalence)."""
    from blipfast.ops import itc_loss_from_gathered

    world, b, q, e = 3, 4, 5, 8
    img_all, txt_all, temp = make_inputs(world * b, q, e, F64)
    img_all, txt_all = img_all.detach(), txt_all.detach()
    ids_all = make_ids(world * b) if ids else None
    losses = []
    for rank in range(world):
        rows = slice(rank * b, (rank + 1) * b)
        img, txt, tp = fresh(img_all[rows], txt_all[rows], temp)
        kw = dict(image_ids=ids_all[rows], image_ids_all=ids_all) if ids else {}
        loss, s_i2t, s_t2i = itc_loss_from_gathered(img, txt, img_all, txt_all, tp, rank=rank, return_logits=True,
                                                    backend="torch", **kw)
        assert s_i2t.shape == (b, world * b) and s_t2i.shape == (b, world * b)
        img2, txt2, tp2 = fresh(img, txt, tp)
        want = lavis_itc_rank(img2, txt2, img_all, txt_all, tp2, rank, **kw)
        assert_close(loss, want, name=f"rank {rank} loss")
        for name, a, w in zip(("image_feats", "text_feats", "temp"), torch.autograd.grad(loss, (img, txt, tp)),
                              torch.autograd.grad(want, (img2, txt2, tp2))):
            assert_close(a, w, name=f"rank {rank} d {name}")
        losses.append(loss.detach())
    single = itc_loss(img_all, txt_all, temp, image_ids=ids_all, backend="torch")
    assert_close(torch.stack(losses).mean(), single, name="mean over ranks vs single process")
