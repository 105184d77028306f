"""``blipfast train --task blip2-retrieval`` (BLIP-2 retrieval fine-tuning with the ViT trained; docs/blip2-finetune.md)
on tiny models on a CPU: the task's step is LAVIS' ``Blip2Qformer.forward`` with image ids and ``freeze_vit: False``
(the stage-1 restatement of blipfast/bench/stage1_baseline.py over the EVA ViT of
blipfast/bench/blip2_finetune_baseline.py), the optimizer groups are LAVIS' layer-wise ones, a run trains, evaluates,
checkpoints the ViT, resumes bit for bit and is read by ``blipfast retrieval``, and what it cannot use is refused."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from blipfast.cli import build_parser, main
from blipfast.options import EXIT_STOPPED
from blipfast.testing.data import write_images, write_jsonl, write_vision
from blipfast.train import Trainer
from blipfast.train.config import read_config_file, resolve
from tests.helpers.tolerance import assert_close, assert_grads_within_torch_error, assert_within_torch_error
from tests.helpers.train import NO_DROPOUT, TINY_MODEL, tiny_args
from tests.helpers.trained_vit import assert_resumed_run_is_identical, assert_vit_trained

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical runs, a 2-core CI (tests/conftest.py)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """8 pairs over 6 images (images 0 and 1 with two captions: image ids matter), a 24-wide 16-px ViT, and a tiny
    blip2-stage1 run on them (the --init, with its tokenizer)."""
    root = tmp_path_factory.mktemp("b2ret")
    rows = write_images(str(root), 6, seed=5)
    rows = [rows[0], {"image": rows[0]["image"], "caption": "the same picture again"}, rows[1],
            {"image": rows[1]["image"], "caption": "one more view of it"}] + rows[2:]
    data = write_jsonl(str(root / "ann.jsonl"), rows)
    vision = write_vision(str(root / "vit"))
    stage1 = str(root / "stage1")
    assert main(tiny_args(stage1, data, str(root), vision, steps=1, model=TINY_MODEL,
                          extra=("--save-every", "1"))) == 0
    return {"root": str(root), "data": data, "vision": vision, "init": stage1}


def args(parts, out, steps=4, extra=()) -> list:
    return ["train", "--task", "blip2-retrieval", "--out", out, "--data", parts["data"], "--images", parts["root"],
            "--vision", parts["vision"], "--init", parts["init"], "--steps", str(steps), "--batch-size", "4",
            "--max-txt-len", "8", "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1", "--no-progress",
            "--device", "cpu", "--seed", "7", "--save-every", "0", *extra]


def _trainer(argv) -> Trainer:
    cfg, given = resolve(build_parser().parse_args(argv))
    return Trainer(cfg, given, log=lambda m: None)


def test_recipe_defaults_are_lavis_retrieval_coco_ft(parts):
    cfg, _ = resolve(build_parser().parse_args(["train", "--task", "blip2-retrieval", "--data", parts["data"]]))
    want = {"batch_size": 14, "epochs": 5.0, "lr": 1e-5, "warmup_lr": 1e-8, "warmup_steps": 1000, "min_lr": 0.0,
            "weight_decay": 0.05, "max_txt_len": 32, "image_ids": True, "eval_every": 1,
            "schedule": "reference", "param_groups": "reference"}
    assert {k: cfg[k] for k in want} == want


def _grads(model, loss) -> dict:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


def test_step_equals_lavis_blip2_qformer_forward_with_image_ids_and_the_vit_trained(parts, tmp_path):
    """The task's losses (ITC with image-id soft targets, ITM with hard negatives never of the same image, ITG) and
    the gradient of every trained tensor (the ViT's included) equal LAVIS' Blip2Qformer.forward restated over LAVIS'
    EVA ViT (checkpointed) to float64 rounding, given the same negatives; in float32 within PyTorch's own error."""
    from blipfast.bench.blip2_finetune_baseline import lavis_vit_forward
    from blipfast.bench.stage1_baseline import lavis_stage1_forward

    tr = _trainer(args(parts, str(tmp_path / "run"), steps=1, extra=("--model", json.dumps(NO_DROPOUT))))
    try:
        model = tr.core
        rows = [tr.dataset[i] for i in (0, 1, 2, 4)]  # two pairs of one image, two of others
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        ids, mask, iid = batch["input_ids"], batch["attention_mask"], batch["image_id"]
        assert iid[0] == iid[1] and len(set(iid.tolist())) == 3
        tops = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert tops == {"query_tokens", "ln_vision", "qformer", "embeddings", "qformer_lm_head", "vision_projection",
                        "text_projection", "itm_head", "temp", "vision_model"}
        seed = torch.tensor([11], dtype=torch.int64)

        def both(m, px):
            m.eval()  # (no dropout anywhere: the two sides draw no random numbers but the negatives)
            out = m(px, ids, mask, image_ids=iid, sample_seed=seed)
            neg = (out.neg_text_index, out.neg_image_index)
            ref = lavis_stage1_forward(m, lavis_vit_forward(m.vision_model, px, checkpoint=True), ids, mask,
                                       image_ids=iid, negatives=neg)
            return out, ref

        m64 = copy.deepcopy(model).double()
        px = batch["pixel_values"]
        out64, ref64 = both(m64, px.double())
        for j in range(4):  # LAVIS' ITM negatives: never a pair of the same image
            assert iid[out64.neg_image_index[j]] != iid[j] and iid[out64.neg_text_index[j]] != iid[j]
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            assert_close(getattr(out64, k), ref64[k], name=f"{k} (float64)")
        loss, logged = tr.task.step_loss(m64, px.double(), batch, seed)
        assert torch.equal(loss, out64.loss) and logged.shape == (4,)
        g_mine, g_ref = _grads(m64, out64.loss), _grads(m64, ref64["loss"])
        assert set(g_mine) == set(g_ref)
        scale = max(g.abs().max().item() for g in g_ref.values())
        for n in g_ref:  # same mathematics: float64 rounding relative to the gradients' overall scale (as the stage-1
            err = (g_mine[n] - g_ref[n]).abs().max().item()  # model's parity test, tests/models/test_blip2.py)
            assert err <= 1e-11 * scale, f"{n}: {err:.3e} (scale {scale:.3e})"
        assert g_ref["vision_model.encoder.layers.0.mlp.fc1.weight"].abs().max() > 0
        assert g_ref["vision_model.embeddings.position_embedding"].abs().max() > 0
        out32, ref32 = both(model, px)
        assert_within_torch_error(out32.loss.detach(), ref64["loss"].detach(), ref32["loss"].detach(),
                                  name="loss (float32)")
        assert_grads_within_torch_error(_grads(model, out32.loss), g_ref, _grads(model, ref32["loss"]))
    finally:
        tr.close()


def _lavis_scale(name: str, layers: int, decay: float):
    """LAVIS' Blip2Base.get_optimizer_params on the ViT (EVA's get_num_layer, restated on transformers' names):
    the lr_scale of a parameter, 1 outside the ViT."""
    if not name.startswith("vision_model."):
        return 1
    rest = name[len("vision_model."):]
    layer = 0 if rest.startswith("embeddings.") else int(rest.split(".")[2]) + 1 \
        if rest.startswith("encoder.layers.") else layers
    return decay ** (layers + 1 - layer)


@pytest.mark.parametrize("how", ["reference", "layer-decay"])
def test_optimizer_groups_are_lavis_layer_wise_groups(parts, tmp_path, how):
    """Every trained parameter's group: LAVIS' decay rule (none on 1-d tensors and biases) and lr_scale 0.95 **
    (L + 1 - layer id) on the ViT; ``reference`` gives every group the schedule's lr (LAVIS' schedulers ignore
    lr_scale), ``layer-decay`` lr * lr_scale."""
    tr = _trainer(args(parts, str(tmp_path / how), steps=1, extra=("--param-groups", how)))
    try:
        by_id = {id(p): n for n, p in tr.core.named_parameters() if p.requires_grad}
        seen, lr = set(), tr.schedule.current()
        for g in tr.optimizer.param_groups:
            for p in g["params"]:
                n = by_id[id(p)]
                seen.add(n)
                assert g["weight_decay"] == (0.0 if p.ndim == 1 or n.endswith(".bias") else 0.05), n
                assert g["lr_scale"] == pytest.approx(_lavis_scale(n, 2, 0.95), rel=1e-15), n
                assert g["lr"] == pytest.approx(lr * (g["lr_scale"] if how == "layer-decay" else 1), rel=1e-12), n
        assert seen == set(by_id.values())
        scales = {g["lr_scale"] for g in tr.optimizer.param_groups}
        assert scales == {1, 0.95, 0.95 ** 2, 0.95 ** 3}
    finally:
        tr.close()


def test_trains_evaluates_checkpoints_the_vit_and_resumes_bit_identically(parts, tmp_path):
    """4 steps == 2 (--stop-after) + --resume: losses, every tensor and the recall@K rows of both evaluations; the
    ViT moved and is in the checkpoint (HF names, 24 px from the 16-px ViT; --save-lavis: LAVIS names);
    ``blipfast retrieval --model RUN`` scores the gallery as the run's last evaluation did."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    extra = ("--save-every", "2", "--eval-every", "1", "--eval-data", parts["data"])
    assert main(args(parts, full, extra=extra + ("--save-lavis",))) == 0
    assert main(args(parts, part, extra=extra + ("--stop-after", "2"))) == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    wf = assert_resumed_run_is_identical(full, part, 4, ("step", "loss", "loss_itc", "loss_itm", "loss_lm", "lr",
                                                          "epoch"))
    assert_vit_trained(wf, parts["vision"], 10)  # 24 px from the 16-px ViT: 3 x 3 patches + CLS
    assert "vision_model.post_layernorm.weight" in wf and "ln_vision.weight" not in wf  # HF names
    lavis = torch.load(os.path.join(full, "checkpoint-00000004", "lavis.pth"), weights_only=True)["model"]
    assert "visual_encoder.blocks.1.mlp.fc1.weight" in lavis and "ln_vision.weight" in lavis
    cfg = read_config_file(os.path.join(full, "config.yaml"))
    assert cfg["task"] == "blip2-retrieval" and cfg["model"]["image_size"] == 24 and cfg["model"]["k_test"] == 128

    def evals(run):
        with open(os.path.join(run, "eval.jsonl")) as fh:
            return [json.loads(line) for line in fh]
    ef, ep = evals(full), evals(part)
    assert [r["step"] for r in ef] == [2, 4] and ef == ep
    assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"} <= set(ef[-1])
    assert ef[-1]["txt_r10"] == 100.0  # 6 images, 10 candidates: every caption's image is among them
    out = str(tmp_path / "scores")
    assert main(["retrieval", "--model", full, "--data", parts["data"], "--images", parts["root"], "--out", out,
                 "--device", "cpu", "--workers", "0", "--no-progress", "--max-txt-len", "16"]) == 0
    with open(os.path.join(out, "metrics.json")) as fh:
        got = json.load(fh)["metrics"]
    assert {k: round(v, 4) for k, v in got.items()} == {k: v for k, v in ef[-1].items() if k in got}
    # a run is an --init of its own: its ViT (no --vision) at its resolution, its tokenizer
    again = args(parts, str(tmp_path / "again"), steps=1)
    again[again.index("--init") + 1] = full
    k = again.index("--vision")
    tr = _trainer(again[:k] + again[k + 2:])
    try:
        got = {n: p for n, p in tr.task.hf_state_dict(tr.core).items()}
        assert got.keys() == wf.keys() and all(torch.equal(got[n], wf[n]) for n in wf)
    finally:
        tr.close()


def test_refusals_write_nothing(parts, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = args(parts, out, steps=1)
    i = base.index("--init")
    no_init = base[:i] + base[i + 2:]
    for argv, msg in ((base + ["--features", parts["root"]], "--features cannot be used with --task blip2-retrieval"),
                      (no_init, "--task blip2-retrieval needs --init"),
                      (base + ["--no-image-ids"], "--no-image-ids cannot be used with --task blip2-retrieval"),
                      (base + ["--model", '{"image_sise": 24}'], "image_sise"),
                      (base + ["--model", '{"k_test": 0}'], "k_test must be an int >= 1"),
                      (base + ["--model", '{"lr_layer_decay": 1.5}'], "lr_layer_decay must be a number in (0, 1]"),
                      (base + ["--model", '{"image_size": 20}'], "multiple of the ViT's patch size 8"),
                      (base + ["--llm", parts["root"]], "--llm, --prompt and --text-suffix")):
        assert main(argv) == 2, msg
        assert msg in capsys.readouterr().err, msg
        assert not os.path.exists(out), msg


def test_init_from_a_lavis_stage1_checkpoint(parts, tmp_path):
    """A LAVIS-named stage-1 .pth (Q-Former config from its shapes) with --vision and --tokenizer (a BERT vocabulary
    of its Q-Former's size with [DEC]): the model holds its weights and a step trains; a tokenizer of another size
    is refused, naming --tokenizer."""
    from transformers import BertTokenizerFast

    from blipfast import convert
    from blipfast.testing import blip2 as T
    from tests.helpers.blip2_caption import write_lavis_stage1_no_vit

    init = write_lavis_stage1_no_vit(tmp_path / "stage1.pth")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + T.WORDS[:len(T.VOCAB) - 6]  # + [DEC]: len(T.VOCAB)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(tmp_path / "tok"))
    argv = args(parts, str(tmp_path / "run"), steps=1, extra=("--tokenizer", str(tmp_path / "tok")))
    argv[argv.index("--init") + 1] = init
    tr = _trainer(argv)
    try:
        sd = convert.to_hf(convert.load_state_dict(init))[0].state_dict
        got = tr.task.hf_state_dict(tr.core)
        for k in ("query_tokens", "qformer.encoder.layer.1.output.dense.weight", "itm_head.weight",
                  "vision_model.post_layernorm.weight"):
            assert torch.equal(got[k], sd[k]), k
        assert tr.core.config.qformer.hidden_size == 64 and len(tr.tokenizer) == len(T.VOCAB)
        assert torch.isfinite(tr.train_step()).all()
    finally:
        tr.close()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + ["a", "b"])}).save_pretrained(str(tmp_path / "tok2"))
    argv[argv.index("--tokenizer") + 1] = str(tmp_path / "tok2")
    argv[argv.index("--out") + 1] = str(tmp_path / "run2")
    with pytest.raises(ValueError, match="--tokenizer: 8 tokens, but the Q-Former of --init"):
        _trainer(argv)
