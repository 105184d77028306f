"""Tiny data written on the fly for tests and the documentation's examples: PNG images of a coloured shape on a
background with captions that describe them, JSONL annotation files and a tiny random vision tower saved as a
Hugging Face folder (no downloads)."""
from __future__ import annotations

import json
import os
import random

import torch

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
          "white": (245, 245, 245), "black": (10, 10, 10)}
SHAPES = ("circle", "square")

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
