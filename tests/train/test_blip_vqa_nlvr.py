"""``blipfast train --task blip-vqa`` and ``--task blip-nlvr`` end to end on a CPU (the synthetic sets, tiny models):
a few steps, a checkpoint, ``--resume`` bit-identical to the uninterrupted run, the run's model evaluated at the
end of an epoch (``--eval-every``: VQA rank inference scored by the official VQA accuracy, NLVR2 accuracy) as
``score_split`` scores its checkpoint, ``--answer-list``; the recipes' defaults; the data's fixed
shapes (answer slots, swapped sentences) and NLVR2's left/right swap on the device."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.cli import main
from blipfast.options import EXIT_STOPPED
from blipfast.train.checkpoint import list_checkpoints
from blipfast.train.tasks import task_class
from blipfast.vqa_nlvr import load_task_model
from tests.helpers.train import read_log, weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"text": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
                 "max_position_embeddings": 40},
        "vision": {"image_size": 16, "hidden_size": 24, "intermediate_size": 48, "num_attention_heads": 2}}


def _args(task, out, steps, extra=()):
    return ["train", "--task", task, "--out", out, "--steps", str(steps), "--batch-size", "4", "--synthetic-size",
            "24", "--vocab-size", "96", "--log-every", "1", "--no-progress", "--device", "cpu", "--seed", "3",
            "--model", json.dumps(TINY), *extra]


@pytest.mark.parametrize("task", ["blip-vqa", "blip-nlvr"])
def test_train_resume_and_evaluate(task, tmp_path):
    """Of the 24 synthetic rows 20 train (5 steps per epoch at batch 4): a run evaluated after epoch 1, stopped there
    and resumed equals an uninterrupted run without evaluation (losses, weights: the evaluation draws no training
    randomness); its RUN/eval.jsonl row is ``score_split`` of the step-5 checkpoint."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(_args(task, full, 6, ("--eval-every", "0"))) == 0
    assert main(_args(task, part, 6, ("--eval-every", "1", "--stop-after", "5"))) == EXIT_STOPPED
    assert len(read_log(part)) == 5
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    assert [r["loss"] for r in read_log(part)] == [r["loss"] for r in read_log(full)]
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not os.path.exists(os.path.join(full, "eval.jsonl"))
    with open(os.path.join(part, "eval.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert [(r.pop("step"), r.pop("epoch")) for r in rows] == [(1 * 5, 1)]  # once, not again after --resume
    kind = task.split("-")[1]
    ckpt = list_checkpoints(part)[0]
    assert int(ckpt.rsplit("-", 1)[1]) == 5
    model, tok = load_task_model(ckpt, kind)
    assert model.config.vision.image_size == 16
    syn = os.path.join(part, "synthetic")
    t = task_class(task)({"image_ids": False})
    if kind == "vqa":
        res = t.score_split(model, tok, os.path.join(syn, "vqa_eval.json"), os.path.join(syn, "images"),
                            answer_list=os.path.join(syn, "vqa_answer_list.json"), batch_size=4)
        assert 0.0 <= res["overall"] <= 100.0 and res["coverage"]["scored"] == 24 // 5
        assert rows == [{"overall": res["overall"], **{f"coverage_{k}": v for k, v in res["coverage"].items()}}]
    else:
        res = t.score_split(model, tok, os.path.join(syn, "nlvr2_eval.json"), os.path.join(syn, "images"),
                            batch_size=4)
        assert 0.0 <= res["accuracy"] <= 100.0 and "consistency" in res
        assert rows == [{"accuracy": res["accuracy"], "consistency": res["consistency"],
                         **{f"coverage_{k}": v for k, v in res["coverage"].items()}}]


def test_vqa_eval_needs_an_answer_list(tmp_path, capsys):
    """--eval-every with blip-vqa on real data needs --answer-list (the synthetic set brings its own); --answer-list
    is VQA's only."""
    data = tmp_path / "q.json"
    data.write_text("[]")
    out = str(tmp_path / "refused")
    args = ["train", "--task", "blip-vqa", "--data", str(data), "--images", str(tmp_path), "--out", out,
            "--device", "cpu", "--eval-every", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--eval-every 1 with --task blip-vqa needs --answer-list FILE" in err and not os.path.exists(out)
    assert main(["train", "--task", "blip-nlvr", "--out", out, "--answer-list", str(data)]) == 2
    assert "--answer-list is an option of --task blip-vqa" in capsys.readouterr().err and not os.path.exists(out)


def test_eval_files_and_defaults(tmp_path):
    """Without --eval-data the synthetic set's evaluation file (and VQA's answer list), nothing on other data;
    NLVR2 evaluates every epoch as train_nlvr.py does, VQA only when asked (train_vqa.py scores the test split once,
    after training)."""
    vqa, nlvr = task_class("blip-vqa"), task_class("blip-nlvr")
    syn = str(tmp_path / "run" / "synthetic")
    cfg = {"out": str(tmp_path / "run"), "data": os.path.join(syn, "vqa_data.json"), "eval_data": None,
           "answer_list": None, "image_ids": False}
    assert vqa(cfg).eval_data(cfg) == os.path.join(syn, "vqa_eval.json")
    assert vqa(cfg).score_options(cfg) == {"answer_list": os.path.join(syn, "vqa_answer_list.json")}
    assert nlvr(cfg).eval_data(cfg) == os.path.join(syn, "nlvr2_eval.json")
    assert nlvr(cfg).eval_data({**cfg, "data": str(tmp_path / "train.json")}) is None
    assert nlvr(cfg).eval_data({**cfg, "eval_data": "dev.json"}) == "dev.json"
    assert vqa(cfg).score_options({**cfg, "answer_list": "a.json"}) == {"answer_list": "a.json"}
    assert nlvr.defaults["eval_every"] == 1 and "eval_every" not in vqa.defaults


def test_recipes_are_blips():
    import argparse

    from blipfast.train.config import add_arguments, resolve

    p = argparse.ArgumentParser()
    add_arguments(p)
    keys = ("lr", "batch_size", "epochs", "min_lr", "warmup_steps", "weight_decay", "max_txt_len")
    cfg, _ = resolve(p.parse_args(["--task", "blip-vqa", "--data", "x.json"]))
    assert tuple(cfg[k] for k in keys) == (2e-5, 16, 10.0, 0.0, 0, 0.05, 35)
    cfg, _ = resolve(p.parse_args(["--task", "blip-nlvr", "--data", "x.json"]))
    assert tuple(cfg[k] for k in keys) == (3e-5, 16, 15.0, 0.0, 0, 0.05, 64)
    vqa, nlvr = task_class("blip-vqa"), task_class("blip-nlvr")
    assert vqa.recipe == nlvr.recipe == "blip-finetune" and vqa.k_test == 128
    from blipfast.models.blip_nlvr import BlipNLVRConfig
    from blipfast.models.blip_vqa import BlipVQAConfig

    assert BlipVQAConfig().vision.image_size == 480 and BlipNLVRConfig().vision.image_size == 384
    assert BlipVQAConfig().drop_path_rate == BlipNLVRConfig().drop_path_rate == 0.1


def test_vqa_answer_slots(tmp_path):
    """Each question's answers in fixed slots with BLIP's weights; unused slots [CLS] alone with weight 0."""
    from blipfast.data.tokenizer import train_wordpiece
    from blipfast.data.vqa import read_vqa

    rows = [{"image": "a.png", "question": "What color?", "answer": ["red"] * 6 + ["blue"] * 3 + ["pink"],
             "dataset": "vqa", "question_id": 5},
            {"image": "b.png", "question": "Which shape?", "answer": "a round circle", "dataset": "vg"}]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(rows))
    t = task_class("blip-vqa")({"image_ids": False})
    t.ann = ann = read_vqa(str(path), check_images=False)
    assert ann.answers == [["red", "blue", "pink"], ["a round circle"]]
    assert ann.weights[0] == pytest.approx([0.6, 0.3, 0.1]) and ann.weights[1] == [0.2]
    tok = train_wordpiece(t.tokenizer_texts(ann), 80)

    class _M:
        class config:
            class text:
                max_position_embeddings = 40

    out = t.tokenize(_M, tok, ann.captions, {"max_txt_len": 8})
    assert out["answer_ids"].shape == (2, 3, 5) and out["answer_weight"].dtype == torch.float32
    assert torch.allclose(out["answer_weight"], torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.0, 0.0]]))
    assert out["answer_mask"][1, 1:].sum() == 2 and (out["answer_ids"][1, 1:, 0] == tok.cls_token_id).all()
    assert tok.decode(out["answer_ids"][1, 0], skip_special_tokens=True) == "a round circle"


