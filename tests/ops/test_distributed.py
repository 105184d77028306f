"""torch.distributed (gloo, 2 and 4 processes on CPU) against one process holding the whole global batch.

Each rank computes the ITC loss over gathered features, samples hard negatives with a shared seed,
fetches the negative images (with gradient) and texts from their owners, builds the ITM banks, and
back-propagates rank-specific random weights through the all-gather-with-gradient and the exchange.
The parent process redoes everything on the global batch and compares: losses and logits, gradients of
features and temperature (DDP averages per-rank gradients, so rank grads / W = the global grads), the
sampled indices, the fetched rows, and the gradients routed back to the owners.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from blipfast import distributed as bd
from blipfast.models.losses import itm_loss
from blipfast.ops import itc_loss, itc_loss_ref, sample_hard_negatives
from tests.helpers.runtime import free_port
from tests.helpers.tolerance import assert_close

B, Q, E, T = 3, 4, 8, 5  # per-rank batch, queries, embedding, text length
SEED = 20241123


def _global_batch(world, tag=0):
    g = torch.Generator().manual_seed(SEED + 100 * world + tag)
    bw = B * world
    img = F.normalize(torch.randn(bw, Q, E, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(bw, E, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.randint(0, bw - 1, (bw,), generator=g)  # some images shared, also across ranks
    temp = torch.tensor(0.07, dtype=torch.float64)
    embeds = torch.randn(bw, 6, 7, generator=g, dtype=torch.float64)  # stand-in for [257, 1408] image embeds
    text_ids = torch.randint(1, 1000, (bw, T), generator=g)
    text_mask = (torch.rand(bw, T, generator=g) > 0.3).long()
    weights = torch.randn(world, 2 * B, 6, 7, generator=g, dtype=torch.float64)  # per-rank loss weights
    gather_w = torch.randn(world, bw, 6, 7, generator=g, dtype=torch.float64)
    return img, txt, ids, temp, embeds, text_ids, text_mask, weights, gather_w


def _rank_step(group, world, tag):
    """Everything one rank of ``group`` (``world`` ranks) does; returns what the parent checks."""
    rank = dist.get_rank(group)
    img, txt, ids, temp, embeds, text_ids, text_mask, weights, gather_w = _global_batch(world, tag)
    sl = slice(rank * B, (rank + 1) * B)
    res = {}
    # ITC over gathered features (gradient only through the local rows)
    x = img[sl].clone().requires_grad_()
    y = txt[sl].clone().requires_grad_()
    t = temp.clone().requires_grad_()
    loss, s1, s2 = itc_loss(x, y, t, image_ids=ids[sl], return_logits=True, process_group=group, backend="torch")
    res["loss"], res["s_i2t"], res["s_t2i"] = loss.detach(), s1.detach(), s2.detach()
    res["d_img"], res["d_txt"], res["d_temp"] = torch.autograd.grad(loss, [x, y, t])
    # hard negatives: the same seed on every rank
    nt, ni = sample_hard_negatives(s1, s2, image_ids=ids[sl], seed=777, process_group=group)
    res["neg_text"], res["neg_image"] = nt, ni
    # negative exchange with gradient back to the owners, banks and ITM indices
    emb = embeds[sl].clone().requires_grad_()
    itm = bd.exchange_itm_negatives(nt, ni, emb, text_ids[sl], text_mask[sl], process_group=group)
    res["image_bank"] = itm.image_bank.detach()
    res["text_ids_bank"], res["text_mask_bank"] = itm.text_ids_bank, itm.text_mask_bank
    res["batch"] = {k: getattr(itm.batch, k) for k in ("text_index", "kv_index", "labels", "weight")}
    (res["d_embeds"],) = torch.autograd.grad((itm.image_bank * weights[rank]).sum(), [emb])
    # all-gather with gradient
    emb2 = embeds[sl].clone().requires_grad_()
    gathered = bd.all_gather_with_grad(emb2, group)
    res["gathered"] = gathered.detach()
    (res["d_gathered"],) = torch.autograd.grad((gathered * gather_w[rank]).sum(), [emb2])
    # capacities: 1 row per (requester, owner) pair, and the synced exact size
    req = torch.tensor([(rank * 5 + 7 * i) % (B * world) for i in range(B)] + [-1])
    res["req"] = req
    res["cap1"] = bd.fetch_rows(text_ids[sl], req, group, capacity=1)
    res["cap_auto"] = bd.fetch_rows(text_ids[sl], req, group, capacity="auto")
    return res


def _worker(rank, world, port, out_dir):
    """World of 4: the checks on the default group (W = 4) and on two 2-rank subgroups (W = 2)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        res = _rank_step(None, world, 0)
        torch.save(res, os.path.join(out_dir, f"w{world}-t0-rank{rank}.pt"))
        pair = rank // 2
        res = _rank_step(pairs[pair], 2, pair)
        torch.save(res, os.path.join(out_dir, f"w2-t{pair}-rank{rank % 2}.pt"))
    finally:
        dist.destroy_process_group()


