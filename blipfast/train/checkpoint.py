"""Checkpoints of ``blipfast train``: ``RUN/checkpoint-<step>/`` folders, written atomically, the last K kept.

Each folder holds

- ``model.safetensors``: stage 1, the :class:`blipfast.Blip2Stage1` weights (``safetensors.torch.save_model``: the
  LM head's decoder weight is tied to the word embeddings and stored once); stage 2, only the trained tensors of
  :class:`blipfast.Blip2Stage2`, with a ``config.json`` (the task's ``save`` writes them: :mod:`blipfast.train.tasks`);
- ``state.pt``: optimizer, learning-rate schedule, GradScaler, every rank's RNG states (torch CPU and CUDA,
  Python, NumPy), the step and the data position (micro-batches consumed); plain tensors and containers, read
  with ``torch.load(weights_only=True)``;
- ``lavis.pth`` with ``--save-lavis``: ``{"model": state dict in LAVIS names}``, loadable by LAVIS (stage 1 also
  by ``Blip2Stage1.from_lavis``).

A checkpoint is written into ``.checkpoint-<step>.tmp`` and renamed when complete, so a crash never leaves a
half-written ``checkpoint-*`` folder; the oldest beyond ``keep`` are then deleted.
"""
from __future__ import annotations

import os
import random
import shutil

import torch

from ..sources import CHECKPOINT_DIR as _NAME
from ..sources import list_checkpoints

__all__ = ["find_checkpoint", "list_checkpoints", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def rng_state() -> dict:
    import numpy as np

    ver, words, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [ver, list(words), gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    ver, words, gauss = state["python"]
    random.setstate((ver, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, write_weights, state: dict, keep: int) -> str:
    """Write ``checkpoint-<step>`` (see the module docstring): ``write_weights(folder)`` writes the weights, then
    ``state`` goes to ``state.pt``; returns its path."""
    final = os.path.join(run_dir, f"checkpoint-{step:08d}")
    tmp = os.path.join(run_dir, f".checkpoint-{step:08d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_weights(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str) -> tuple[str, str]:
    """(run folder, checkpoint folder) of ``--resume PATH``: a run folder (its last checkpoint) or a checkpoint."""
    path = os.path.normpath(path)
    if _NAME.match(os.path.basename(path)) and os.path.isfile(os.path.join(path, "state.pt")):
        return os.path.dirname(path), path
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"--resume: {path!r} holds no complete checkpoint (checkpoint-*/state.pt)")
    return path, found[-1]


def load_checkpoint(ckpt: str, read_weights) -> dict:
    """``read_weights(ckpt)`` loads the weights; returns the training state of ``state.pt``."""
    read_weights(ckpt)
    return torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