def test_nlvr_swap_on_the_device():
    """The swap flips both images and takes the swapped sentence for the same examples, drawn from the step's seed
    and the example indices: the same draw for the same (seed, index), about half of the examples."""
    t = task_class("blip-nlvr")
    n = 256
    inp = {"pixel_values": torch.randn(n, 2, 3, 2, 2), "input_ids": torch.zeros(n, 3, dtype=torch.long),
           "attention_mask": torch.ones(n, 3, dtype=torch.bool), "swapped_ids": torch.ones(n, 3, dtype=torch.long),
           "swapped_mask": torch.ones(n, 3, dtype=torch.bool), "image_id": torch.arange(n)}
    seed = torch.tensor([11])
    px, ids, mask = t.swap(inp, seed)
    swapped = ids[:, 0] == 1
    assert 0.35 < swapped.double().mean() < 0.65
    assert torch.equal(px[swapped], inp["pixel_values"][swapped].flip(1))
    assert torch.equal(px[~swapped], inp["pixel_values"][~swapped])
    assert torch.equal(t.swap(inp, seed)[1], ids) and not torch.equal(t.swap(inp, torch.tensor([12]))[1], ids)
    from blipfast.data.nlvr2 import swapped_sentence

    assert swapped_sentence("the left image has more dogs than the right") == \
        "the right image has more dogs than the left"
    assert swapped_sentence("left, right") == "left, left"  # BLIP swaps whole words only
