"""``blipfast train --fsdp`` (FSDP2, docs/fsdp.md) with ``torchrun --nproc-per-node 2`` on CPUs (gloo): the units it
shards, a sharded run equal to one process holding the global batch (losses and weights, to float32 rounding), and
a sharded run stopped and resumed from its DCP checkpoint equal to the uninterrupted one bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from blipfast.cli import main
from blipfast.testing.data import write_images, write_jsonl, write_vision
from blipfast.train.fsdp import fsdp_units
from tests.helpers.train import NO_DROPOUT, global_batch_baseline, read_log, tiny_args, weights

LOSSES = ("loss", "loss_itc", "loss_itm", "loss_lm")


def test_fsdp_units_are_the_blocks_of_every_layer_stack():
    from transformers import (Blip2VisionConfig, Blip2VisionModel, OPTConfig, OPTForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    small = dict(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=2, num_decoder_layers=3)
    t5 = T5ForConditionalGeneration(T5Config(**small))
    assert [n for n, _ in fsdp_units(t5)] == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                              "decoder.block.1", "decoder.block.2"]
    opt = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16))
    assert [n for n, _ in fsdp_units(opt)] == ["model.decoder.layers.0", "model.decoder.layers.1"]

    class Both(torch.nn.Module):  # a stack nested in a block of another stack: the inner blocks come first
        def __init__(self):
            super().__init__()
            self.vit = Blip2VisionModel(Blip2VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=8, patch_size=4))
            self.outer = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))])
            self.mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])  # not a stack of one class

    units = fsdp_units(Both())
    names = [n for n, _ in units]
    assert names == ["outer.0.0.0", "vit.encoder.layers.0", "vit.encoder.layers.1", "outer.0"]
    with pytest.raises(TypeError, match="model"):
        fsdp_units("not a module")


def test_split_replicated_gives_the_scalars_groups_of_their_own_with_the_same_settings():
    from blipfast.train.fsdp import split_replicated

    w, b, t, u = (torch.nn.Parameter(torch.randn(s)) for s in ((3, 2), (3,), (), ()))
    opt = torch.optim.AdamW([{"params": [w, t], "weight_decay": 0.05, "lr_scale": 0.5},
                             {"params": [b], "weight_decay": 0.0}, {"params": [u], "weight_decay": 0.0}], lr=1e-3)
    split_replicated(opt, [t, u])
    got = [([id(p) for p in g["params"]], g["weight_decay"], g.get("lr_scale")) for g in opt.param_groups]
    assert got == [([id(w)], 0.05, 0.5), ([id(b)], 0.0, None), ([id(u)], 0.0, None), ([id(t)], 0.05, 0.5)]


def _torchrun(args: list, cwd: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "blipfast.cli"] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _single_and_sharded(args: list, tmp_path, losses=("loss",)) -> tuple:
    """``args`` run as one process with batch 4 and as 2 sharded processes with batch 2 each: the logged losses
    equal (float32 rounding); returns both runs' consolidated weights."""
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--out", single, "--batch-size", "4"]) == 0
    finally:
        torch.set_num_threads(n)
    _torchrun(args + ["--out", sharded, "--batch-size", "2", "--fsdp"], str(tmp_path))
    rs, rf = read_log(single), read_log(sharded)
    assert [r["step"] for r in rf] == [1, 2, 3]
    for a, b in zip(rs, rf):
        for k in losses:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])
    return weights(single), weights(sharded)


