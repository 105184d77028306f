"""Checkpoints of ``blipfast train``: ``RUN/checkpoint-<step>/`` folders, written atomically, the last K kept.

Each folder holds

- ``model.safetensors``: stage 1, the :class:`blipfast.Blip2Stage1` weights (``safetensors.torch.save_model``: the
  LM head's decoder weight is tied to the word embeddings and stored once); stage 2, only the trained tensors of
  :class:`blipfast.Blip2Stage2`, with a ``config.json`` (the task's ``save`` writes them: :mod:`blipfast.train.tasks`);
- ``state.pt``: optimizer, learning-rate schedule, GradScaler, every rank's RNG states (torch CPU and CUDA,
  Python, NumPy), the step and the data position (micro-batches consumed); plain tensors and containers, read
  with ``torch.load(weights_only=True)``;
- with ``--fsdp``, the ``torch.distributed.checkpoint`` files of the sharded run (``.metadata``, one
  ``__<rank>_0.distcp`` per rank: trained weights and optimizer state; ``state.pt`` then has no optimizer) beside a
  consolidated ``model.safetensors`` (:mod:`blipfast.train.fsdp`, docs/fsdp.md);
- ``lavis.pth`` with ``--save-lavis``: ``{"model": state dict in LAVIS names}``, loadable by LAVIS (stage 1 also
  by ``Blip2Stage1.from_lavis``).

A checkpoint is written into ``.checkpoint-<step>.tmp``, completed by a ``manifest.json`` written last (every
file's size and SHA-256, :mod:`blipfast.files`; the files get the user's umask) and renamed, so a crash never leaves
a half-written ``checkpoint-*`` folder; the oldest beyond ``keep`` are then deleted. ``--resume`` verifies a
checkpoint against its manifest before trusting it (:func:`verify_checkpoint`): a run folder resumes from its newest
complete checkpoint, with a warning naming the files of the newer broken ones (which are renamed
``checkpoint-<step>.broken``, so that ``keep`` never deletes a good checkpoint in favour of a broken one); a run
folder without any checkpoint (stopped before its first) starts again from step 0 (:func:`find_checkpoint`).
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import torch

from ..files import share, verify_manifest, write_manifest
from ..sources import CHECKPOINT_DIR as _NAME
from ..sources import list_checkpoints

__all__ = ["find_checkpoint", "list_checkpoints", "load_checkpoint", "open_checkpoint", "rng_state",
           "save_checkpoint", "set_aside", "set_rng_state", "verify_checkpoint"]
REQUIRED = ("model.safetensors", "state.pt")


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


def open_checkpoint(run_dir: str, step: int) -> str:
    """The empty ``.checkpoint-<step>.tmp`` folder that :func:`save_checkpoint` completes (created here first when
    other processes write into it too: ``--fsdp``'s DCP shards)."""
    tmp = os.path.join(run_dir, f".checkpoint-{step:08d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def save_checkpoint(run_dir: str, step: int, write_weights, state: dict, keep: int, opened: bool = False) -> str:
    """Write ``checkpoint-<step>`` (see the module docstring): ``write_weights(folder)`` writes the weights, then
    ``state`` goes to ``state.pt`` and the manifest is written (over every file of the folder); returns its path.
    ``opened``: :func:`open_checkpoint` made the folder and others wrote into it already."""
    final = os.path.join(run_dir, f"checkpoint-{step:08d}")
    tmp = os.path.join(run_dir, f".checkpoint-{step:08d}.tmp") if opened else open_checkpoint(run_dir, step)
    write_weights(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    write_manifest(tmp, format="blipfast-checkpoint", step=step)
    share(tmp)  # safetensors writes 0600
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(folder: str) -> list:
    """What is wrong with a checkpoint folder ([] when it is complete): the files that do not match its manifest;
    a folder written before manifests existed only needs non-empty ``model.safetensors`` and ``state.pt``."""
    problems = verify_manifest(folder)
    if problems is not None:
        return problems
    return [f"{name} is {'empty' if os.path.isfile(p) else 'missing'}" for name in REQUIRED
            if not os.path.isfile(p := os.path.join(folder, name)) or os.path.getsize(p) == 0]


def _candidates(run_dir: str) -> list:
    """Every ``checkpoint-<step>`` folder of a run, complete or not, newest first."""
    found = []
    for name in os.listdir(run_dir):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [p for _, p in sorted(found, reverse=True)]


def _broken(folder: str, problems: list) -> str:
    return f"{folder}: {'; '.join(problems)}"


def find_checkpoint(path: str) -> tuple[str, Optional[str], list]:
    """(run folder, checkpoint folder, broken) of ``--resume PATH``: a checkpoint folder (it must be complete), or a
    run folder: its newest complete checkpoint, ``broken`` listing the newer ones that are not as (folder,
    problems); the checkpoint is None for a run folder that has no checkpoint at all (it stopped before its first:
    it starts again from step 0). ValueError naming the broken files when no checkpoint can be used."""
    path = os.path.normpath(path)
    if _NAME.match(os.path.basename(path)) and os.path.isdir(path):
        problems = verify_checkpoint(path)
        if problems:
            raise ValueError(f"--resume: the checkpoint {_broken(path, problems)}; resume from the run folder "
                             f"{os.path.dirname(path)!r} to use its newest complete checkpoint")
        return os.path.dirname(path), path, []
    if not os.path.isdir(path):
        raise ValueError(f"--resume: {path!r} is not a run folder or a checkpoint-* folder")
    broken = []
    for folder in _candidates(path):
        problems = verify_checkpoint(folder)
        if not problems:
            return path, folder, broken
        broken.append((folder, problems))
    if broken:
        raise ValueError(f"--resume: {path!r} holds no complete checkpoint: "
                         + " | ".join(_broken(f, p) for f, p in broken)
                         + ". Move these folders away to start the run again from step 0")
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise ValueError(f"--resume: {path!r} is not a blipfast train run folder (no config.yaml, no checkpoint-*)")
    return path, None, []


def set_aside(broken: list) -> list:
    """Rename each broken checkpoint folder of ``broken`` (as :func:`find_checkpoint` lists them) to
    ``<folder>.broken`` (``.broken-2``, ... when taken); returns the messages that say so."""
    notes = []
    for folder, problems in broken:
        new, k = folder + ".broken", 1
        while os.path.exists(new):
            k += 1
            new = f"{folder}.broken-{k}"
        os.replace(folder, new)
        notes.append(f"--resume: {_broken(folder, problems)}: renamed {os.path.basename(new)} and skipped")
    return notes


def load_checkpoint(ckpt: str, read_weights) -> dict:
    """``read_weights(ckpt)`` loads the weights; returns the training state of ``state.pt``. ValueError naming the
    file that cannot be read."""
    try:
        read_weights(ckpt)
    except ValueError:
        raise
    except Exception as exc:  # a library's error for a damaged file
        raise ValueError(f"--resume: cannot read the weights of {ckpt!r}: {type(exc).__name__}: {exc}") from None
    path = os.path.join(ckpt, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # EOFError (empty), RuntimeError (truncated), UnpicklingError, FileNotFoundError
        raise ValueError(f"--resume: cannot read {path!r} (empty, truncated or damaged?): {type(exc).__name__}: "
                         f"{exc}") from None
