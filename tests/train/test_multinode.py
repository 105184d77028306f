"""Several machines, on one: two ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`` launches meeting at
a localhost rendezvous (gloo), as two nodes of a Slurm job would (docs/data.md has the sbatch script).

- WebDataset shards without resampling (8 equal shards, 2 processes x 2 loader workers, ``--samples-per-epoch``
  the total): the shards split across the nodes and one epoch trains on every sample exactly once;
- an annotation file: the two nodes train what one process with the global batch trains (as
  ``torchrun --standalone --nproc-per-node 2`` does in the tests of ``blipfast train`` under torchrun)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from blipfast.testing.shards import write_demo
from blipfast.train.streams import read_keys
from tests.helpers.runtime import free_port
from tests.helpers.train import global_batch_baseline, read_log, tiny_args, weights


def two_nodes(args: list, cwd: str) -> str:
    """``blipfast ARGS`` on two single-process torchrun "nodes" of one c10d rendezvous; rank 0's stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "blipfast-test",
           "--max-restarts", "0", "-m", "blipfast.cli"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-5000:]
    return "".join(out for out, _ in outs)


@pytest.mark.distributed
def test_two_nodes_split_the_shards_and_read_every_sample_once_per_epoch(tmp_path):
    demo = write_demo(str(tmp_path), 8, 6)
    out = str(tmp_path / "run")
    args = tiny_args(out, os.path.join(str(tmp_path), "shards"), vision=demo["vision"], steps=6) + [
        "--tokenizer", demo["tokenizer"], "--num-workers", "2", "--samples-per-epoch", "48", "--log-keys"]
    stdout = two_nodes(args, str(tmp_path))
    assert "2 process(es)" in stdout and "global batch 8" in stdout and "(6.0 per epoch)" in stdout
    keys = [read_keys(out, r) for r in (0, 1)]
    assert all(sorted(k) == list(range(6)) and all(len(b) == 4 for b in k.values()) for k in keys)
    seen = [k for r in keys for b in r.values() for k in b]
    assert Counter(seen) == Counter(f"{s:05d}{i:04d}" for s in range(8) for i in range(6))
    shards = [{k[:5] for b in r.values() for k in b} for r in keys]
    assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]  # each node its own shards
    assert read_log(out)[-1]["epoch"] == 1.0


@pytest.mark.distributed
def test_two_nodes_equal_one_process_with_the_global_batch(tmp_path):
    common, extra, single = global_batch_baseline(tmp_path, steps=3)
    multi = str(tmp_path / "multi")
    assert "global batch 6" in two_nodes(tiny_args(multi, **common, extra=extra) + ["--batch-size", "3"],
                                         str(tmp_path))
    for a, b in zip(read_log(single), read_log(multi)):
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    ws, wm = weights(single), weights(multi)
    for k in ws:  # (to a fraction of one Adam step: see the torchrun test of blipfast train)
        torch.testing.assert_close(wm[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)
