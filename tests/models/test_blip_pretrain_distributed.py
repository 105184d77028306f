"""BlipPretrain under torch.distributed (2 gloo processes on CPU) against one process.

Each rank runs two steps on its half of each global batch from the same initial model (dropout off). As in BLIP,
the momentum features of every rank are gathered before they are enqueued: after each step both ranks' queues,
index queue and pointer equal those of ONE process that runs the two halves' momentum features through the
queue in rank order (2B columns per step), and the momentum copies equal one process' update. Each rank's ITC
loss is that of one process on its half with the same queue (ITC and ITM are local in BLIP pre-training)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blipfast.models.blip_pretrain import BlipPretrain
from tests.helpers.blip_pretrain import make_batch, tiny_config
from tests.helpers.runtime import free_port

B, T, STEPS, WORLD = 3, 6, 2, 2


def _setup():
    torch.manual_seed(99)
    model = BlipPretrain(tiny_config(queue_size=10)).train()  # 10: not a multiple of the global batch 6 (wraps)
    with torch.no_grad():
        model.queue_ptr.fill_(7)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(STEPS):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        px, ids, mask = make_batch(B * WORLD, T, pad_rows=(1, 4))
        batches.append((px, ids, mask, torch.tensor([3, 5, 3, 8, 9, 5])))
    return model, batches


def _negatives():
    return torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model, batches = _setup()
        sl = slice(rank * B, (rank + 1) * B)
        res = []
        for px, ids, mask, image_ids in batches:
            out = model(px[sl], ids[sl], mask[sl], alpha=0.3, image_ids=image_ids[sl], negatives=_negatives())
            res.append({"loss_itc": out.loss_itc.detach(), "state": {k: v.clone() for k, v in model.state_dict().items()
                                                                    if "queue" in k or "_m." in k}})
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_gather_the_enqueued_features(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    model, batches = _setup()
    for step, (px, ids, mask, image_ids) in enumerate(batches):
        # each rank's half in one process, from the state before the step (ITC over the same queue)
        halves = []
        for r in range(WORLD):
            sl = slice(r * B, (r + 1) * B)
            m = copy.deepcopy(model)
            out = m(px[sl], ids[sl], mask[sl], alpha=0.3, image_ids=image_ids[sl], negatives=_negatives())
            torch.testing.assert_close(ranks[r][step]["loss_itc"], out.loss_itc.detach(), rtol=1e-5, atol=1e-6)
            halves.append(m)
        # one process: rank 0's half enqueued, then rank 1's (its copy continues rank 0's queue and pointer)
        with torch.no_grad():
            nxt = copy.deepcopy(halves[0])
            q = nxt.config.queue_size
            ptr = int(model.queue_ptr)
            for r, m in enumerate(halves):
                slots = [(ptr + r * B + i) % q for i in range(B)]
                old = [(int(model.queue_ptr) + i) % q for i in range(B)]  # where the half wrote in its own copy
                for name in ("image_queue", "text_queue", "idx_queue"):
                    getattr(nxt, name)[:, slots] = getattr(m, name)[:, old]
            nxt.queue_ptr.fill_((ptr + WORLD * B) % q)
        for r in range(WORLD):
            state = ranks[r][step]["state"]
            for k, v in nxt.state_dict().items():
                if k in state:
                    torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=f"step {step} rank {r}: {k}")
        model = nxt
