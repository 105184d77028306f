"""BlipRetrieval with ``negative_all_rank`` under torch.distributed (2 gloo processes on CPU) against one process
holding the global batch.

Each rank trains on its half of the global batch from the same model (dropout off, the same draw seed) and
averages its gradients with the other rank's (what DDP does). With ``negative_all_rank`` the negatives are drawn
from the gathered global batch and fetched from their ranks (ViT tokens with gradients, texts) by the sync-free
exchange, so they are exactly the draws of one process holding the global batch, and the ITM loss averaged over
the ranks is that process' ITM loss. ITC stays local in BLIP (each rank against its own momentum batch and the
queue), so each rank's ITC loss is one process' on its half with the same queue. The averaged gradient then equals
the global process' ITM gradient plus the mean of the halves' ITC gradients, and the queues (the momentum features
and ids of both ranks, in rank order), the pointer and the momentum copies equal the global process'."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blipfast.models.blip_retrieval import BlipRetrieval
from tests.helpers.blip_finetune import jitter_, retrieval_config
from tests.helpers.blip_pretrain import make_batch
from tests.helpers.runtime import free_port

B, T, WORLD, SEED = 3, 6, 2, 17


def _setup():
    torch.manual_seed(99)
    model = jitter_(BlipRetrieval(retrieval_config(queue_size=10, negative_all_rank=True))).train()
    with torch.no_grad():
        model.ptr_queue.fill_(7)  # 10 is not a multiple of the global batch 6: the queue wraps
        model.temp.fill_(0.07)
    torch.manual_seed(5)
    px, ids, mask = make_batch(B * WORLD, T, pad_rows=(1, 4))
    return model, (px, ids, mask, torch.tensor([3, 5, 3, 8, 9, 5]))


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "queue" in k or "_m." in k}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model, (px, ids, mask, image_ids) = _setup()
        sl = slice(rank * B, (rank + 1) * B)
        out = model(px[sl], ids[sl], mask[sl], alpha=0.3, image_ids=image_ids[sl], sample_seed=SEED)
        out.loss.backward()
        grads = _grads(model)
        for g in grads.values():  # DDP's average
            dist.all_reduce(g)
            g /= WORLD
        torch.save({"loss_itc": out.loss_itc.detach(), "loss_itm": out.loss_itm.detach(), "grads": grads,
                    "neg": (out.neg_text_index, out.neg_image_index), "state": _state(model)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_negative_all_rank_over_two_gloo_processes_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    model, (px, ids, mask, image_ids) = _setup()
    glob = copy.deepcopy(model)
    out = glob(px, ids, mask, alpha=0.3, image_ids=image_ids, sample_seed=SEED)
    out.loss_itm.backward()
    want = _grads(glob)
    close = dict(rtol=1e-5, atol=1e-6)
    for r in range(WORLD):
        sl = slice(r * B, (r + 1) * B)
        assert torch.equal(ranks[r]["neg"][0], out.neg_text_index[sl])  # the global process' draws
        assert torch.equal(ranks[r]["neg"][1], out.neg_image_index[sl])
        half = copy.deepcopy(model)
        h = half(px[sl], ids[sl], mask[sl], alpha=0.3, image_ids=image_ids[sl], sample_seed=SEED)
        torch.testing.assert_close(ranks[r]["loss_itc"], h.loss_itc.detach(), **close)
        h.loss_itc.backward()
        for n, g in _grads(half).items():
            want[n] = want.get(n, 0) + g / WORLD
    assert not (out.neg_text_index[:B] < B).all() or not (out.neg_image_index[:B] < B).all()  # crosses ranks
    torch.testing.assert_close(sum(r["loss_itm"] for r in ranks) / WORLD, out.loss_itm.detach(), **close)
    scale = max(g.abs().max().item() for g in want.values())  # relative to the gradients' scale (the key biases'
    for r in ranks:  # gradients are 0 up to rounding: softmax ignores them)
        assert r["grads"].keys() == want.keys()
        for n, g in want.items():
            err = (r["grads"][n] - g).abs().max().item()
            assert err <= 1e-5 * scale, f"d {n}: {err:.3e} (scale {scale:.3e})"
        for k, v in _state(glob).items():
            torch.testing.assert_close(r["state"][k], v, **close, msg=k)
