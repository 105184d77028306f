"""The synthetic data set ``blipfast train`` uses without ``--data``: so the command runs on a fresh machine.

:func:`make_synthetic` draws ``n`` small PNG images of one coloured shape each (shape, colour, size, position
and background drawn at random from a seeded generator) with a caption that says exactly that ("a small red
circle at the top left on a white background"), writes them with a JSONL annotation file, and saves a small
randomly initialised ``Blip2VisionModel`` with its ``BlipImageProcessor`` beside them as the frozen vision
encoder (a ``BlipVisionModel`` for BLIP v1, whose ViT trains; no weights can be downloaded). The captions are a
function of the images, so the ITC, ITM and ITG losses all have something to learn: the loss goes down within a few
hundred steps on a CPU.
"""
from __future__ import annotations

import json
import os
import random

import torch

from .vision import quiet_transformers

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
          "purple": (140, 40, 170), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "blue": (40, 70, 160)}
PLACES = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
          "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}
SIZES = {"small": 0.16, "large": 0.3}

# the tiny vision encoder (32 px images, 8 px patches: 16 patches + CLS = 17 tokens of width 64)
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8, initializer_range=0.02)


def _draw(rng: random.Random, px: int):
    from PIL import Image, ImageDraw

    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    bg = rng.choice([b for b in BACKGROUNDS if b != color])
    place, size = rng.choice(list(PLACES)), rng.choice(list(SIZES))
    im = Image.new("RGB", (px, px), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    cx, cy = (v * px for v in PLACES[place])
    r = SIZES[size] * px
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    at = "in the center" if place == "center" else f"at the {place}"
    return im, f"a {size} {color} {shape} {at} on a {bg} background"


def make_synthetic(out: str, n: int = 512, seed: int = 0, image_size: int = 64, vision_kind: str = "blip2") -> dict:
    """Write the synthetic set into ``out``; returns {"data", "images", "vision"} paths for the trainer.
    ``vision_kind``: "blip2" (a frozen ``Blip2VisionModel``) or "blip" (a ``BlipVisionModel``, BLIP v1's ViT)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel, BlipVisionConfig, BlipVisionModel

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"--synthetic-size must be an int >= 2, got {n!r}")
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        im, caption = _draw(rng, image_size)
        name = f"{i:06d}.png"
        im.save(os.path.join(images, name))
        rows.append({"image": name, "caption": caption})
    data = os.path.join(out, "annotations.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    vision = os.path.join(out, "vision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if vision_kind == "blip":
            model = BlipVisionModel(BlipVisionConfig(**VISION_CONFIG, layer_norm_eps=1e-6))
        else:
            model = Blip2VisionModel(Blip2VisionConfig(**VISION_CONFIG))
    px = VISION_CONFIG["image_size"]
    with quiet_transformers():
        from transformers import BlipImageProcessor  # (without torchvision transformers notes its PIL fallback)

        model.save_pretrained(vision)
        BlipImageProcessor(size={"height": px, "width": px}).save_pretrained(vision)
    return {"data": data, "images": images, "vision": vision}
