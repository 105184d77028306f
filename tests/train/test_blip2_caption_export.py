"""A ``blipfast train --task blip2-caption`` run as a whole model (docs/blip2-finetune.md): ``blipfast caption`` /
``eval caption --model RUN`` load the run itself, ``blipfast export`` writes it as an HF
``Blip2ForConditionalGeneration`` folder that transformers' own classes load, and each gives the captions the run's
own evaluation wrote (tiny models, CPU)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.cli import main
from blipfast.convert import list_checkpoints
from blipfast.testing.data import write_images, write_jsonl, write_vision
from tests.helpers.blip2_caption import write_lavis_stage1_no_vit
from tests.helpers.stage2 import write_llm

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(root, llm, data, vision, init, out) -> str:
    assert main(["train", "--task", "blip2-caption", "--out", out, "--data", data, "--images", root, "--vision", vision,
                 "--llm", llm, "--init", init, "--steps", "2", "--batch-size", "4", "--max-txt-len", "12",
                 "--warmup-steps", "1", "--lr", "1e-2", "--no-progress", "--device", "cpu", "--seed", "7",
                 "--eval-every", "1", "--eval-data", data, "--save-lavis"]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step OPT run whose --eval-every wrote its captions; an LLM folder whose tokenizer has no <image>."""
    root = tmp_path_factory.mktemp("b2export")
    data = write_jsonl(str(root / "ann.jsonl"), write_images(str(root), 8, seed=3))
    parts = {"root": str(root), "data": data, "vision": write_vision(str(root / "vit")),
             "init": write_lavis_stage1_no_vit(root / "stage1.pth"),
             "opt": write_llm(root / "llm-opt", "opt"), "opt_tight": write_llm(root / "llm-tight", "opt")}
    for name in os.listdir(parts["opt_tight"]):  # its tokenizer without <image> (every embedding row in use)
        path = os.path.join(parts["opt_tight"], name)
        if name.startswith(("tokenizer", "special_tokens")):
            with open(path) as fh:
                text = fh.read().replace("<image>", "<picture>")
            with open(path, "w") as fh:
                fh.write(text)
    parts["run"] = _train(parts["root"], parts["opt"], data, parts["vision"], parts["init"], str(root / "run"))
    with open(os.path.join(parts["run"], "captions-epoch1.jsonl")) as fh:
        parts["captions"] = {r["image_id"]: r["caption"] for r in map(json.loads, fh)}
    return parts


def _key(image: str) -> int:
    return int(os.path.splitext(os.path.basename(image))[0])  # the image id the run's evaluation gives it


def _caption(run, model, out) -> dict:
    assert main(["caption", "--model", model, "--data", run["data"], "--image-root", run["root"], "--output", out,
                 "--settings", "coco", "--batch-size", "4", "--no-progress", "--device", "cpu"]) == 0
    with open(out) as fh:
        return {_key(r["image"]): r["caption"] for r in map(json.loads, fh)}


def test_the_run_itself_and_its_export_caption_as_the_run_did(run, tmp_path):
    """`blipfast caption --model RUN` (the run rebuilt from its checkpoint and recorded LLM) and `--model EXPORT`
    write the captions of the run's own --eval-every, image for image; the export keeps LAVIS' ln_vision epsilon."""
    from blipfast.generate.engine import Generator

    want = run["captions"]
    assert len(want) == 8 and len(set(want.values())) > 1  # (not one caption for every image)
    assert _caption(run, run["run"], str(tmp_path / "run.jsonl")) == want
    export = str(tmp_path / "export")
    assert main(["export", run["run"], "--out", export]) == 0
    assert _caption(run, export, str(tmp_path / "export.jsonl")) == want
    gen = Generator(export, device="cpu")
    end = gen.tokenizer("\n", add_special_tokens=False)["input_ids"]  # (the tiny word-level tokenizer: none)
    assert gen.model.model.vision_model.post_layernorm.eps == 1e-5 and gen.eos_token_id == (end[0] if end else None)
    assert gen.model.model.vision_model.config.image_size == 24  # the run's 24 px (its 16-px ViT interpolated)