def _expected_fetch(rows_all, req, cap, world):
    """What rank-local fetches of ``req`` (one list per rank) return with per-pair capacity ``cap``."""
    out = []
    for r in range(world):
        seen = {}
        rows, valid = [], []
        for i in req[r].tolist():
            owner = i // B if i >= 0 else None
            k = seen.get(owner, 0)
            seen[owner] = k + 1
            ok = i >= 0 and k < cap
            rows.append(rows_all[i] if ok else torch.zeros_like(rows_all[0]))
            valid.append(ok)
        out.append((torch.stack(rows), torch.tensor(valid)))
    return out


@pytest.mark.distributed
def test_distributed_equals_single_process(tmp_path):
    """One spawn of 4 gloo processes: the default group (W = 4) and two subgroups of 2 (W = 2)."""
    mp.spawn(_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    for world, tag in ((4, 0), (2, 0), (2, 1)):
        res = [torch.load(tmp_path / f"w{world}-t{tag}-rank{r}.pt", weights_only=False) for r in range(world)]
        _check_world(res, world, tag)


def _check_world(res, world, tag):
    img, txt, ids, temp, embeds, text_ids, text_mask, weights, gather_w = _global_batch(world, tag)
    f64 = torch.float64

    # ITC: one process with the whole batch (gathered copies are constants there too)
    x, y, t = img.clone().requires_grad_(), txt.clone().requires_grad_(), temp.clone().requires_grad_()
    loss, s1, s2 = itc_loss_ref(x, y, t, image_ids=ids, return_logits=True)
    d_img, d_txt, d_temp = torch.autograd.grad(loss, [x, y, t])
    assert_close(torch.stack([r["loss"] for r in res]).mean(), loss.detach(), dtype=f64, name="loss")
    assert_close(torch.cat([r["s_i2t"] for r in res]), s1.detach(), dtype=f64, name="s_i2t")
    assert_close(torch.cat([r["s_t2i"] for r in res]), s2.detach(), dtype=f64, name="s_t2i")
    assert_close(torch.cat([r["d_img"] for r in res]) / world, d_img, dtype=f64, name="d image_feats")
    assert_close(torch.cat([r["d_txt"] for r in res]) / world, d_txt, dtype=f64, name="d text_feats")
    assert_close(torch.stack([r["d_temp"] for r in res]).mean(), d_temp, dtype=f64, name="d temp")

    # hard negatives: identical to the single-process draw with the same seed
    nt, ni = sample_hard_negatives(s1.detach(), s2.detach(), image_ids=ids, seed=777)
    assert torch.equal(torch.cat([r["neg_text"] for r in res]), nt)
    assert torch.equal(torch.cat([r["neg_image"] for r in res]), ni)
    assert bool((nt >= 0).any()), "the test should exercise real negatives"

    # the fetched negatives are the rows the indices name; ITM indices over the banks
    emb = embeds.clone().requires_grad_()
    total = 0
    for r, rr in enumerate(res):
        sl = slice(r * B, (r + 1) * B)
        nti, nii = nt[sl], ni[sl]
        neg_img = torch.where((nii >= 0).view(-1, 1, 1), emb[nii.clamp_min(0)], torch.zeros((), dtype=f64))
        bank = torch.cat([emb[sl], neg_img])
        assert_close(rr["image_bank"], bank.detach(), dtype=f64, name="image bank")
        total = total + (bank * weights[r]).sum()
        neg_ids = torch.where((nti >= 0).view(-1, 1), text_ids[nti.clamp_min(0)], 0)
        neg_mask = torch.where((nti >= 0).view(-1, 1), text_mask[nti.clamp_min(0)], 0)
        assert torch.equal(rr["text_ids_bank"], torch.cat([text_ids[sl], neg_ids]))
        assert torch.equal(rr["text_mask_bank"], torch.cat([text_mask[sl], neg_mask]))
        batch, own = rr["batch"], torch.arange(B)
        assert torch.equal(batch["text_index"], torch.cat([own, own, own + B]))
        assert torch.equal(batch["kv_index"], torch.cat([own, own + B, own]))
        assert torch.equal(batch["labels"], torch.tensor([1] * B + [0] * (2 * B)))
        assert torch.equal(batch["weight"], torch.cat([torch.ones(B), (nii >= 0).float(), (nti >= 0).float()]))
        # the 3B ITM sequences: (text, image) pairs of LAVIS' order
        texts = rr["text_ids_bank"][batch["text_index"]]
        images = rr["image_bank"][batch["kv_index"]]
        assert torch.equal(texts[2 * B:][nti >= 0], text_ids[nti[nti >= 0]])
        assert torch.equal(images[B:2 * B][nii >= 0], embeds[nii[nii >= 0]])
    (d_emb,) = torch.autograd.grad(total, [emb])
    assert_close(torch.cat([r["d_embeds"] for r in res]), d_emb, dtype=f64, name="d image embeds (owners)")

    # all_gather_with_grad: forward is the concatenation, backward sums every rank's gradient at the owner
    for rr in res:
        assert torch.equal(rr["gathered"], embeds)
    assert_close(torch.cat([r["d_gathered"] for r in res]), gather_w.sum(0), dtype=f64, name="d gathered")

    # capacities
    reqs = [rr["req"] for rr in res]
    for key, cap in (("cap1", 1), ("cap_auto", len(reqs[0]))):
        for rr, (rows, valid) in zip(res, _expected_fetch(text_ids, reqs, cap, world)):
            assert torch.equal(rr[key][1], valid), key
            assert torch.equal(rr[key][0], rows), key


def test_single_process_itm_indices_and_fetch():
    """World size 1 without torch.distributed: -1 negatives become weight-0 rows; fetch_rows indexes."""
    nt = torch.tensor([2, -1, 0])
    ni = torch.tensor([-1, 2, 1])
    batch = bd.itm_batch_indices(nt, ni)
    assert batch.text_index.tolist() == [0, 1, 2, 0, 1, 2, 2, 1, 0]
    assert batch.kv_index.tolist() == [0, 1, 2, 0, 2, 1, 0, 1, 2]
    assert batch.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert batch.weight.tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 1]
    x = torch.randn(3, 2, requires_grad=True)
    rows, valid = bd.fetch_rows(x, torch.tensor([2, -1, 2]))
    assert valid.tolist() == [True, False, True]
    assert torch.equal(rows.detach(), torch.stack([x[2], torch.zeros(2), x[2]]).detach())
    (g,) = torch.autograd.grad(rows.sum(), [x])
    assert g.tolist() == [[0, 0], [0, 0], [2, 2]]
    # B*W = 1: no negatives, the ITM loss is the positives' CE
    inp = bd.exchange_itm_negatives(torch.tensor([-1]), torch.tensor([-1]), torch.randn(1, 4), torch.tensor([[5, 6]]))
    assert inp.batch.weight.tolist() == [1, 0, 0]
    logits = torch.randn(3, 2)
    expect = F.cross_entropy(logits[:1], torch.tensor([1]))
    torch.testing.assert_close(itm_loss(logits, inp.batch.labels, inp.batch.weight), expect)
    full = itm_loss(logits, torch.tensor([1, 0, 0]), torch.ones(3))
    torch.testing.assert_close(full, F.cross_entropy(logits, torch.tensor([1, 0, 0])))


def test_slot_positions_match_a_loop():
    from blipfast.distributed import _slot_positions

    g = torch.Generator().manual_seed(3)
    owner = torch.randint(-1, 5, (7, 40), generator=g)
    pos = _slot_positions(owner, 5)
    for r in range(7):
        seen = {}
        for i, o in enumerate(owner[r].tolist()):
            want = -1 if o < 0 else seen.get(o, 0)
            if o >= 0:
                seen[o] = want + 1
            assert pos[r, i].item() == want
