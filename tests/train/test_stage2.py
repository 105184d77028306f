"""``blipfast train --stage 2`` end to end on a CPU: blipfast.Blip2Stage2 on the stage-1 trainer, with tiny random
OPT-style and T5-style LLM folders, a stage-1 run folder written by ``blipfast train`` itself (Q-Former 32 wide,
two 16-wide heads: its config comes from the run's config.yaml) and a LAVIS-named stage-1 .pth (its config from
the weights' shapes). Training from images and from ``cache-features`` output, exact resume, the frozen LLM, the
checkpoint's contents, bad options, and 2 gloo processes against one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from blipfast.cli import build_parser, main
from blipfast.options import EXIT_STOPPED
from blipfast.train import Trainer
from blipfast.train.checkpoint import list_checkpoints
from blipfast.train.config import read_config_file, resolve
from blipfast.testing.data import write_images, write_jsonl, write_vision
from tests.helpers.stage2 import stage2_args, write_lavis_stage1, write_llm
from tests.helpers.train import read_log, tiny_args, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical runs, a 2-core CI (tests/conftest.py)

NO_DROPOUT = json.dumps({"qformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    rows = write_images(str(root), 16, seed=5)
    p = {"root": str(root), "data": write_jsonl(str(root / "ann.jsonl"), rows),
         "data4": write_jsonl(str(root / "ann4.jsonl"), rows[:4]), "vision": write_vision(str(root / "vit")),
         "opt": write_llm(root / "llm-opt", "opt"), "t5": write_llm(root / "llm-t5", "t5", seed=1),
         "lavis": write_lavis_stage1(root / "stage1.pth"), "stage1": str(root / "stage1-run")}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # stage 1 as a user runs it: one step of `blipfast train` (Q-Former dropout on, as its default)
        assert main(tiny_args(p["stage1"], p["data"], p["root"], p["vision"], steps=1)) == 0
    finally:
        torch.set_num_threads(n)
    return p


def _trainer(argv) -> Trainer:
    cfg, given = resolve(build_parser().parse_args(argv))
    return Trainer(cfg, given, log=lambda m: None)


def test_stage2_opt_loss_goes_down_llm_frozen_checkpoint_holds_the_trained_parts(parts, tmp_path):
    """A tiny repeated batch (4 pairs, batch 4) with a prompt: the loss goes down, the LLM is bit-for-bit the
    folder's after training, every trained tensor moved, and the checkpoint holds exactly the trained tensors (a
    from_pretrained_parts stage1= on its own, and a LAVIS export with opt_proj)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from blipfast import Blip2Stage2

    out = str(tmp_path / "run")
    tr = _trainer(stage2_args(out, parts["opt"], parts["stage1"], parts["data4"], parts["root"], parts["vision"],
                              steps=30, extra=("--prompt", "a photo of", "--save-lavis")))
    try:
        start = {n: p.detach().clone() for n, p in tr.core.trainable_parameters()}
        # labels: -100 on "<s> a photo of" (4 tokens), then the caption and </s>; 12 tokens, no padding needed
        ids, labels = tr.dataset.text["input_ids"], tr.dataset.text["labels"]
        assert tr.tokenizer.convert_ids_to_tokens(ids[0, :5].tolist()) == ["<s>", "a", "photo", "of", "a"]
        assert (labels[:, :4] == -100).all() and torch.equal(labels[:, 4:], ids[:, 4:])
        tr.run()
    finally:
        tr.close()
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "images_per_s", "memory_mb", "time_s", "data_wait_s"}
    first, last = (sum(r["loss"] for r in rows[a:b]) / 5 for a, b in ((0, 5), (25, 30)))
    assert last < first - 0.5, (first, last)
    with open(os.path.join(out, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    cfg = read_config_file(os.path.join(out, "config.yaml"))
    assert cfg["stage"] == 2 and cfg["tokenizer"] == parts["opt"] and cfg["batch_size"] == 4
    assert cfg["model"]["qformer"]["hidden_size"] == 32 and cfg["model"]["ln_vision_eps"] == 1e-5

    # the LLM is the folder's, the ViT unchanged; every trained tensor moved
    llm = AutoModelForCausalLM.from_pretrained(parts["opt"]).state_dict()
    got = tr.core.language_model.state_dict()
    assert got.keys() == llm.keys() and all(torch.equal(got[k], llm[k]) for k in llm)
    assert all(p.grad is None for p in tr.core.language_model.parameters())
    vit = tr.stepper.tower.model
    fresh = type(vit).from_pretrained(parts["vision"]).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in vit.state_dict().items())
    trained = dict(tr.core.trainable_parameters())
    assert {n.split(".")[0] for n in trained} == {"qformer", "query_tokens", "vision_model", "language_projection"}
    assert all(not torch.equal(trained[n], start[n]) for n in trained), [n for n in trained
                                                                       if torch.equal(trained[n], start[n])]

    # the checkpoint: exactly the trained tensors, a valid stage1= of from_pretrained_parts, a LAVIS export
    ck = list_checkpoints(out)[-1]
    sd = load_file(os.path.join(ck, "model.safetensors"))
    assert sd.keys() == trained.keys() and all(torch.equal(sd[n], trained[n]) for n in sd)
    again = Blip2Stage2.from_pretrained_parts(ck, parts["opt"])
    assert all(torch.equal(v, sd[k]) for k, v in again.trainable_state_dict().items())
    assert again.model.vision_model.post_layernorm.eps == 1e-5
    assert again.model.config.qformer_config.num_attention_heads == 2
    lavis = torch.load(os.path.join(ck, "lavis.pth"), weights_only=True)["model"]
    assert torch.equal(lavis["opt_proj.weight"], sd["language_projection.weight"])
    assert torch.equal(lavis["ln_vision.weight"], sd["vision_model.post_layernorm.weight"])


def test_stage2_from_cached_features_equals_from_images(parts, tmp_path):
    """From a LAVIS .pth, OPT: training from `cache-features` output equals training from images without
    augmentation (--augment none: the cache holds the processor's view), bit for bit."""
    feats = str(tmp_path / "feats")
    assert main(["cache-features", "--data", parts["data"], "--images", parts["root"], "--vision", parts["vision"],
                 "--out", feats, "--batch-size", "5", "--num-workers", "0", "--no-progress", "--device", "cpu"]) == 0
    a, b = str(tmp_path / "img"), str(tmp_path / "feat")
    assert main(stage2_args(a, parts["opt"], parts["lavis"], parts["data"], parts["root"], parts["vision"],
                            extra=("--augment", "none"))) == 0
    assert main(stage2_args(b, parts["opt"], parts["lavis"], parts["data"], features=feats)) == 0
    ra, rb = read_log(a), read_log(b)
    assert len(ra) == 6 and [r["loss"] for r in ra] == [r["loss"] for r in rb]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the Q-Former's config came from the weights' shapes (64-wide heads)
    assert read_config_file(os.path.join(a, "config.yaml"))["model"]["qformer"]["hidden_size"] == 64


def test_stage2_t5_resume_is_bit_identical(parts, tmp_path):
    """T5 (seq2seq: the prompt in the encoder, the caption the decoder target), Q-Former dropout on, two
    micro-steps per step: 8 steps == 4 steps (--stop-after) + --resume, losses and weights."""
    extra = ("--grad-accum", "2", "--save-every", "2", "--prompt", "a photo of")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = dict(llm=parts["t5"], init=parts["stage1"], data=parts["data"], images=parts["root"],
                vision=parts["vision"], steps=8)
    assert main(stage2_args(full, **args, extra=extra)) == 0
    assert main(stage2_args(part, **args, extra=extra + ("--stop-after", "4"))) == EXIT_STOPPED
    assert [r["step"] for r in read_log(part)] == [1, 2, 3, 4]
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    rf, rp = read_log(full), read_log(part)
    assert [[r[k] for k in ("step", "loss", "lr", "epoch")] for r in rp] == \
        [[r[k] for k in ("step", "loss", "lr", "epoch")] for r in rf]
    wf, wp = weights(full), weights(part)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)
    assert any(k.startswith("language_projection.") for k in wf) and not any("language_model" in k for k in wf)
    # the run's options, the stage among them, cannot change on resume
    assert main(["train", "--resume", part, "--stage", "1"]) == 2