def test_transformers_own_classes_load_the_export_and_caption_as_the_run_did(run, tmp_path):
    """Blip2ForConditionalGeneration / Blip2Processor.from_pretrained of the export: the processor puts the image
    tokens in front of the prompt, and transformers' generate with the run's decoding (LAVIS' COCO settings, "\\n" as
    the end) gives the run's captions (transformers' ln_vision epsilon is the ViT's: set to LAVIS' first, as blipfast's
    loader does)."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor

    from blipfast.data.vision import load_image, load_image_processor
    from blipfast.models.llm import decoding_settings

    export = str(tmp_path / "export")
    assert main(["export", list_checkpoints(run["run"])[-1], "--out", export]) == 0  # a checkpoint folder
    model = Blip2ForConditionalGeneration.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    meta = model.config.blipfast
    assert meta["task"] == "blip2-caption" and meta["text_suffix"] == "\n"
    assert model.config.image_token_index == tok.convert_tokens_to_ids("<image>") < model.config.text_config.vocab_size
    model.vision_model.post_layernorm.eps = meta["ln_vision_eps"]
    settings = decoding_settings("coco", is_encoder_decoder=False)
    with open(run["data"]) as fh:
        files = {_key(r["image"]): os.path.join(run["root"], r["image"]) for r in map(json.loads, fh)}
    images = sorted(run["captions"])
    pics = [load_image(files[k]) for k in images]
    px = load_image_processor(export)(images=pics, return_tensors="pt")["pixel_values"]
    proc = Blip2Processor.from_pretrained(export)
    ids = proc(images=pics[:1], text=settings.prompt, return_tensors="pt")["input_ids"]
    q = model.config.num_query_tokens
    assert ids[0, :q].eq(model.config.image_token_index).all() and ids.shape[1] > q
    ids = ids.expand(len(images), -1)
    with torch.no_grad():
        end = tok(meta["text_suffix"], add_special_tokens=False)["input_ids"]
        out = model.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids),
                             **({"eos_token_id": end[0]} if end else {}), **settings.generate_kwargs())
    got = [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    assert dict(zip(images, got)) == run["captions"]


def test_export_without_spare_rows_and_refusals(run, tmp_path, capsys):
    """A tokenizer without <image> gets it, on a new embedding row where the LLM has no spare one (--llm replaces the
    recorded LLM); what is not a fine-tuned run, a folder that is not empty and a missing LLM are refused."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    export = str(tmp_path / "tight")
    assert main(["export", run["run"], "--out", export, "--llm", run["opt_tight"]]) == 0
    model = Blip2ForConditionalGeneration.from_pretrained(export)
    rows = model.language_model.get_input_embeddings().num_embeddings
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.image_token_index == tok.convert_tokens_to_ids("<image>") == rows - 1 == len(tok) - 1
    assert model.config.text_config.vocab_size == rows
    for argv, msg in ((["export", run["init"], "--out", str(tmp_path / "a")], "is not a fine-tuned BLIP-2 run"),
                      (["export", run["run"], "--out", export], "is not an empty folder"),
                      (["export", run["run"], "--out", str(tmp_path / "b"), "--llm", str(tmp_path / "none")],
                       "which is not a folder here")):
        assert main(argv) == 2, msg
        assert msg in capsys.readouterr().err, msg


def test_a_caption_run_is_an_init_of_stage2(run, tmp_path):
    """`--stage 2 --init CAPTION_RUN`: the stage-2 model starts from the run's ln_vision, Q-Former, queries and
    projection (its config from the run's config.yaml; the ViT is --vision's frozen tower), every tensor equal."""
    from blipfast.cli import build_parser
    from blipfast.convert import load_state_dict
    from blipfast.train import Trainer
    from blipfast.train.config import resolve

    saved = load_state_dict(os.path.join(list_checkpoints(run["run"])[-1], "model.safetensors"))
    argv = ["train", "--stage", "2", "--out", str(tmp_path / "s2"), "--data", run["data"], "--images", run["root"],
            "--vision", run["vision"], "--llm", run["opt"], "--init", run["run"], "--steps", "1", "--batch-size", "4",
            "--max-txt-len", "12", "--no-progress", "--device", "cpu"]
    cfg, given = resolve(build_parser().parse_args(argv))
    tr = Trainer(cfg, given, log=lambda m: None)
    try:
        got = dict(tr.core.trainable_parameters())
        assert {k.split(".")[0] for k in got} == {"vision_model", "qformer", "query_tokens", "language_projection"}
        assert all(torch.equal(t.detach(), saved[k]) for k, t in got.items())
        assert tr.core.model.vision_model.post_layernorm.eps == 1e-5  # the run's ln_vision epsilon
    finally:
        tr.close()


