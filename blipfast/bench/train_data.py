"""The data path of ``blipfast train``: one training step end to end (DataLoader batch, frozen ViT when training
from images, the stage-1 step with its optimizer update, the loss accumulation the loop logs) from cached ViT
tokens against from images through the ViT.

The images are PNG files written to a temporary folder (224 px on CUDA), the ViT is a randomly initialised
``Blip2VisionModel`` with EVA ViT-g's shape (1408 wide, 39 layers, 257 tokens: what LAVIS runs in stage 1) on
CUDA and a tiny one on the CPU, and the features come from ``cache-features`` over the same images; both
trainers are ``blipfast.train.Trainer`` with the same options (Q-Former ``base`` on CUDA, bf16 autocast; ``tiny``
on the CPU). A case's ms is one optimizer step; images/s = ``params["batch"]`` / (ms / 1000). The cached path is
the stage-1 step alone if the loader keeps up, which is what this measures.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import torch

from .common import Case

# EVA ViT-g as LAVIS' stage 1 runs it (39 of its 40 blocks), at 224 px: 16 x 16 patches + CLS = 257 tokens
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
             patch_size=14, initializer_range=0.02)
VIT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, initializer_range=0.02)


def _write_data(root: str, n: int, px: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    words = ["red", "green", "blue", "dog", "cat", "car", "tree", "on", "a", "the", "next", "to", "small", "large"]
    path = os.path.join(root, "ann.jsonl")
    with open(path, "w") as fh:
        for i in range(n):
            img = rng.integers(0, 255, (px, px, 3), dtype=np.uint8)
            name = f"img/{i:05d}.png"
            Image.fromarray(img).save(os.path.join(root, name))
            fh.write(json.dumps({"image": name, "caption": " ".join(rng.choice(words, 12))}) + "\n")
    return path


def _vision(root: str, cfg: dict) -> str:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from ..data.vision import quiet_transformers

    path = os.path.join(root, "vit")
    with quiet_transformers():
        from transformers import BlipImageProcessor

        Blip2VisionModel(Blip2VisionConfig(**cfg)).save_pretrained(path)
        BlipImageProcessor(size={"height": cfg["image_size"], "width": cfg["image_size"]}).save_pretrained(path)
    return path


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> list[Case]:
    from ..data.features import cache_features
    from ..train.config import OPTIONS
    from ..train.loop import Trainer

    cuda = device.type == "cuda"
    batch = (16 if quick else 64) if cuda else 4
    n = batch * (4 if quick else 8)
    root = tempfile.mkdtemp(prefix="blipfast-bench-train-")
    atexit.register(shutil.rmtree, root, True)
    vit_cfg = VIT_G if cuda else VIT_TINY
    data = _write_data(root, n, vit_cfg["image_size"])
    vit = _vision(root, vit_cfg)
    prec = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32") if cuda else "fp32"
    feats = os.path.join(root, "feats")
    cache_features(data, root, vit, feats, batch_size=batch, device=str(device), progress=False,
                   vision_dtype="bf16" if cuda else "fp32", num_workers=4 if cuda else 0, log=lambda m: None)
    base = {k: v[1] for k, v in OPTIONS.items()}
    base.update(data=data, batch_size=batch, steps=10**6, warmup_steps=100, device=str(device), progress=False,
                preset="base" if cuda else "tiny", precision=prec, vocab_size=1000, max_txt_len=32,
                num_workers=None if cuda else 0, seed=0)
    params = dict(batch=batch, vit="EVA ViT-g shape (1408 x 39, 257 tokens)" if cuda else "tiny",
                  qformer=base["preset"], precision=prec, loader_workers=base["num_workers"] or "auto")
    out = []
    for name, extra, baseline in (("from images (ViT every step)", dict(images=root, vision=vit), True),
                                  ("from cached features", dict(features=feats), False)):
        cfg = dict(base, out=os.path.join(root, name.split()[1]), **extra)
        trainer = Trainer(cfg, log=lambda m: None)
        trainer.runlog.enabled = False

        def step(trainer=trainer, box=[]):  # noqa: B006 - the loop's running loss sum lives across calls
            m = trainer.train_step()
            box[:] = [m + box[0]] if box else [m]

        out.append(Case("stage-1 train loop, data path", name, step, baseline=baseline, params=params))
    return out
