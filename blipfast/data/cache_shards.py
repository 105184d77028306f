"""``blipfast cache-features`` on WebDataset shards: every rank runs the frozen vision encoder over its slice of the
input shards and writes feature shards (:mod:`blipfast.data.feature_shards`) that training streams without any
annotation file.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``; the device is ``cuda:LOCAL_RANK``) rank ``r`` of ``W`` caches
input shards ``r, r + W, ...`` of the list ``--data`` names, so W GPUs cache W times as fast, each writing its
own output shards (``r<rank>-<n>.safetensors``) and its progress (``rank-<rank>.json``). The progress is per
input shard (the offset written up to, and whether it is done), so a rerun with the same settings redoes at most
the unwritten rows of the shards that were being read; another vision model, dtype, shard list or world size is
refused. ``index.json`` is written by the last rank to finish (it finds every rank's input shards done in the
progress files; no collective, so a rank that finishes hours after the others keeps nobody waiting on a timeout),
and again by any rerun that finds everything done.

Each output row is one image: its tokens (``ln_vision``'s input, as :class:`blipfast.data.vision.VisionTower`
returns them), its key, its int64 id (:func:`blipfast.data.shards.key_image_id`) and its caption as the shard
has it (LAVIS' ``pre_caption`` runs when training reads it). The images go through the vision model's processor
in the DataLoader workers (PIL), or, with ``gpu_decode``, are decoded and processed on the device in batches
(:class:`blipfast.data.gpu_decode.BatchImageDecoder`). Bad samples (no image, no caption, an image that does not
decode, a broken tar) are skipped, counted and reported with their shard and key.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..options import resolve_device, resolve_dtype
from .feature_shards import DTYPES, FeatureShardWriter, write_index
from .image_stream import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEY, ImageTextSource
from .shards import expand_shards, is_remote
from .stream import ShardReader


def _same(batch):
    return batch


def _encoded(data: bytes) -> bytes:  # --gpu-decode: the workers pass the encoded bytes on
    return data


def _preprocess(processor, image):
    from .vision import preprocess

    return preprocess(processor, image)


def _source_name(url: str) -> str:
    return url if is_remote(url) else os.path.abspath(url)


def _all_done(out: str, names: list, world: int) -> bool:
    """Every rank's input shards are done, as the progress files in ``out`` say."""
    for r in range(world):
        mine = names[r::world]
        if not mine:
            continue
        path = os.path.join(out, f"rank-{r:05d}.json")
        if not os.path.isfile(path):
            return False
        with open(path) as fh:
            sources = json.load(fh).get("sources", {})
        if not all(sources.get(n, {}).get("done") for n in mine):
            return False
    return True


def dist_env() -> tuple[int, int, int]:
    """(rank, world, local rank) of this process: torchrun's environment, else (0, 1, 0)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE {world})")
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


def cache_feature_shards(data, vision: str, out: str, *, batch_size: int = 64, shard_size: int = 1024,
                         dtype: str = "bf16", device: Optional[str] = None, vision_dtype: str = "auto",
                         num_workers: int = 0, image_key: str = DEFAULT_IMAGE_KEY,
                         caption_key: str = DEFAULT_CAPTION_KEY, gpu_decode: bool = False,
                         rank: Optional[int] = None, world: Optional[int] = None, progress: bool = True,
                         log=print) -> dict:
    """Write (or complete) this rank's feature shards of the WebDataset shards ``data`` into ``out`` (see the
    module docstring); ``rank`` / ``world`` default to torchrun's. Returns the counts (and ``index``, the index
    when this call wrote it)."""
    from tqdm.auto import tqdm

    from .vision import describe, load_image_processor, load_vision_tower

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, v in (("--batch-size", batch_size), ("--shard-size", shard_size), ("--num-workers", num_workers + 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    env_rank, env_world, local = dist_env()
    rank, world = (env_rank if rank is None else rank), (env_world if world is None else world)
    urls = expand_shards(data)
    names = [_source_name(u) for u in urls]
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local)
    vdt = resolve_dtype(vision_dtype, dev, flag="--vision-dtype")
    tower, processor = load_vision_tower(vision, device=dev, dtype=vdt)
    ident = describe(vision)
    meta = {"vision_config": ident.get("config.json"), "processor_config": ident.get("preprocessor_config.json"),
            "input_shards": len(urls), "world": world}
    writer = FeatureShardWriter(out, rank=rank, dtype=dtype, shard_size=shard_size, meta=meta)
    mine = list(zip(urls, names))[rank::world]
    jobs = [(u, writer.resume_offset(n)) for u, n in mine if writer.resume_offset(n) is not None]
    name_of = dict(mine)
    decoder = None
    if gpu_decode:
        from .gpu_decode import BatchImageDecoder

        # the processor's tensor backend runs on the device (its resize is not PIL's: other pixels than the CPU path)
        decoder = BatchImageDecoder(load_image_processor(vision, where="--vision", backend="torchvision"), dev)
        source = ImageTextSource(None, _encoded, image_decoder=_encoded, text_transform=None, image_key=image_key,
                                 caption_key=caption_key)
    else:
        source = ImageTextSource(None, functools.partial(_preprocess, processor), text_transform=None,
                                 image_key=image_key, caption_key=caption_key)
    workers = min(num_workers, len(jobs))
    loader = DataLoader(ShardReader(jobs, source, batch_size), batch_size=None, collate_fn=_same,
                        num_workers=workers, pin_memory=dev.type == "cuda" and decoder is None,
                        prefetch_factor=4 if workers else None)
    amp = torch.autocast(dev.type, dtype=vdt) if vdt != torch.float32 else torch.autocast(dev.type, enabled=False)
    counts = {"rank": rank, "world": world, "input_shards": len(mine), "already_done": len(mine) - len(jobs),
              "written": 0, "bad_samples": 0}
    bar = tqdm(total=len(jobs), desc=f"cache-features rank {rank}", unit="shard", disable=not progress,
               file=sys.stderr)
    for b in loader:
        src = name_of[b["__source__"]]
        counts["bad_samples"] += b["__bad__"]
        rows = list(range(len(b["__offsets__"])))
        if rows and decoder is not None:
            px, rows, errors = decoder(b["pixel_values"])
            for i, why in errors.items():
                counts["bad_samples"] += 1
                print(f"blipfast cache-features: skipped sample {b['__key__'][i]!r} of shard {b['__source__']}: "
                      f"{why}", file=sys.stderr, flush=True)
        elif rows:
            px = b["pixel_values"]
        if rows:
            with torch.no_grad(), amp:
                tokens = tower(px.to(dev, dtype=vdt, non_blocking=True))
            writer.add(src, [b["__offsets__"][i] for i in rows], [b["__key__"][i] for i in rows],
                       [b["image_id"][i] for i in rows], [b["caption"][i] for i in rows], tokens.float())
            counts["written"] += len(rows)
        if b["__end__"]:
            writer.end_source(src)
            bar.update(1)
    bar.close()
    writer.close()
    done = _all_done(out, names, world)
    if done:
        counts["index"] = write_index(out)
    where = f"rank {rank} of {world}: " if world > 1 else ""
    tail = (f"{out} holds {counts['index']['images']} image(s), {counts['index']['pairs']} pair(s) in "
            f"{len(counts['index']['shards'])} feature shard(s)" if done else
            "the last rank to finish writes index.json")
    log(f"cache-features: {where}{len(jobs)} input shard(s) read, {counts['already_done']} already done; "
        f"{counts['written']} image(s) written, {counts['bad_samples']} bad sample(s) skipped; {tail}")
    return counts
