"""``blipfast train --task blip-retrieval`` and ``--task blip-caption`` end to end on a CPU: images the test writes
(two captions per image, with image ids), a tiny model, an evaluation split; per task a run through an epoch's end
(the evaluation in RUN/eval.jsonl), a run stopped early and resumed (bit-identical losses, weights and
evaluation), the Salesforce-named export loading back; the recipes' defaults and the refusals; ``--init`` from a
Salesforce-named pre-training checkpoint at another resolution."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from blipfast.cli import main
from blipfast.options import EXIT_STOPPED
from blipfast.train.config import add_arguments, read_config_file, resolve
from blipfast.testing.data import write_images
from tests.helpers.train import read_log, tiny_args, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)

TEXT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
        "max_position_embeddings": 16, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VISION = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 16, "patch_size": 8}
MODELS = {"blip-retrieval": {"embed_dim": 16, "queue_size": 32, "k_test": 4, "text": TEXT, "vision": VISION},
          "blip-caption": {"max_length": 14, "min_length": 10, "num_beams": 2, "text": TEXT, "vision": VISION}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 images with two captions each (16 pairs: 4 steps of 4 per epoch) and a 4-image evaluation split."""
    root = tmp_path_factory.mktemp("finetune")
    rows = write_images(str(root), 8, seed=5)
    train = [{"image": r["image"], "caption": [r["caption"], "a picture with " + r["caption"]], "image_id": f"im{i}"}
             for i, r in enumerate(rows)]
    test = [{"image": r["image"], "caption": [r["caption"], r["caption"].replace(" on a ", " over a ")]}
            for r in rows[:4]]
    for name, obj in (("train.json", train), ("test.json", test)):
        (root / name).write_text(json.dumps(obj))
    return {"root": str(root), "train": str(root / "train.json"), "test": str(root / "test.json")}


def _args(task, out, dataset, steps, extra=()):
    return tiny_args(out, dataset["train"], dataset["root"], steps=steps, model=MODELS[task],
                     extra=("--task", task, "--max-txt-len", "12", "--eval-data", dataset["test"]) + tuple(extra))


@pytest.mark.parametrize("task", ["blip-retrieval", "blip-caption"])
def test_run_evaluate_resume_bit_identically(task, dataset, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(_args(task, full, dataset, 5, ("--save-lavis",))) == 0
    assert main(_args(task, part, dataset, 5, ("--stop-after", "2"))) == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    rows = read_log(full)
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert [r["loss"] for r in read_log(part)] == [r["loss"] for r in rows]
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [[json.loads(line) for line in open(os.path.join(run, "eval.jsonl"))] for run in (full, part)]
    assert evals[0] == evals[1] and [(e["step"], e["epoch"]) for e in evals[0]] == [(4, 1)]
    cfg = read_config_file(os.path.join(full, "config.yaml"))
    assert cfg["task"] == task and "name" not in cfg["model"] and cfg["eval_every"] == 1
    ckpt = sorted(p for p in os.listdir(full) if p.startswith("checkpoint-"))[-1]
    lavis = os.path.join(full, ckpt, "lavis.pth")
    if task == "blip-retrieval":
        from blipfast.models.blip_retrieval import BlipRetrieval, BlipRetrievalConfig

        assert all(r["loss"] == pytest.approx(r["loss_itc"] + r["loss_itm"], abs=1e-4) for r in rows)
        assert {"txt_r1", "img_r10", "r_mean"} <= set(evals[0][0])
        model = BlipRetrieval.from_lavis(lavis, BlipRetrievalConfig(**cfg["model"]))
        assert int(a["ptr_queue"]) == (5 * 4) % 32
        out = tmp_path / "scores"  # blipfast retrieval reads the run (its config and tokenizer)
        assert main(["retrieval", "--data", dataset["test"], "--images", dataset["root"], "--model", full, "--device",
                     "cpu", "--workers", "0", "--no-progress", "--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["k"] == 4
    else:
        from blipfast.models.blip_caption import BlipCaptionConfig, BlipCaptioner

        assert evals[0][0]["captions"] == 4 and ("CIDEr" in evals[0][0] or "unavailable" in evals[0][0]["scores"])
        assert cfg["prompt"] == "a picture of " and cfg["model"]["prompt_length"] >= 1
        with open(os.path.join(full, "captions-epoch1.jsonl")) as fh:
            assert len(fh.readlines()) == 4
        model = BlipCaptioner.from_lavis(lavis, BlipCaptionConfig(**cfg["model"]))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in a.items())


def _resolve(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return resolve(p.parse_args(list(argv)))[0]


def test_recipes_and_refusals(dataset, tmp_path, capsys):
    cfg = _resolve("--task", "blip-retrieval", "--data", "x.json")
    assert (cfg["lr"], cfg["batch_size"], cfg["epochs"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_txt_len"],
            cfg["image_ids"], cfg["weight_decay"], cfg["eval_every"]) == (1e-5, 32, 6.0, 0.0, 0, 35, True, 0.05, 1)
    cfg = _resolve("--task", "blip-caption", "--data", "x.json")
    assert (cfg["lr"], cfg["batch_size"], cfg["epochs"], cfg["max_txt_len"], cfg["prompt"]) == \
        (1e-5, 32, 5.0, 40, "a picture of ")
    from blipfast.train.tasks.blip_retrieval import BlipRetrievalTask

    task = BlipRetrievalTask({"image_ids": True})
    task.alpha = 0.4
    assert [round(task.step_inputs(i, 10)["alpha"], 6) for i in (0, 5, 10, 25)] == [0.0, 0.2, 0.4, 0.4]
    out = str(tmp_path / "refused")
    assert main(_args("blip-retrieval", out, dataset, 2, ("--no-image-ids",))) == 2
    assert "--no-image-ids" in capsys.readouterr().err and not os.path.exists(out)
    assert main(_args("blip-caption", out, dataset, 2, ("--llm", str(tmp_path)))) == 2
    assert "--llm" in capsys.readouterr().err
    assert main(_args("blip-caption", out, dataset, 2, ("--min-lr", "-1"))) == 2


def test_init_from_a_salesforce_pretraining_checkpoint(dataset, tmp_path, capsys):
    """--init model_base.pth-style: a 224-px-style BlipPretrain's Salesforce names into a 16-px retrieval model whose
    ViT has another grid (8 px images, 1 patch -> 16 px, 4 patches): interpolated, the decoder unused."""
    from blipfast.models.blip_pretrain import BlipPretrain, BlipPretrainConfig
    from blipfast.testing.blip import tokenizer

    tok = tokenizer(["a red circle on a blue background"])
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    pre = BlipPretrain(BlipPretrainConfig(text={**TEXT, "vocab_size": len(tok)}, vision={**VISION, "image_size": 8},
                                          embed_dim=16, queue_size=32, enc_token_id=len(tok) - 1,
                                          bos_token_id=tok.bos_token_id))
    pth = str(tmp_path / "model_base.pth")
    torch.save({"model": pre.to_lavis_state_dict()}, pth)
    out = str(tmp_path / "run")
    assert main(_args("blip-retrieval", out, dataset, 1, ("--init", pth, "--tokenizer", tok_dir, "--eval-every",
                                                          "0"))) == 0
    err = capsys.readouterr().out
    assert "position embedding reshaped from 1 to 4" in err and "text_decoder" in err
    assert not os.path.exists(os.path.join(out, "eval.jsonl"))
