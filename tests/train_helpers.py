"""Shared pieces of the ``blipfast train`` tests: a data set of PNG images with captions that describe them, a tiny
random ``Blip2VisionModel`` saved with its image processor, tiny model/optimizer flags, and readers."""
from __future__ import annotations

import json
import os
import random

import torch

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
          "white": (245, 245, 245), "black": (10, 10, 10)}
SHAPES = ("circle", "square")

# a Q-Former small enough for a CPU test step in tens of milliseconds
TINY_MODEL = {"num_query_tokens": 4, "embed_dim": 16,
              "qformer": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
                          "max_position_embeddings": 16}}
NO_DROPOUT = {"qformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def write_images(root: str, n: int, seed: int = 0, size: int = 24) -> list:
    """n PNG files under root/img/ and their rows {"image", "caption"} (a shape of a colour on a background)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for i in range(n):
        fg, bg = rng.sample(list(COLORS), 2)
        shape = rng.choice(SHAPES)
        im = Image.new("RGB", (size + rng.randrange(8), size), COLORS[bg])  # awkward, unequal sizes
        d = ImageDraw.Draw(im)
        box = [4, 4, size - 4, size - 4]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[fg])
        name = f"img/{i:04d}.png"
        im.save(os.path.join(root, name))
        rows.append({"image": name, "caption": f"a {fg} {shape} on a {bg} background"})
    return rows


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_vision(path: str, kind: str = "blip2", seed: int = 0, image_size: int = 16) -> str:
    """A tiny random vision tower + image processor saved like a Hugging Face model folder."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        common = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      image_size=image_size, patch_size=8)
        if kind == "blip2":
            model = tf.Blip2VisionModel(tf.Blip2VisionConfig(**common, initializer_range=0.02))
            proc = tf.BlipImageProcessor(size={"height": image_size, "width": image_size})
        elif kind == "clip":
            model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**common))
            proc = tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
        elif kind == "siglip":
            model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**common))
            proc = tf.SiglipImageProcessor(size={"height": image_size, "width": image_size})
        else:
            raise ValueError(kind)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def tiny_args(out: str, data: str = None, images: str = None, vision: str = None, features: str = None,
              steps: int = 10, model: dict = None, extra: tuple = ()) -> list:
    """``blipfast train`` flags of a tiny CPU run (log and checkpoint every step count below)."""
    args = ["train", "--out", out, "--steps", str(steps), "--batch-size", "4", "--max-txt-len", "8",
            "--vocab-size", "64", "--warmup-steps", "3", "--lr", "2e-3", "--min-lr", "1e-4", "--log-every", "1",
            "--plot-every", "5", "--save-every", "0", "--no-progress", "--device", "cpu", "--seed", "7",
            "--model", json.dumps(model or TINY_MODEL)]
    for flag, v in (("--data", data), ("--images", images), ("--vision", vision), ("--features", features)):
        if v is not None:
            args += [flag, v]
    return args + list(extra)


def read_log(run: str) -> list:
    with open(os.path.join(run, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def weights(run_or_ckpt: str) -> dict:
    from safetensors.torch import load_file

    from blipfast.train.checkpoint import list_checkpoints

    path = run_or_ckpt
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        path = list_checkpoints(path)[-1]
    return load_file(os.path.join(path, "model.safetensors"))


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
