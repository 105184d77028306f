"""``blipfast cache-features``: run the frozen vision encoder once over a data set's images and keep its tokens.

On WebDataset shards it writes feature shards, every ``torchrun`` rank its own (:mod:`blipfast.data.cache_shards`,
:mod:`blipfast.data.feature_shards`: the captions inside, streamed sequentially by training, fp8 possible). On an
annotation file it writes the cache below, which training reads with the same annotation file.

BLIP-2's ViT-g costs about 520 GFLOP per image and is frozen in stage 1 (docs/semantics.md#cost-model): training for E
epochs from images pays it E times, training from this cache once. The cache is a folder:

- ``shard-00000.safetensors``, ...: one tensor ``features`` [n, N, width] each (``--dtype``, bf16 by default),
  the tokens that ``ln_vision`` takes (the encoder output before the tower's final LayerNorm; see
  :mod:`blipfast.data.vision`), ``--shard-size`` images per shard;
- ``index.json``: the vision model's config and image processor config, dtype, N, width, every shard's list of
  image keys (the paths as the annotation file writes them) and the images that could not be read, with why.

``--views V`` (V > 1) stores V augmented views of every image, shards ``[n, V, N, width]``: view ``v`` of image
``key`` is the train transform of ``--augment`` (a recipe of :mod:`blipfast.data.transforms`; ``reference`` is
BLIP-2's ``blip2_image_train``, the frozen-ViT recipe) at ``(seed, epoch = v, index = view_index(key))``, the
processor's size, mean and std; index.json records the recipe, the seed and the rule, so every view can be drawn
again. Training picks view ``(epoch + offset) mod V`` of a pair at each visit (:func:`view_of`), a new view every
epoch for V epochs, the same on resume.

A shard and then the index are written under temporary names and renamed, so an interrupted run leaves a valid
cache; running the command again continues where it stopped (the images already in the index are skipped) and
refuses a different vision model or dtype; an image skipped as unreadable is tried again when its file
changed (size or modification time) or with ``--retry-skipped``. Training with ``--features`` reads rows straight
from the memory-mapped shards (:class:`FeatureCache`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..files import share
from ..files import write_json_atomic as _write_json_atomic
from ..options import (DTYPES, EXIT_OK, EXIT_USAGE, add_device_argument, add_dtype_argument, dtype_name,
                       resolve_device, resolve_dtype)

FORMAT = "blipfast-features"
VIEW_RULE = "TrainTransform(augment, size, seed)(image, epoch=view, index=view_index(key))"


def view_index(key: str) -> int:
    """The sample index an image's views are seeded with: a hash of its key (the same in every run over any
    annotation file that names the image)."""
    from .shards import hash63

    return hash63(key)


def view_of(views: int, seed: int, epoch: int, index: int) -> int:
    """The view a training run seeded ``seed`` reads for pair ``index`` in ``epoch``: ``(epoch + offset) mod
    views``, ``offset`` a hash of (seed, index), so every pair cycles through all its views, each from its own
    start."""
    if views <= 1:
        return 0
    from .transforms import view_seeds

    return (epoch + view_seeds(seed, 0, index)[1]) % views


def _file_stat(path: str) -> Optional[list]:
    """[size, mtime_ns] of a file (None when missing): what tells a skipped image's file changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class FeatureCache:
    """Read access to a cache folder written by :func:`cache_features` (memory-mapped safetensors shards)."""

    def __init__(self, path: str):
        index = os.path.join(path, "index.json")
        if not os.path.isfile(index):
            raise ValueError(f"--features: {path!r} is not a feature cache (no index.json; write one with "
                             f"`blipfast cache-features`)")
        with open(index) as fh:
            self.index = json.load(fh)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"--features: {index!r} is not a blipfast feature index")
        self.path = path
        self.dtype = DTYPES[self.index["dtype"]]
        self.tokens, self.width = int(self.index["tokens"] or 0), int(self.index["width"])
        self.views = int(self.index.get("views", 1))
        self.where = {}
        for s, shard in enumerate(self.index["shards"]):
            for r, key in enumerate(shard["images"]):
                self.where[key] = (s, r)
        self.skipped = dict(self.index.get("skipped", {}))
        self._open: dict = {}
        self._pid = None

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def _slice(self, s: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # DataLoader workers re-open the memory maps
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            f = safe_open(os.path.join(self.path, self.index["shards"][s]["file"]), framework="pt")
            self._open[s] = (f, f.get_slice("features"))
        return self._open[s][1]

    def get(self, key: str, view: int = 0) -> torch.Tensor:
        """The tokens [N, width] of image ``key``, its view ``view`` (a copy, in the cache's dtype)."""
        if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < self.views:
            raise ValueError(f"view must be an int in [0, {self.views}), got {view!r}")
        s, r = self.where[key]
        return self._slice(s)[r, view] if self.views > 1 else self._slice(s)[r]

    def __getstate__(self):  # picklable for DataLoader workers: the maps are re-opened there
        state = dict(self.__dict__)
        state["_open"], state["_pid"] = {}, None
        return state


class _Images(Dataset):
    """(key, pixels [3, H, W] or, with ``augment`` and ``views``, [V, 3, H, W], error) of each image."""

    def __init__(self, keys, images_dir, processor, augment=None, views: int = 1):
        self.keys, self.images_dir, self.processor = keys, images_dir, processor
        self.augment, self.views = augment, views

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        from .vision import ImageReadError, load_image, preprocess

        key = self.keys[i]
        try:
            image = load_image(os.path.join(self.images_dir, key))
        except ImageReadError as exc:
            return key, None, str(exc)
        if self.augment is None:
            return key, preprocess(self.processor, image), None
        idx = view_index(key)
        return key, torch.stack([self.augment(image, v, idx) for v in range(self.views)]), None


def _collate(rows):
    return rows


def cache_features(data: str, images: str, vision: str, out: str, *, batch_size: int = 64, shard_size: int = 1024,
                   dtype: str = "bf16", device: Optional[str] = None, vision_dtype: str = "auto",
                   num_workers: int = 0, progress: bool = True, retry_skipped: bool = False, views: int = 1,
                   augment: Optional[str] = None, seed: int = 0, log=print) -> dict:
    """Write (or complete) the cache ``out`` for the images of annotation file ``data``; returns the counts.
    ``retry_skipped``: read again every image an earlier run skipped (by default only those whose file changed).
    ``views``: augmented views per image (see the module docstring), drawn with the train transform ``augment``
    (``none``, ``reference`` = ``blip2_image_train``, or a recipe of :data:`blipfast.data.transforms.RECIPES`;
    default: ``none`` for one view, ``reference`` for more) seeded ``seed``."""
    from tqdm.auto import tqdm

    from .annotations import read_annotations
    from .vision import describe, load_vision_tower

    dtype = dtype_name(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, v in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    recipe = _view_recipe(views, augment, seed)
    dev = resolve_device(device)
    vdt = resolve_dtype(vision_dtype, dev, flag="--vision-dtype")
    ann = read_annotations(data, images)
    for msg in ann.bad:
        log(f"  {msg}")
    tower, processor = load_vision_tower(vision, device=dev, dtype=vdt)
    transform = None
    if recipe != "none":
        from .transforms import train_transform

        transform = train_transform(recipe, processor, seed)
    ident = describe(vision)
    index_path = os.path.join(out, "index.json")
    view_keys = {"views": views, "augment": recipe, "seed": seed if recipe != "none" else None}
    if os.path.isfile(index_path):
        with open(index_path) as fh:
            index = json.load(fh)
        old_views = {"views": index.get("views", 1), "augment": index.get("augment", "none"), "seed": index.get("seed")}
        for key, want in (("dtype", dtype), ("vision_config", ident.get("config.json")),
                          ("processor_config", ident.get("preprocessor_config.json"))):
            if index.get(key) != want:
                raise ValueError(f"--out: {out!r} holds features with another {key.replace('_', ' ')}; use a new "
                                 f"folder (or the same --vision and --dtype to continue it)")
        if old_views != view_keys:
            raise ValueError(f"--out: {out!r} holds {old_views['views']} view(s) per image (--augment "
                             f"{old_views['augment']}, seed {old_views['seed']}), not {views} ({recipe}, seed "
                             f"{view_keys['seed']}); use a new folder or the same --views / --augment / --seed")
    else:
        index = {"format": FORMAT, "version": 1, "dtype": dtype, "tokens": None, "width": tower.width,
                 "vision_config": ident.get("config.json"), "processor_config": ident.get("preprocessor_config.json"),
                 "vision_path": ident["path"], "shards": [], "skipped": {}}
        if views > 1 or recipe != "none":
            index.update(view_keys, view_rule=VIEW_RULE)
    seen = index.setdefault("skipped_files", {})
    retried = [k for k in index["skipped"] if retry_skipped or _file_stat(os.path.join(images, k)) != seen.get(k)]
    for k in retried:
        del index["skipped"][k]
        seen.pop(k, None)
    if retried:
        log(f"  {len(retried)} image(s) skipped by an earlier run read again ("
            + ("--retry-skipped)" if retry_skipped else "their file changed)"))
    done = {k for s in index["shards"] for k in s["images"]} | set(index["skipped"])
    todo = [k for k in ann.images if k not in done]
    present = len(ann.images) - len(todo)
    os.makedirs(out, exist_ok=True)
    counts = {"written": 0, "already_present": present, "skipped": 0, "bad_rows": len(ann.bad), "retried": len(retried)}
    keys, feats = [], []

    def flush():
        if not keys and not counts["skipped"]:
            return
        if keys:
            from safetensors.torch import save_file

            name = f"shard-{len(index['shards']):05d}.safetensors"
            tmp = os.path.join(out, name + ".tmp")
            save_file({"features": torch.cat(feats).contiguous()}, tmp, metadata={"format": FORMAT})
            share(tmp)  # safetensors writes 0600
            os.replace(tmp, os.path.join(out, name))
            index["shards"].append({"file": name, "images": list(keys)})
            keys.clear()
            feats.clear()
        _write_json_atomic(index_path, index)

    loader = DataLoader(_Images(todo, images, processor, transform, views), batch_size=batch_size,
                        num_workers=num_workers,
                        collate_fn=_collate, pin_memory=dev.type == "cuda")
    amp = torch.autocast(dev.type, dtype=vdt) if vdt != torch.float32 else torch.autocast(dev.type, enabled=False)
    bar = tqdm(total=len(todo), desc="cache-features", unit="img", disable=not progress, file=sys.stderr)
    for rows in loader:
        good = [(k, px) for k, px, err in rows if err is None]
        for k, px, err in rows:
            if err is not None:
                index["skipped"][k] = err
                seen[k] = _file_stat(os.path.join(images, k))
                counts["skipped"] += 1
                log(f"  {err} (skipped)")
        if good:
            px = torch.stack([p for _, p in good]).to(dev, dtype=vdt, non_blocking=True)
            if transform is not None:  # [n, V, 3, H, W]: the views go through the tower as one batch
                px = px.flatten(0, 1)
            with amp:
                tok = tower(px)
            if index["tokens"] is None:
                index["tokens"] = int(tok.shape[1])
            tok = tok.to(DTYPES[dtype]).cpu()
            feats.append(tok.unflatten(0, (len(good), views)) if views > 1 else tok)
            keys.extend(k for k, _ in good)
            counts["written"] += len(good)
            if len(keys) >= shard_size:
                flush()
        bar.update(len(rows))
    bar.close()
    flush()
    if not os.path.isfile(index_path):
        _write_json_atomic(index_path, index)
    counts["total_in_cache"] = sum(len(s["images"]) for s in index["shards"])
    log(f"cache-features: {counts['written']} image(s) written, {counts['already_present']} already in the cache, "
        f"{counts['skipped']} unreadable skipped, {counts['bad_rows']} bad annotation row(s); {out} holds "
        f"{counts['total_in_cache']} image(s) in {len(index['shards'])} shard(s)")
    return counts


def _view_recipe(views, augment: Optional[str], seed) -> str:
    """The transform recipe of ``--views`` / ``--augment`` ("none" for the processor's pixels), checked."""
    from .transforms import RECIPES, _index

    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"--views must be a positive int, got {views!r}")
    _index("--seed", seed)
    if augment is None:
        augment = "none" if views == 1 else "reference"
    recipe = "blip2_image_train" if augment == "reference" else augment
    if recipe != "none" and recipe not in RECIPES:
        raise ValueError(f"--augment must be none, reference or one of {sorted(RECIPES)}, got {augment!r}")
    if views > 1 and recipe == "none":
        raise ValueError(f"--views {views} with --augment none would store {views} copies of the same view; give "
                         f"--augment reference (or a recipe), or --views 1")
    return recipe


# ----------------------------------------------------------------------------------------------
# the command


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="WebDataset shards ('shards/{00000..01743}.tar', a folder of .tar "
                   "files, a list file, URLs or 'pipe:' commands; img2dataset's layout): feature shards that hold the "
                   "captions, written by every torchrun rank; or an annotation file (JSONL or a LAVIS/BLIP JSON list "
                   "of {'image': relative path, 'caption': text or list}, with --images): a feature cache read with "
                   "that --data")
    p.add_argument("--images", help="annotation file: the folder its image paths are relative to")
    p.add_argument("--vision", required=True, help="local Hugging Face vision model folder (Blip2VisionModel, "
                   "CLIPVisionModel, SiglipVisionModel, a composite BLIP-2/CLIP/SigLIP checkpoint, or any AutoModel "
                   "tower) with its preprocessor_config.json")
    p.add_argument("--out", required=True, help="cache folder (created; an existing cache is continued)")
    add_dtype_argument(p, "dtype of the stored tokens", default="bf16",
                       note="fp8: e4m3 with a per-token scale, half of bf16's disk, shards only", extra=("fp8",))
    add_dtype_argument(p, "dtype the vision model runs in, under autocast", flag="--vision-dtype", default="auto",
                       auto=True)
    p.add_argument("--batch-size", type=int, default=64, help="images per vision forward (default 64)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    add_device_argument(p)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding DataLoader workers (default: min(4, CPU cores))")
    from .image_stream import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEY

    p.add_argument("--image-key", default=DEFAULT_IMAGE_KEY, help=f"shards: the image is the first present of "
                   f"these ';'-separated extensions (default: {DEFAULT_IMAGE_KEY})")
    p.add_argument("--caption-key", default=DEFAULT_CAPTION_KEY, help=f"shards: the caption is the first present "
                   f"of these candidates, an extension's text or EXT:FIELD of a JSON file (default: "
                   f"{DEFAULT_CAPTION_KEY})")
    p.add_argument("--gpu-decode", action="store_true", help="shards: decode the JPEGs on the device in batches "
                   "(nvJPEG through torchvision.io.decode_jpeg) and run the image processor there, for when the CPU "
                   "decoders cannot keep up with the vision model (on a CPU device: the same path on the CPU)")
    p.add_argument("--views", type=int, default=1, help="annotation file: augmented views stored per image (default "
                   "1); training reads view (epoch + offset) mod VIEWS of each pair (docs/training.md#augmentation)")
    p.add_argument("--augment", default=None, help="the train transform of the views: none (the processor's pixels), "
                   "reference (BLIP-2's blip2_image_train) or a recipe (blip-pretrain, blip-finetune, "
                   "blip_image_train, blip2_image_train); default: none for --views 1, reference for more")
    p.add_argument("--seed", type=int, default=0, help="seed of the views' augmentation (default 0)")
    p.add_argument("--retry-skipped", action="store_true", help="read again the images an earlier run skipped as "
                   "unreadable (by default only those whose file changed since)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args) -> int:
    from .shards import looks_like_shards

    try:
        if looks_like_shards(args.data):
            if args.images is not None:
                raise ValueError("--images is for annotation files: WebDataset shards hold their images")
            if args.views != 1 or args.augment not in (None, "none"):
                raise ValueError("--views / --augment are options of an annotation file's cache; feature shards "
                                 "store one view of each image (train from the image shards to augment)")
            from .cache_shards import cache_feature_shards

            cache_feature_shards(args.data, args.vision, args.out, batch_size=args.batch_size,
                                 shard_size=args.shard_size, dtype=args.dtype, device=args.device,
                                 vision_dtype=args.vision_dtype, num_workers=args.num_workers,
                                 image_key=args.image_key, caption_key=args.caption_key, gpu_decode=args.gpu_decode,
                                 progress=not args.no_progress)
            return EXIT_OK
        if args.images is None:
            raise ValueError("--images DIR is needed with an annotation file (the folder its image paths are "
                             "relative to)")
        if args.dtype == "fp8" or args.gpu_decode:
            raise ValueError(f"{'--dtype fp8' if args.dtype == 'fp8' else '--gpu-decode'} is for WebDataset shards "
                             f"(feature shards); an annotation file's cache stores bf16, fp16 or fp32")
        cache_features(args.data, args.images, args.vision, args.out, batch_size=args.batch_size,
                       shard_size=args.shard_size, dtype=args.dtype, device=args.device,
                       vision_dtype=args.vision_dtype, num_workers=args.num_workers, progress=not args.no_progress,
                       retry_skipped=args.retry_skipped, views=args.views, augment=args.augment, seed=args.seed)
    except ValueError as exc:
        print(f"blipfast cache-features: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