@pytest.mark.distributed
def test_fsdp_two_gloo_processes_equal_one_process_and_resume_bit_identically(tmp_path):
    common, extra, single = global_batch_baseline(tmp_path, steps=4)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    sharded = ["--batch-size", "3", "--fsdp", "--save-every", "2"]
    out = _torchrun(tiny_args(full, **common, extra=extra) + sharded, str(tmp_path))
    assert "2 process(es)" in out and "global batch 6" in out
    rs, rf = read_log(single), read_log(full)
    assert [r["step"] for r in rf] == [1, 2, 3, 4]
    for a, b in zip(rs, rf):
        for k in LOSSES:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])
    ws, wf = weights(single), weights(full)  # the consolidated model.safetensors of the sharded run
    assert ws.keys() == wf.keys()
    for k in ws:  # a fraction of one Adam step (lr 2e-3), as tests/train/test_distributed.py
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)
    ck = os.path.join(full, "checkpoint-00000004")
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "model.safetensors", "state.pt"} <= set(os.listdir(ck))
    assert "optimizer" not in torch.load(os.path.join(ck, "state.pt"), weights_only=True)
    # stopped after step 2, resumed from its DCP checkpoint: the same 4 steps bit for bit
    # (under torchrun a stopped run exits 0: the agent reports any other code as a failed worker)
    _torchrun(tiny_args(part, **common, extra=extra) + sharded + ["--stop-after", "2"], str(tmp_path))
    _torchrun(["train", "--resume", part, "--no-progress"], str(tmp_path))
    rp = read_log(part)
    keys = ("step", "lr") + LOSSES
    assert [[r[k] for k in keys] for r in rp] == [[r[k] for k in keys] for r in rf]
    wp = weights(part)
    assert wp.keys() == wf.keys() and all(torch.equal(wp[k], wf[k]) for k in wf)


def test_fsdp_refusals():
    from tests.helpers.train import make_trainer

    for flags, msg in ((["--fsdp"], "torchrun"), (["--fsdp", "--precision", "fp16"], "fp16"),
                       (["--fsdp", "--task", "blip-pretrain"], "cannot be sharded")):
        with pytest.raises(ValueError, match=msg):
            make_trainer(["train", "--device", "cpu", "--out", "/nonexistent/x", *flags])
    from blipfast.train.fsdp import check_run

    with pytest.raises(ValueError, match="--eval-every"):  # given: refused
        check_run({"eval_every": 1}, {"eval_every": 1}, 2, print)
    cfg, said = {"eval_every": 1}, []
    check_run(cfg, {}, 2, said.append)  # the task's default: off, and said
    assert cfg["eval_every"] == 0 and "no evaluation during training" in said[0]


@pytest.mark.distributed
def test_fsdp_blip2_caption_trains_the_vit_sharded_as_one_process_with_the_global_batch(tmp_path):
    """The ViT (fused, checkpointed blocks) trained and the frozen OPT's layers sharded: the same losses and trained
    weights as one process with the global batch; the consolidated checkpoint holds the trained parts only."""
    from tests.helpers.blip2_caption import write_lavis_stage1_no_vit
    from tests.helpers.stage2 import write_llm

    rows = write_images(str(tmp_path), 8, seed=3)
    data = write_jsonl(str(tmp_path / "ann.jsonl"), rows)
    args = ["train", "--task", "blip2-caption", "--data", data, "--images", str(tmp_path), "--vision",
            write_vision(str(tmp_path / "vit")), "--llm", write_llm(tmp_path / "llm", "opt"), "--init",
            write_lavis_stage1_no_vit(tmp_path / "stage1.pth"), "--steps", "3", "--max-txt-len", "6",
            "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1", "--no-progress", "--device", "cpu", "--seed",
            "7", "--save-every", "0", "--num-workers", "0", "--model", json.dumps(NO_DROPOUT)]
    ws, wf = _single_and_sharded(args, tmp_path)
    assert ws.keys() == wf.keys() and "vision_model.encoder.layers.1.mlp.fc1.weight" in wf
    assert not any("language_model" in k for k in wf)
    for k in ws:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.distributed