def test_stage2_refused_runs_write_nothing(parts, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--out", out, "--data", parts["data"], "--features", parts["root"], "--no-progress",
            "--device", "cpu"]
    empty = tmp_path / "empty"
    empty.mkdir()
    img = ["--images", parts["root"], "--vision", parts["vision"]]
    for bad, msg in (
            (["--stage", "2", "--init", parts["lavis"]], "--stage 2 needs --llm"),
            (["--stage", "2", "--llm", parts["opt"]], "--stage 2 needs --init"),
            (["--stage", "2", "--llm", str(tmp_path / "nope"), "--init", parts["lavis"]], "is not a folder"),
            (["--llm", parts["opt"]], "options of --stage 2"),
            (["--prompt", "a photo of"], "options of --stage 2"),
            (["--stage", "2", "--llm", parts["opt"], "--init", parts["lavis"], "--cuda-graph"], "--cuda-graph"),
            (["--stage", "3"], "invalid choice")):
        if msg == "invalid choice":
            with pytest.raises(SystemExit):
                main(base + bad)
            assert msg in capsys.readouterr().err
            continue
        assert main(base + bad) == 2, msg
        assert msg in capsys.readouterr().err, msg
        assert not os.path.exists(out), msg
    base = base[:5] + ["--no-progress", "--device", "cpu", "--batch-size", "4"] + img
    for bad, msg in ((["--llm", str(empty), "--init", parts["lavis"]], "--llm: cannot load a tokenizer"),
                     (["--llm", parts["opt"], "--init", str(tmp_path / "nope.pth")], "--init: "),
                     (["--llm", parts["opt"], "--init", parts["lavis"], "--model", '{"qformer": {"hidden_sise": 3}}'],
                      "qformer.hidden_sise"),
                     (["--llm", parts["opt"], "--init", parts["vision"]], "cannot build the model")):
        assert main(base + ["--stage", "2"] + bad) == 2, msg
        assert msg in capsys.readouterr().err, msg
        assert not os.path.exists(out), msg


