"""The trainer's streamed inputs: WebDataset image-text shards (``--data SHARDS``) and feature shards
(``--features FEATS`` written by ``blipfast cache-features`` from shards), and what the loop records of them.

:class:`StreamInput` builds each process' loader (:func:`blipfast.data.image_stream.image_text_loader` or
:func:`blipfast.data.feature_shards.feature_text_loader`): the shards split over the ``world x num_workers``
logical workers, a shuffle buffer, batches of ``--batch-size`` made in the workers. There the images go through
the vision model's processor (``pixel_values``; a per-sample augmentation can replace
:attr:`StreamInput.image_transform`, see :class:`blipfast.data.image_stream.ImageTextSource`), the captions through LAVIS' ``pre_caption`` (at most the
task's ``max_words``) and the task's ``tokenize`` (one batch at a time, fixed widths); feature shards give
``image_embeds`` as stored, and for fp8 ``image_scale``, decoded on the device by the step
(:func:`blipfast.data.feature_shards.decode`). Nothing holds all captions or keys: host memory does not grow with
the data.

An epoch is ``--samples-per-epoch`` samples (default: the size the shards' folder records, or the feature
shards' pairs): ``samples // (batch x world)`` micro-steps. The position in the stream is each rank's
:meth:`blipfast.data.stream.StreamLoader.state_dict` (per worker: its shard position, its shuffle buffer's sample
positions and random state): the checkpoint holds every rank's (``data_streams``) and each rank resumes from its
own, so a resumed run reads the batches of an uninterrupted one (with the same ``--num-workers``). The loader
records a batch as consumed when it hands it out and the loop trains on every batch it takes, so the state taken
between steps is that of the batches trained on (the DataLoader's prefetched batches are not counted).

:class:`KeysLog` (``--log-keys``) writes each micro-batch's sample keys per rank, for audits of the data order.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Optional

from ..data.annotations import pre_caption
from ..data.shards import expand_shards, samples_per_epoch
from .config import STREAMS


def _tokenize(task, model, tok, cfg: dict, captions: list) -> dict:
    """The task's tokens of one batch, int64 as the annotation file's batches hold them (blipfast.data.datasets)."""
    return {k: v.long() for k, v in task.tokenize(model, tok, captions, cfg).items()}


def _preprocess(processor, image):
    from ..data.vision import preprocess

    return preprocess(processor, image)


class StreamInput:
    """Process ``dist.rank``'s stream of ``kind`` ("shards" or "feature-shards") for the trainer's options
    ``cfg``: checks the shards and the epoch's size up front; :meth:`loader` builds the loader (at the start, or
    at a recorded position)."""

    def __init__(self, kind: str, cfg: dict, dist, *, workers: int, auto_workers: bool):
        from ..data.feature_shards import FeatureShards

        if kind not in STREAMS:
            raise ValueError(f"StreamInput: kind must be one of {STREAMS}, got {kind!r}")
        self.kind, self.cfg, self.dist = kind, cfg, dist
        if kind == "feature-shards":
            self.index = FeatureShards(cfg["features"])
            self.urls, self.where = self.index.urls, cfg["features"]
            given = cfg["samples_per_epoch"]
            self.samples = self.index.pairs if given is None else samples_per_epoch(self.urls, given)
        else:
            self.index = None
            self.urls, self.where = expand_shards(cfg["data"]), cfg["data"]
            self.samples = samples_per_epoch(self.urls, cfg["samples_per_epoch"])
        bw = cfg["batch_size"] * dist.world
        if self.samples < bw:
            raise ValueError(f"--samples-per-epoch: {self.samples} samples, fewer than one global batch "
                             f"({cfg['batch_size']} x {dist.world} process(es)); lower --batch-size")
        self.micro_per_epoch = self.samples // bw
        per_rank = len(self.urls) // dist.world
        if auto_workers and not cfg["resampled"]:  # every worker needs a shard of its own
            workers = max(0, min(workers, per_rank))
        self.workers = workers
        self.image_transform = None  # set by the trainer for image shards (the vision model's processor)
        self.tokenize = None

    def summary(self) -> str:
        what = "feature shards" if self.kind == "feature-shards" else "WebDataset shards"
        pairs = f", {self.index.pairs} pairs over {self.index.images} images" if self.index is not None else ""
        return (f"{self.where}: {len(self.urls)} {what}{pairs}, {self.samples} samples per epoch"
                f"{' (resampled)' if self.cfg['resampled'] else ''}")

    def set_transforms(self, task, model, tok, processor=None, augment=None) -> None:
        """The task's tokenize (one batch of captions at a time) and the image transform of image shards: the
        train transform ``augment`` (a :class:`blipfast.data.transforms.TrainTransform`, seeded per reading of a
        sample) or the image processor."""
        from ..data.transforms import StreamAugment

        self.tokenize = functools.partial(_tokenize, task, model, tok, self.cfg)
        self.text_transform = functools.partial(pre_caption, max_words=task.max_words)
        if augment is not None:
            self.image_transform = StreamAugment(augment)
        elif processor is not None:
            self.image_transform = functools.partial(_preprocess, processor)

    def loader(self, state: Optional[dict] = None):
        """The :class:`blipfast.data.stream.StreamLoader` of this rank (from ``state``: its ``state_dict()``)."""
        from ..data.feature_shards import feature_text_loader
        from ..data.image_stream import image_text_loader

        cfg, d = self.cfg, self.dist
        # the sources hold the task's tokenize and the processor (closures over the model): the workers fork
        ctx = "fork" if self.workers and "fork" in multiprocessing.get_all_start_methods() else None
        args = dict(batch_size=cfg["batch_size"], rank=d.rank, world=d.world, num_workers=self.workers,
                    seed=cfg["seed"], shuffle_buffer=cfg["shuffle_buffer"], resampled=cfg["resampled"], state=state,
                    pin_memory=d.device.type == "cuda", with_keys=cfg["log_keys"], multiprocessing_context=ctx)
        if self.kind == "feature-shards":  # stored dtype; fp8 is scaled back on the device by the step
            return feature_text_loader(cfg["features"], tokenize=self.tokenize, dtype=None,
                                       text_transform=self.text_transform, **args)
        return image_text_loader(self.urls, tokenize=self.tokenize, image_transform=self.image_transform,
                                 image_key=cfg["image_key"], caption_key=cfg["caption_key"],
                                 text_transform=self.text_transform, **args)

    def check_states(self, states, micro_step: int) -> dict:
        """This rank's state of a checkpoint's ``data_streams`` (one per rank), checked against the run."""
        d = self.dist
        if not isinstance(states, list) or len(states) != d.world:
            n = len(states) if isinstance(states, list) else "no"
            raise ValueError(f"--resume: the checkpoint holds the stream positions of {n} process(es), this run has "
                             f"{d.world}; resume a stream with as many processes")
        state = states[d.rank]
        if int(state.get("batches", -1)) != micro_step:
            raise ValueError(f"--resume: the checkpoint's stream position ({state.get('batches')} batches) is not "
                             f"its step's ({micro_step} micro-steps)")
        return state


class KeysLog:
    """``--log-keys``: ``RUN/keys-rank<R>.txt``, one line per micro-batch: the micro-step, a tab, the batch's
    sample keys separated by spaces. On ``--resume`` the lines from micro-step ``start`` on are dropped first (an
    interrupted invocation wrote them after its last checkpoint), so the file reads as one run."""

    def __init__(self, run_dir: str, rank: int, start: int):
        self.path = os.path.join(run_dir, f"keys-rank{rank:05d}.txt")
        kept = []
        if os.path.isfile(self.path):
            with open(self.path) as fh:
                kept = [ln for ln in fh if ln.split("\t", 1)[0].isdigit() and int(ln.split("\t", 1)[0]) < start]
        self._fh = open(self.path, "w")
        self._fh.writelines(kept)
        self._fh.flush()

    def write(self, micro_step: int, keys) -> None:
        self._fh.write(f"{micro_step}\t{' '.join(map(str, keys))}\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_keys(run_dir: str, rank: int = 0) -> dict:
    """``{micro_step: [keys]}`` of a run's :class:`KeysLog` of ``rank``."""
    out = {}
    with open(os.path.join(run_dir, f"keys-rank{rank:05d}.txt")) as fh:
        for line in fh:
            step, keys = line.rstrip("\n").split("\t", 1)
            out[int(step)] = keys.split(" ") if keys else []
    return out
