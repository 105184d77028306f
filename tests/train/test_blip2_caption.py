"""``blipfast train --task blip2-caption`` (BLIP-2 caption fine-tuning with the ViT trained; docs/blip2-finetune.md) on
tiny models on a CPU: the task's step is LAVIS' ``Blip2OPT.forward`` with ``freeze_vit: False`` (restated in
blipfast/bench/blip2_finetune_baseline.py), the ViT's position table is LAVIS' ``interpolate_pos_embed`` of the
pre-trained one, a run trains, checkpoints the ViT and resumes bit for bit, and what it cannot use is refused."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from blipfast.cli import build_parser, main
from blipfast.options import EXIT_STOPPED
from blipfast.testing.data import write_images, write_jsonl, write_vision
from blipfast.train import Trainer
from blipfast.train.config import read_config_file, resolve
from tests.helpers.blip2_caption import write_lavis_stage1_no_vit
from tests.helpers.stage2 import write_lavis_stage1, write_llm
from tests.helpers.tolerance import (assert_close, assert_grads_equal_in_float64, assert_grads_within_torch_error,
                                     assert_within_torch_error)
from tests.helpers.train import read_log, weights
from tests.helpers.trained_vit import assert_resumed_run_is_identical, assert_vit_trained

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical runs, a 2-core CI (tests/conftest.py)

NO_DROPOUT = {"qformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("b2cap")
    rows = write_images(str(root), 8, seed=3)
    return {"root": str(root), "data": write_jsonl(str(root / "ann.jsonl"), rows),
            "vision": write_vision(str(root / "vit")), "opt": write_llm(root / "llm-opt", "opt"),
            "t5": write_llm(root / "llm-t5", "t5", seed=1), "init": write_lavis_stage1_no_vit(root / "stage1.pth"),
            "with_vit": write_lavis_stage1(root / "stage1-vit.pth")}


def args(parts, out, llm="opt", steps=4, extra=()) -> list:
    return ["train", "--task", "blip2-caption", "--out", out, "--data", parts["data"], "--images", parts["root"],
            "--vision", parts["vision"], "--llm", parts[llm], "--init", parts["init"], "--steps", str(steps),
            "--batch-size", "4", "--max-txt-len", "12", "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1",
            "--no-progress", "--device", "cpu", "--seed", "7", "--save-every", "0", *extra]


def _trainer(argv) -> Trainer:
    cfg, given = resolve(build_parser().parse_args(argv))
    return Trainer(cfg, given, log=lambda m: None)


def test_recipe_defaults_are_lavis_caption_coco_ft(parts, tmp_path):
    cfg, _ = resolve(build_parser().parse_args(["train", "--task", "blip2-caption", "--data", parts["data"]]))
    want = {"batch_size": 16, "epochs": 5.0, "lr": 1e-5, "warmup_lr": 1e-8, "warmup_steps": 1000, "min_lr": 0.0,
            "weight_decay": 0.05, "max_txt_len": 32, "prompt": "a photo of ", "text_suffix": "\n",
            "schedule": "reference", "param_groups": "reference"}
    assert {k: cfg[k] for k in want} == want


def test_trains_the_vit_checkpoint_holds_it_and_resume_is_bit_identical(parts, tmp_path):
    """6 steps == 3 (--stop-after) + --resume, losses and every trained tensor; the ViT (fused, checkpointed blocks,
    24 px from a 16-px ViT) moved and is in the checkpoint, the LLM is neither trained nor saved."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    extra = ("--save-every", "3")
    assert main(args(parts, full, steps=6, extra=extra)) == 0
    assert main(args(parts, part, steps=6, extra=extra + ("--stop-after", "3"))) == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    wf = assert_resumed_run_is_identical(full, part, 6, ("step", "loss", "lr", "epoch"))
    assert_vit_trained(wf, parts["vision"], 10)  # 3 x 3 patches + CLS
    assert not any("language_model" in k for k in wf)
    cfg = read_config_file(os.path.join(full, "config.yaml"))
    assert cfg["task"] == "blip2-caption" and cfg["model"]["image_size"] == 24
    assert cfg["model"]["vit_checkpoint"] == "all" and cfg["augment"] == "reference"
    # a checkpoint is an --init of its own: the ViT from it (no --vision), at its resolution
    again = args(parts, str(tmp_path / "again"), steps=1)
    again[again.index("--init") + 1] = full
    k = again.index("--vision")
    tr = _trainer(again[:k] + again[k + 2:])
    try:
        got = dict(tr.core.trainable_parameters())
        assert all(torch.equal(got[k], wf[k]) for k in wf)
    finally:
        tr.close()