def test_fsdp_blip2_retrieval_trains_the_vit_sharded_as_one_process_with_the_global_batch(tmp_path):
    """Stage 1's objectives with image ids (repeated images) and the ViT trained, its blocks sharded: the same
    losses and trained weights as one process with the global batch."""
    from tests.helpers.train import TINY_MODEL

    rows = write_images(str(tmp_path), 6, seed=5)
    rows = [rows[0], {"image": rows[0]["image"], "caption": "the same picture again"}] + rows[1:] + \
        [{"image": rows[1]["image"], "caption": "one more view of it"}]
    data = write_jsonl(str(tmp_path / "ann.jsonl"), rows)
    vision = write_vision(str(tmp_path / "vit"))
    init = str(tmp_path / "stage1")
    assert main(tiny_args(init, data, str(tmp_path), vision, steps=1, model=TINY_MODEL,
                          extra=("--save-every", "1"))) == 0
    args = ["train", "--task", "blip2-retrieval", "--data", data, "--images", str(tmp_path), "--vision", vision,
            "--init", init, "--steps", "3", "--max-txt-len", "8", "--warmup-steps", "2", "--lr", "1e-3",
            "--log-every", "1", "--no-progress", "--device", "cpu", "--seed", "7", "--save-every", "0",
            "--num-workers", "0", "--model", json.dumps(NO_DROPOUT)]
    ws, wf = _single_and_sharded(args, tmp_path, LOSSES)
    assert ws.keys() == wf.keys() and "vision_model.encoder.layers.1.mlp.fc1.weight" in wf
    for k in ws:
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.distributed
def test_fsdp_blip2_vqa_trains_sharded_as_one_process_with_the_global_batch(tmp_path):
    """The InstructBLIP-form Q-Former (the question beside the queries) in the root unit, the ViT blocks and the
    frozen T5's blocks sharded: the same losses and trained weights as one process with the global batch."""
    from blipfast.data.vqa import make_synthetic_vqa
    from blipfast.testing import blip2 as T
    from tests.helpers.blip2_caption import write_lavis_stage1_no_vit
    from tests.helpers.stage2 import write_llm

    vqa = make_synthetic_vqa(str(tmp_path / "vqa"), 8, seed=1, image_size=16)
    qtok = str(tmp_path / "qtok")
    T.tokenizer("opt").save_pretrained(qtok)
    model = {"qformer_tokenizer": qtok, "qformer": NO_DROPOUT["qformer"]}
    args = ["train", "--task", "blip2-vqa", "--data", vqa["data"], "--images", vqa["images"], "--vision",
            write_vision(str(tmp_path / "vit")), "--llm", write_llm(tmp_path / "llm", "t5", seed=1), "--init",
            write_lavis_stage1_no_vit(tmp_path / "stage1.pth"), "--model", json.dumps(model), "--steps", "3",
            "--max-txt-len", "12", "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1", "--no-progress",
            "--device", "cpu", "--seed", "7", "--save-every", "0", "--num-workers", "0", "--eval-every", "0"]
    ws, wf = _single_and_sharded(args, tmp_path)
    assert ws.keys() == wf.keys() and "qformer.embeddings.word_embeddings.weight" in wf
    for k in ws:
        if k.endswith("attention.key.bias"):  # its gradient is 0 in exact arithmetic (softmax ignores a shift):
            # AdamW turns either run's rounding noise into steps of up to lr, so only that bound holds
            assert (wf[k] - ws[k]).abs().max() <= 2 * 3 * 1e-3, k
            continue
        torch.testing.assert_close(wf[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)


_CLIP = """
import torch, torch.distributed as dist, torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from blipfast.train.fsdp import clip_grad_norm
dist.init_process_group("gloo")
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
m.t = nn.Parameter(torch.tensor(2.0))  # a scalar: left whole, as wrap leaves BLIP-2's temp
ref = [torch.randn_like(p) for p in m.parameters()]
want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
mesh = init_device_mesh("cpu", (2,))
fully_shard(m[0], mesh=mesh, ignored_params={m.t})
fully_shard(m, mesh=mesh, ignored_params={m.t})
for p, g in zip(m.parameters(), ref):
    p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()
total = clip_grad_norm(list(m.parameters()), 0.5)
got = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in m.parameters()]
assert torch.allclose(total, want), (float(total), float(want))
for a, b in zip(got, ref):
    assert torch.allclose(a, b * (0.5 / (want + 1e-6)))
print("clip ok")
"""


@pytest.mark.distributed
def test_clip_grad_norm_over_shards_and_whole_parameters_is_the_models_norm(tmp_path):
    """--fsdp --grad-clip: the norm of every gradient (sharded and replicated) as one process computes it, and
    every gradient scaled by max_norm / norm."""
    script = tmp_path / "clip.py"
    script.write_text(_CLIP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("clip ok") == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