@pytest.mark.distributed
def test_stage2_torchrun_two_gloo_processes_equal_one_process_with_the_global_batch(parts, tmp_path):
    """Each rank takes its half of every global batch and DDP averages the gradients. With dropout off and every
    caption truncated to the same length (so each rank's LM loss averages as many tokens), the logged losses and
    the weights equal one process with twice the batch."""
    common = dict(llm=parts["opt"], init=parts["stage1"], data=parts["data"], images=parts["root"],
                  vision=parts["vision"], steps=3)
    # 7 words + <s> + </s>: 6 tokens truncate every caption (no padding anywhere)
    extra = ("--max-txt-len", "6", "--num-workers", "0", "--model", NO_DROPOUT)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    assert main(stage2_args(single, **common, extra=extra + ("--batch-size", "4"))) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "blipfast.cli"] + stage2_args(multi, **common, extra=extra + ("--batch-size", "2"))
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 process(es)" in proc.stdout and "global batch 4" in proc.stdout
    rs, rm = read_log(single), read_log(multi)
    assert [r["step"] for r in rm] == [1, 2, 3]
    for a, b in zip(rs, rm):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
    ws, wm = weights(single), weights(multi)  # to a fraction of one Adam step (lr 2e-3), as stage 1's test
    assert ws.keys() == wm.keys()
    for k in ws:
        torch.testing.assert_close(wm[k], ws[k], rtol=1e-4, atol=1e-4, msg=k)