def _lavis_interpolate_pos_embed(pos_embed: torch.Tensor, new_size: int) -> torch.Tensor:
    """LAVIS' ``eva_vit.interpolate_pos_embed`` (one extra token), restated."""
    pos = pos_embed.float()
    dim, orig = pos.shape[-1], int((pos.shape[-2] - 1) ** 0.5)
    tokens = pos[:, 1:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    return torch.cat((pos[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def test_position_table_is_lavis_interpolation_of_the_pretrained_vit(parts, tmp_path):
    """The 224 -> 364 rule on a tiny ViT (16 px, 2 x 2 patches of 8 -> 24 px, 3 x 3): the model's table is LAVIS'
    interpolation of the folder's, equal to HF's interpolate_pos_encoding, and the ViT takes 24-px pixels."""
    from transformers import Blip2VisionModel

    vit0 = Blip2VisionModel.from_pretrained(parts["vision"])
    tr = _trainer(args(parts, str(tmp_path / "run"), steps=1))
    try:
        vm = tr.core.model.vision_model
        got = vm.embeddings.position_embedding.detach()
        want = _lavis_interpolate_pos_embed(vit0.embeddings.position_embedding.detach(), 3)
        assert torch.equal(got, want)
        hf = vit0.embeddings.interpolate_pos_encoding(torch.zeros(1, 10, 24), 24, 24).detach()
        assert_close(got, hf, name="HF interpolate_pos_encoding")
        assert vm.embeddings.position_embedding.requires_grad and vm.config.image_size == 24
        assert tr.task.processor.size == {"height": 24, "width": 24}
        assert tr.core.vision_tokens(torch.randn(2, 3, 24, 24)).shape == (2, 10, 24)
        # --model image_size: another multiple of the patch
        tr2 = _trainer(args(parts, str(tmp_path / "run2"), steps=1, extra=("--model", '{"image_size": 32}')))
        try:
            assert torch.equal(tr2.core.model.vision_model.embeddings.position_embedding.detach(),
                               _lavis_interpolate_pos_embed(vit0.embeddings.position_embedding.detach(), 4))
        finally:
            tr2.close()
    finally:
        tr.close()


def _batch(tr) -> dict:
    rows = [tr.dataset[i] for i in range(4)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _grads(model, loss) -> dict:
    names = [n for n, _ in model.trainable_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, [p for _, p in model.trainable_parameters()])))


def test_step_equals_lavis_blip2_opt_forward_with_the_vit_trained(parts, tmp_path):
    """The task's loss (its tokenised batch: "a photo of " + caption + "\\n", the prompt masked) and the gradient of
    every trained tensor (ViT, ln_vision, Q-Former, queries, projection) equal LAVIS' step restated
    (lavis_caption_loss) to float64 rounding; in float32 the loss and the gradients are within PyTorch's own error (the tolerance rule); the LLM gets none."""
    from blipfast.bench.blip2_finetune_baseline import lavis_caption_loss

    tr = _trainer(args(parts, str(tmp_path / "run"), steps=1, extra=("--model", json.dumps(NO_DROPOUT))))
    try:
        batch, model = _batch(tr), tr.core
        text = {k: batch[k].long() for k in ("input_ids", "attention_mask", "labels")}
        assert (text["labels"][:, :4] == -100).all() and (text["labels"][:, 4] != -100).all()  # <s> a photo of
        names = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("vision_model") else "")
                 for n, _ in model.trainable_parameters()}
        assert names == {"vision_model.embeddings", "vision_model.encoder", "vision_model.post_layernorm",
                         "qformer", "query_tokens", "language_projection"}
        assert not any(p.requires_grad for p in model.language_model.parameters())

        def both(m, px):
            m.eval()  # (no dropout anywhere: the two sides draw no random numbers)
            mine, _ = tr.task.step_loss(m, px, text, None)
            ref = lavis_caption_loss(m, px, text["input_ids"], text["attention_mask"], text["labels"],
                                     checkpoint=True)
            return mine, ref

        m64 = copy.deepcopy(model).double()
        px = batch["pixel_values"]
        mine64, ref64 = both(m64, px.double())
        assert_close(mine64, ref64, name="loss (float64)")
        g_mine, g_ref = _grads(m64, mine64), _grads(m64, ref64)
        assert_grads_equal_in_float64(g_mine, g_ref)  # (key biases: 0 in exact arithmetic, compared at the scale)
        assert g_ref["vision_model.encoder.layers.0.mlp.fc1.weight"].abs().max() > 0
        mine32, ref32 = both(model, px)
        assert_within_torch_error(mine32.detach(), ref64.detach(), ref32.detach(), name="loss (float32)")
        assert_grads_within_torch_error(_grads(model, mine32), g_ref, _grads(model, ref32))
    finally:
        tr.close()


def test_t5_trains(parts, tmp_path):
    """Flan-T5 (the prompt in the encoder, the caption the decoder target): two steps, losses finite, the ViT moved."""
    out = str(tmp_path / "t5")
    assert main(args(parts, out, llm="t5", steps=2, extra=("--model", '{"vit_checkpoint": false}'))) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(out))
    assert "vision_model.encoder.layers.0.self_attn.qkv.weight" in weights(out)


