"""``torchrun --nproc-per-node 2 -m blipfast.cli train`` (gloo, CPU) against one process holding the global batch.

Each rank trains on its half of every global batch (GlobalBatchSampler), Blip2Stage1 gathers the ITC features and
exchanges the hard negatives over the group, DDP averages the gradients, and the negatives are drawn with the
same seed on both ranks. With dropout off and every caption truncated to the same length (so each rank's LM loss
averages as many tokens), the logged losses (rank 0 logs the mean over the ranks) and the final weights equal
those of ``blipfast train`` in one process with twice the batch, to float32 rounding (the weights to a fraction of
one Adam step)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.train import global_batch_baseline, read_log, tiny_args, weights


@pytest.mark.distributed
def test_torchrun_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path):
    common, extra, single = global_batch_baseline(tmp_path, steps=4)
    multi = str(tmp_path / "multi")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "blipfast.cli"] + tiny_args(multi, **common, extra=extra) + ["--batch-size", "3"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 process(es)" in proc.stdout and "global batch 6" in proc.stdout
    rs, rm = read_log(single), read_log(multi)
    assert [r["step"] for r in rm] == [1, 2, 3, 4]
    for a, b in zip(rs, rm):
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])
    # weights: Adam divides by sqrt(v), so a float32 rounding difference in a near-zero gradient can move an element
    # by a fraction of a step (lr 2e-3 here); 1e-4 is 5 % of one step
    ws, wm = weights(single), weights(multi)
    for k in ws:
        torch.testing.assert_close(wm[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)
    # one process wrote the run folder: one log row per step, one checkpoint
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
