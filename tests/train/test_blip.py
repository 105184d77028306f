"""``blipfast train --model blip`` end to end on a CPU: images the test writes, a tiny random BlipVisionModel the
test saves as the ViT's starting weights, a tiny BlipPretrain; the run folder, the Salesforce-named export, exact
resume (momentum copies and queues included), BLIP's recipe defaults and alpha ramp, and the refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.cli import main
from blipfast.options import EXIT_STOPPED
from blipfast.models.blip_pretrain import BlipPretrain, BlipPretrainConfig
from blipfast.train.config import read_config_file, resolve
from blipfast.train.tasks.blip_pretrain import BlipPretrainTask as BlipPretrainAdapter
from blipfast.testing.data import write_images, write_jsonl
from tests.helpers.train import TINY_BLIP, read_log, tiny_args, weights, write_blip_vision

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("blipdata")
    rows = write_images(str(root), 16, seed=3)
    return {"root": str(root), "data": write_jsonl(str(root / "ann.jsonl"), rows),
            "vision": write_blip_vision(str(root / "vit"))}



def _args(out, dataset, steps, extra=()):
    return tiny_args(out, dataset["data"], dataset["root"], dataset["vision"], steps=steps, model=TINY_BLIP,
                     extra=("--max-txt-len", "10") + tuple(extra))


def test_end_to_end(dataset, tmp_path):
    out = str(tmp_path / "run")
    assert main(_args(out, dataset, 6, ("--save-lavis",))) == 0
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert abs(r["loss"] - (r["loss_itc"] + r["loss_itm"] + r["loss_lm"])) < 1e-4
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss_itc", "loss_itm", "loss_lm"))
    cfg = read_config_file(os.path.join(out, "config.yaml"))
    assert cfg["model"]["name"] == "blip" and cfg["image_ids"] is False
    assert cfg["model"]["vision"]["hidden_size"] == 24 and cfg["model"]["text"]["encoder_hidden_size"] == 24
    tok_dir = cfg["tokenizer"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc, dec = tok.convert_tokens_to_ids("[ENC]"), tok.convert_tokens_to_ids("[DEC]")
    assert cfg["model"]["enc_token_id"] == enc == dec + 1 and cfg["model"]["bos_token_id"] == dec
    assert os.path.isfile(os.path.join(out, "image_processor", "preprocessor_config.json"))
    # the weights: the ViT started from --vision and trained; the Salesforce export loads back equal
    sd = weights(out)
    config = BlipPretrainConfig(**{k: v for k, v in cfg["model"].items() if k != "name"})
    ckpt = [p for p in sorted(os.listdir(out)) if p.startswith("checkpoint-")][-1]
    model = BlipPretrain.from_lavis(os.path.join(out, ckpt, "lavis.pth"), config)
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    assert int(sd["queue_ptr"]) == (6 * 4) % 32
    from safetensors.torch import load_file

    vit0 = load_file(os.path.join(dataset["vision"], "model.safetensors"))
    key = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(sd["vision_model." + key], vit0[key])  # trained
    assert (sd["vision_model_m." + key] - vit0[key]).abs().max() < (sd["vision_model." + key] - vit0[key]).abs().max()


def test_resume_is_bit_identical(dataset, tmp_path):
    """3 steps + --resume 3 steps == 6 steps: losses and every weight, momentum copy and queue."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(_args(full, dataset, 6)) == 0
    assert main(_args(part, dataset, 6, ("--stop-after", "3"))) == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    assert [r["loss"] for r in read_log(part)] == [r["loss"] for r in read_log(full)]
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_recipe_defaults_alpha_ramp_and_refusals(dataset, tmp_path, capsys):
    import argparse

    from blipfast.train.config import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg, _ = resolve(p.parse_args(["--model", "blip", "--data", "x.jsonl"]))
    assert (cfg["lr"], cfg["batch_size"], cfg["max_txt_len"], cfg["warmup_steps"], cfg["image_ids"]) == \
        (3e-4, 75, 30, 3000, False)
    cfg, _ = resolve(p.parse_args(["--data", "x.jsonl"]))  # BLIP-2 keeps LAVIS' recipe
    assert (cfg["lr"], cfg["batch_size"], cfg["max_txt_len"], cfg["image_ids"]) == (1e-4, 100, 32, True)
    # alpha: 0.4 * min(1, i / (2 * steps per epoch)), as BLIP's pretrain.py
    adapter = BlipPretrainAdapter({"image_ids": False})
    adapter.alpha = BlipPretrainConfig().alpha
    assert [round(adapter.step_inputs(i, 10)["alpha"], 6) for i in (0, 5, 10, 20, 31)] == [0.0, 0.1, 0.2, 0.4, 0.4]
    # --features is refused with a reason; a BLIP-2 ViT as --vision too
    out = str(tmp_path / "refused")
    assert main(_args(out, dataset, 2, ("--features", str(tmp_path)))) == 2
    assert "--features cannot be used with --model blip" in capsys.readouterr().err
    from blipfast.testing.data import write_vision

    vit2 = write_vision(str(tmp_path / "vit2"))
    args = tiny_args(out, dataset["data"], dataset["root"], vit2, steps=2, model=TINY_BLIP)
    assert main(args) == 2
    assert "BlipVisionModel" in capsys.readouterr().err and not os.path.exists(out)
    assert main(["train", "--model", "blip3", "--out", out]) == 2
    assert "blip3" in capsys.readouterr().err


def test_init_from_a_salesforce_checkpoint_without_vision(dataset, tmp_path):
    """--init reads a Salesforce-named .pth; without --vision the processor is BLIP's transform at the ViT size."""
    cfg = {"name": "blip", **{k: v for k, v in TINY_BLIP.items() if k != "name"},
           "vision": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 16, "patch_size": 8}}
    first = str(tmp_path / "first")
    args = tiny_args(first, dataset["data"], dataset["root"], steps=1, model=cfg, extra=("--save-lavis",))
    assert main(args) == 0
    pth = [os.path.join(first, p, "lavis.pth") for p in os.listdir(first) if p.startswith("checkpoint-")][0]
    second = str(tmp_path / "second")
    args = tiny_args(second, dataset["data"], dataset["root"], steps=1, model=cfg,
                     extra=("--init", pth, "--tokenizer", os.path.join(first, "tokenizer")))
    assert main(args) == 0
    with open(os.path.join(second, "image_processor", "preprocessor_config.json")) as fh:
        assert json.load(fh)["size"] == {"height": 16, "width": 16}


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager_step_on_cuda(dataset, tmp_path):
    """--model blip on CUDA: the captured step (alpha fed through a static buffer, the queue and momentum updates
    inside the graph) gives the eager step's losses and weights (fp32, no dropout); bf16 with --compile trains."""
    def args(out, *extra):
        a = _args(out, dataset, 8, ("--precision", "fp32") + extra)
        a[a.index("--device") + 1] = "cuda"
        return a

    eager, graph = str(tmp_path / "eager"), str(tmp_path / "graph")
    assert main(args(eager)) == 0
    assert main(args(graph, "--cuda-graph")) == 0
    for a, b in zip(read_log(eager), read_log(graph)):
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    we, wg = weights(eager), weights(graph)
    for k in we:
        torch.testing.assert_close(wg[k].float(), we[k].float(), rtol=1e-3, atol=1e-4, msg=k)
    comp = str(tmp_path / "compile")
    a = args(comp, "--compile")
    a[a.index("--precision") + 1] = "bf16"
    assert main(a) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(comp))