def test_refusals_write_nothing(parts, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = args(parts, out, steps=1)
    i = base.index("--llm")
    no_llm = base[:i] + base[i + 2:]
    j = base.index("--vision")
    no_vision = base[:j] + base[j + 2:]
    for argv, msg in ((base + ["--features", parts["root"]], "--features cannot be used with --task blip2-caption"),
                      (no_llm, "--task blip2-caption needs --llm"),
                      (base + ["--cuda-graph"], "--cuda-graph"),
                      (base + ["--model", '{"image_sise": 24}'], "image_sise"),
                      (base + ["--model", '{"image_size": 20}'], "multiple of the ViT's patch size 8"),
                      (no_vision, "--vision VIT_DIR is needed"),
                      (base[:i + 1] + [parts["opt"], "--init", parts["with_vit"]] + base[i + 4:],
                       "do not fit the ViT of --vision")):
        assert main(argv) == 2, msg
        assert msg in capsys.readouterr().err, msg
        assert not os.path.exists(out), msg


def test_eval_every_captions_the_eval_file_with_lavis_coco_decoding(parts, tmp_path):
    """--eval-every 1: after the epoch every image of --eval-data is captioned (LAVIS' COCO decoding) and scored (or
    the scorer's absence logged), captions in RUN/captions-epoch1.jsonl."""
    out = str(tmp_path / "run")
    assert main(args(parts, out, steps=2, extra=("--eval-every", "1", "--eval-data", parts["data"]))) == 0
    with open(os.path.join(out, "eval.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["captions"] == 8
    assert "CIDEr" in rows[0] or rows[0]["scores"].startswith("unavailable")
    with open(os.path.join(out, "captions-epoch1.jsonl")) as fh:
        caps = [json.loads(line) for line in fh]
    assert len(caps) == 8 and all(isinstance(c["caption"], str) for c in caps)
