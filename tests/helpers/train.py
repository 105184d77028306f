"""Shared pieces of the ``blipfast train`` tests: tiny model/optimizer flags, run readers, the tiny BLIP (v1)
model and ViT folder (the data writers are blipfast.testing.data's)."""
from __future__ import annotations

import json
import os

import torch

# a Q-Former small enough for a CPU test step in tens of milliseconds
TINY_MODEL = {"num_query_tokens": 4, "embed_dim": 16,
              "qformer": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
                          "max_position_embeddings": 16}}
NO_DROPOUT = {"qformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


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


def write_dataset(root, n: int) -> dict:
    """The data of tiny runs under ``root``: n images with captions, their ``ann.jsonl`` and a tiny random vision
    model folder (keys root, rows, data, vision)."""
    from blipfast.testing.data import write_images, write_jsonl, write_vision

    rows = write_images(str(root), n)
    return {"root": str(root), "rows": rows, "data": write_jsonl(os.path.join(root, "ann.jsonl"), rows),
            "vision": write_vision(os.path.join(root, "vit"))}


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


TINY_BLIP = {"name": "blip", "embed_dim": 16, "queue_size": 32,
             "text": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
                      "max_position_embeddings": 16, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def write_blip_vision(path: str, seed: int = 0, image_size: int = 16) -> str:
    """A tiny random BlipVisionModel + BlipImageProcessor saved like a Hugging Face model folder."""
    from transformers import BlipImageProcessor, BlipVisionConfig, BlipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipVisionModel(BlipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=image_size, patch_size=8,
                                                 layer_norm_eps=1e-6))
    model.save_pretrained(path)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_trainer(args: list):
    """A set-up :class:`blipfast.train.loop.Trainer` (no step taken, nothing logged) of ``blipfast train`` flags
    (``args`` as :func:`tiny_args` gives them, "train" first); close it after use."""
    import argparse

    from blipfast.train.config import add_arguments, resolve
    from blipfast.train.loop import Trainer

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg, given = resolve(p.parse_args(args[1:]))
    return Trainer(cfg, given, log=lambda *_: None)


def global_batch_baseline(root, steps: int) -> tuple:
    """The data of a tiny stage-1 run under ``root`` (20 images, the tiny ViT, no dropout, every caption truncated
    to 6 tokens: each rank's LM loss averages as many tokens) and its one-process run with the global batch 6, in
    one thread; returns (tiny_args keywords, extra flags, the one-process run folder) for the multi-process run
    (batch 3 per process) to compare with."""
    from blipfast.cli import main
    from blipfast.testing.data import write_images, write_jsonl, write_vision

    rows = write_images(str(root), 20, seed=11)
    common = dict(data=write_jsonl(os.path.join(root, "ann.jsonl"), rows), images=str(root),
                  vision=write_vision(os.path.join(root, "vit")), steps=steps, model=merge(TINY_MODEL, NO_DROPOUT))
    extra = ("--max-txt-len", "6", "--num-workers", "0")
    single = os.path.join(root, "single")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(tiny_args(single, **common, extra=extra) + ["--batch-size", "6"]) == 0
    finally:
        torch.set_num_threads(n)
    return common, extra, single