def test_lavis_checkpoint_has_lavis_names_for_every_trained_tensor_and_loads_back(run, tmp_path):
    """--save-lavis: lavis.pth holds every trained tensor under Blip2OPT's names (the EVA ViT's visual_encoder.*,
    ln_vision, Qformer.bert.*, query_tokens, opt_proj), nothing else; as --init (no --vision: the ViT from it, its
    config.json beside it) it gives back the run's tensors, the key third of the ViT's qkv bias (which LAVIS does not
    have, and which changes no output) aside."""
    import re

    from blipfast import convert

    ckpt = list_checkpoints(run["run"])[-1]
    hf = convert.load_state_dict(os.path.join(ckpt, "model.safetensors"))
    lavis = torch.load(os.path.join(ckpt, "lavis.pth"), weights_only=True)["model"]
    expect = convert.hf_to_lavis(hf, language_projection="opt_proj", strict=True).state_dict  # every key maps
    assert lavis.keys() == expect.keys() and all(torch.equal(lavis[k], expect[k]) for k in lavis)
    groups = {re.sub(r"\.\d+\..*|\.(weight|bias)$", "", k) for k in lavis}
    assert groups == {"visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj",
                      "visual_encoder.blocks", "ln_vision", "Qformer.bert.embeddings.LayerNorm",
                      "Qformer.bert.encoder.layer", "query_tokens", "opt_proj"}
    assert {"visual_encoder.blocks.1.attn.q_bias", "visual_encoder.blocks.1.attn.v_bias",
            "visual_encoder.blocks.1.mlp.fc2.weight"} <= lavis.keys()
    from blipfast.cli import build_parser
    from blipfast.train import Trainer
    from blipfast.train.config import resolve

    argv = ["train", "--task", "blip2-caption", "--out", str(tmp_path / "again"), "--data", run["data"], "--images",
            run["root"], "--llm", run["opt"], "--init", os.path.join(ckpt, "lavis.pth"), "--steps", "1",
            "--batch-size", "4", "--max-txt-len", "12", "--no-progress", "--device", "cpu"]
    cfg, given = resolve(build_parser().parse_args(argv))
    tr = Trainer(cfg, given, log=lambda m: None)
    try:
        got = {k: t.detach() for k, t in tr.core.trainable_parameters()}
        assert got.keys() == hf.keys()
        for k, t in got.items():
            want = hf[k]
            if k.endswith("self_attn.qkv.bias"):  # LAVIS' q | 0 | v
                q, _, v = want.chunk(3)
                want = torch.cat((q, torch.zeros_like(q), v))
            assert torch.equal(t, want), k
    finally:
        tr.close()


def test_trains_from_webdataset_shards_as_from_the_annotation_file(run, tmp_path):
    """The annotation file's 8 images and captions as two WebDataset shards (img2dataset's layout): one step over all
    8 (no augmentation, no dropout) has the loss of the same step over the annotation file (the batch's order aside:
    float rounding), with the LLM's tokenizer (no --tokenizer), and the ViT trains."""
    pytest.importorskip("webdataset")
    from PIL import Image

    from blipfast.testing.shards import sample_files, write_tar

    with open(run["data"]) as fh:
        rows = [json.loads(line) for line in fh]
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        files = []
        for i, r in enumerate(rows[4 * s:4 * s + 4]):
            path = os.path.join(run["root"], r["image"])
            with open(path, "rb") as fh, Image.open(path) as im:
                files += sample_files(f"{s:05d}{i:04d}", fh.read(), r["caption"], *im.size)
        write_tar(str(shards / f"{s:05d}.tar"), files)
    losses = {}
    for name, data in (("ann", ["--data", run["data"], "--images", run["root"]]), ("wds", ["--data", str(shards), "--samples-per-epoch", "8"])):
        out = str(tmp_path / name)
        assert main(["train", "--task", "blip2-caption", "--out", out, *data, "--vision", run["vision"], "--llm",
                     run["opt"], "--init", run["init"], "--steps", "1", "--batch-size", "8", "--max-txt-len", "12",
                     "--augment", "none", "--model", '{"qformer": {"hidden_dropout_prob": 0.0, '
                     '"attention_probs_dropout_prob": 0.0}}', "--no-progress", "--device", "cpu", "--seed", "7",
                     "--save-every", "0"]) == 0
        with open(os.path.join(out, "log.jsonl")) as fh:
            logged = [json.loads(line) for line in fh if '"loss"' in line]
        losses[name] = logged[0]["loss"]
    assert losses["wds"] == pytest.approx(losses["ann"], rel=1e-5, abs=0)
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in convert_weights(str(tmp_path / "wds"))


def convert_weights(out: str) -> dict:
    from blipfast.convert import load_state_dict

    return load_state_dict(os.path.join(list_checkpoints(out)[-1], "model.safetensors"))


def test_a_flan_t5_run_exports_with_lavis_gelu(run, tmp_path):
    """Flan-T5: the export keeps LAVIS' exact GELU in the T5's feed-forwards (its config says so), and captions as
    the run does."""
    from transformers import Blip2Config

    t5 = write_llm(tmp_path / "llm-t5", "t5", seed=1)
    with open(os.path.join(t5, "config.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(t5, "config.json"), "w") as fh:  # Flan-T5's activation (not gated here: the weights')
        json.dump({**meta, "feed_forward_proj": "gelu_new", "dense_act_fn": "gelu_new"}, fh)
    out = str(tmp_path / "t5run")
    assert main(["train", "--task", "blip2-caption", "--out", out, "--data", run["data"], "--images", run["root"],
                 "--vision", run["vision"], "--llm", t5, "--init", run["init"], "--steps", "1", "--batch-size", "4",
                 "--max-txt-len", "12", "--lr", "1e-2", "--no-progress", "--device", "cpu", "--seed", "7"]) == 0
    export = str(tmp_path / "t5export")
    assert main(["export", out, "--out", export]) == 0
    assert Blip2Config.from_pretrained(export).text_config.dense_act_fn == "gelu"
    assert _caption(run, export, str(tmp_path / "e.jsonl")) == _caption(run, out, str(tmp_path / "r.jsonl"))
