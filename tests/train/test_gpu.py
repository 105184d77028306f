"""``blipfast train`` on CUDA (``pytest -m gpu``): the CUDA-graph step against the eager step, ``--compile``, a step
without host synchronisation, bf16 end to end, and an NCCL ``torchrun`` run against one process (2+ GPUs).
These cannot run on the CPU CI machine; they skip themselves there."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from blipfast.cli import main
from blipfast.train.config import OPTIONS
from blipfast.train.loop import Trainer
from blipfast.testing.data import write_images, write_jsonl, write_vision
from tests.helpers.train import NO_DROPOUT, TINY_MODEL, merge, read_log, tiny_args, weights

pytestmark = pytest.mark.gpu

MODEL = merge(TINY_MODEL, NO_DROPOUT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-data")
    rows = write_images(str(root), 32, seed=5)
    return {"data": write_jsonl(str(root / "ann.jsonl"), rows), "images": str(root),
            "vision": write_vision(str(root / "vit"))}


def _gpu_args(out, data, steps, *extra):
    args = tiny_args(out, data["data"], data["images"], data["vision"], steps=steps, model=MODEL)
    i = args.index("--device")
    args[i + 1] = "cuda"
    return args + list(extra)


def test_cuda_graph_step_equals_eager_step_fp32(data, tmp_path):
    """fp32 without dropout: the captured step runs the same kernels as the eager one (3 eager warm-up steps, then
    replays of the two graphs with gradient accumulation), so the losses and weights agree to fp32 rounding."""
    eager, graph = str(tmp_path / "eager"), str(tmp_path / "graph")
    common = ("--precision", "fp32", "--grad-accum", "2")
    assert main(_gpu_args(eager, data, 8, *common)) == 0
    assert main(_gpu_args(graph, data, 8, *common, "--cuda-graph")) == 0
    for a, b in zip(read_log(eager), read_log(graph)):
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    we, wg = weights(eager), weights(graph)
    for k in we:
        torch.testing.assert_close(wg[k], we[k], rtol=1e-3, atol=1e-4, msg=k)


def test_cuda_graph_and_compile_bf16_train(data, tmp_path):
    for extra in (("--cuda-graph",), ("--compile",)):
        out = str(tmp_path / extra[0].strip("-"))
        assert main(_gpu_args(out, data, 20, "--precision", "bf16", *extra)) == 0
        rows = read_log(out)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5]), extra
        assert rows[-1]["memory_mb"] > 0


def test_eager_step_has_no_host_sync(data, tmp_path):
    cfg = {k: v[1] for k, v in OPTIONS.items()}
    cfg.update(data=data["data"], images=data["images"], vision=data["vision"], out=str(tmp_path / "run"),
               batch_size=4, max_txt_len=8, vocab_size=64, steps=10, model=MODEL, device="cuda", progress=False,
               num_workers=0, precision="bf16")
    tr = Trainer(cfg)
    try:
        tr.train_step()  # warm-up: Triton compilation and autotuning may synchronise
        batch = {k: v.pin_memory() for k, v in next(tr._iter).items()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            metrics = tr.stepper.micro(batch, 12345, last=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(metrics).all()
    finally:
        tr.runlog.close()
        tr.close()


def test_torchrun_nccl_equals_one_process(data, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    common = ("--precision", "fp32", "--max-txt-len", "6")
    assert main(_gpu_args(single, data, 4, *common, "--batch-size", "8")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "blipfast.cli"] + _gpu_args(multi, data, 4, *common, "--batch-size", "4")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for a, b in zip(read_log(single), read_log(multi)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
