"""The references' train-time image transforms, by recipe, deterministic per (seed, epoch, sample index).

Recipes (:data:`RECIPES`). Each crops with torchvision's ``RandomResizedCrop(size, scale=(min_scale, 1.0))`` at
its default aspect ratios (3/4, 4/3) with bicubic resampling, flips horizontally with probability 0.5, and ends
with ``ToTensor`` and CLIP's mean / std:

- ``blip-pretrain``: min_scale 0.2 and RandomAugment; Salesforce BLIP ``pretrain.py``
  (``create_dataset('pretrain', config, min_scale=0.2)``).
- ``blip-finetune``: min_scale 0.5 and RandomAugment; Salesforce BLIP ``train_caption / retrieval / vqa / nlvr.py``.
- ``blip_image_train``: min_scale 0.5 and RandomAugment; LAVIS' processor of that name (its BLIP recipes, the
  pre-training ``pretrain_14m.yaml`` included: LAVIS pre-trains BLIP at 0.5 where Salesforce BLIP used 0.2).
- ``blip2_image_train``: min_scale 0.5, no RandomAugment; LAVIS' processor of that name (BLIP-2 stage 1, stage 2
  and fine-tuning).

``RandomAugment`` is BLIP's (:mod:`blipfast.data.randaugment`: ``RandomAugment(2, 5)`` over
:data:`~blipfast.data.randaugment.BLIP_AUGS`). :class:`EvalTransform` is the references' evaluation transform (a
bicubic resize and CLIP's mean / std, LAVIS' ``blip_image_eval``), or an image processor's.

Determinism: the references draw from the process-wide torch and numpy generators, so what a sample gets depends
on the worker and the order it runs in. Here :func:`view_seeds` hashes (seed, epoch, index) into a torch seed (the
crop and the flip, drawn with a ``torch.Generator`` in the order and with the calls of torchvision's
``RandomResizedCrop.get_params`` and ``RandomHorizontalFlip``) and a numpy seed (RandomAugment's draws, from a
``numpy.random.RandomState``). Seeding the global generators with the same two seeds makes torchvision's and BLIP's
own pipeline draw the very same crop, flip and operations, so the output tensors are identical; and a resumed run,
any number of loader workers, or a feature cache's view ``v`` (epoch ``v``) redraw the same augmentation. The
transforms hold plain values only (they pickle into loader workers). torchvision is imported when a train
transform first runs; the evaluation transform does not need it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .randaugment import RandomAugment
from .shards import hash63

__all__ = ["CLIP_MEAN", "CLIP_STD", "RECIPES", "TRAINING_RECIPES", "Recipe", "TrainTransform", "EvalTransform",
           "StreamAugment", "crop_params", "view_seeds", "to_normalized_tensor", "train_transform"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default, which every reference keeps


@dataclass(frozen=True)
class Recipe:
    """A reference's train transform: crop scale range, horizontal flip, BLIP's RandomAugment or not."""
    min_scale: float
    randaugment: bool
    reference: str
    max_scale: float = 1.0
    flip: float = 0.5


RECIPES = {
    "blip-pretrain": Recipe(0.2, True, "Salesforce BLIP pretrain.py: create_dataset('pretrain', config, 0.2)"),
    "blip-finetune": Recipe(0.5, True, "Salesforce BLIP train_*.py: create_dataset(...) at min_scale 0.5"),
    "blip_image_train": Recipe(0.5, True, "LAVIS processors blip_image_train"),
    "blip2_image_train": Recipe(0.5, False, "LAVIS processors blip2_image_train"),
}


# the train transform of each training recipe (blipfast.train's task recipes: schedules.py, param_groups.py)
TRAINING_RECIPES = {"blip-pretrain": "blip-pretrain", "blip-finetune": "blip-finetune",
                    "blip2-stage1": "blip2_image_train", "blip2-stage2": "blip2_image_train",
                    "blip2-finetune": "blip2_image_train"}


def _index(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")
    return int(v)


def view_seeds(seed: int, epoch: int, index: int) -> tuple:
    """(torch seed, numpy seed) of sample ``index`` in ``epoch`` of a run seeded ``seed``: a hash of the three
    (blake2b), so that neighbouring samples, epochs and seeds draw unrelated augmentations."""
    key = b"blipfast.augment:%d:%d:%d" % (_index("seed", seed), _index("epoch", epoch), _index("index", index))
    digest = hashlib.blake2b(key, digest_size=12).digest()
    return int.from_bytes(digest[:8], "little") >> 1, int.from_bytes(digest[8:], "little")


def crop_params(width: int, height: int, scale: tuple, generator: torch.Generator, ratio: tuple = RATIO) -> tuple:
    """(top, left, height, width) of torchvision's ``RandomResizedCrop.get_params`` with its random draws taken from
    ``generator`` (the same calls in the same order: from the same seed, the same crop)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # torchvision's fallback: a central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """torchvision's ``ToTensor`` then ``Normalize(mean, std)`` of an RGB PIL image or uint8 [H, W, 3] array:
    float32 [3, H, W], the same values bit for bit."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    return x.sub_(torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)).div_(
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def _check_stats(mean, std) -> None:
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise ValueError(f"{name} must be 3 finite numbers, got {v!r}")
    if not all(x > 0 for x in std):
        raise ValueError(f"std must be positive, got {std!r}")


def _rgb(image):
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class TrainTransform:
    """``transform(image, epoch, index)``: the recipe's augmented [3, size, size] float32 tensor of a PIL image,
    the same for the same (seed, epoch, index). :meth:`draw` tells what was drawn."""

    def __init__(self, recipe: str, size: int, seed: int, mean=CLIP_MEAN, std=CLIP_STD):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be an int > 0, got {size!r}")
        _index("seed", seed)
        _check_stats(mean, std)
        self.recipe, self.size, self.seed = recipe, size, int(seed)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        r = RECIPES[recipe]
        self.randaugment: Optional[RandomAugment] = RandomAugment(2, 5) if r.randaugment else None

    def __repr__(self):
        return f"TrainTransform({self.recipe!r}, size={self.size}, seed={self.seed})"

    def draw(self, epoch: int, index: int, width: int, height: int) -> dict:
        """What sample ``index`` of ``epoch`` gets from an image of ``width`` x ``height``: the crop (top, left,
        height, width), the flip, RandomAugment's operations with their arguments, and the two seeds."""
        r = RECIPES[self.recipe]
        tseed, nseed = view_seeds(self.seed, epoch, index)
        g = torch.Generator().manual_seed(tseed)
        crop = crop_params(width, height, (r.min_scale, r.max_scale), g)
        flip = bool(torch.rand(1, generator=g) < r.flip)
        ops = self.randaugment.sample(np.random.RandomState(nseed)) if self.randaugment is not None else []
        return {"crop": crop, "flip": flip, "ops": ops, "torch_seed": tseed, "numpy_seed": nseed}

    def __call__(self, image, epoch: int, index: int) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        image = _rgb(image)
        d = self.draw(epoch, index, *image.size)
        image = F.resized_crop(image, *d["crop"], [self.size, self.size], InterpolationMode.BICUBIC, antialias=True)
        if d["flip"]:
            image = F.hflip(image)
        if self.randaugment is not None:
            image = self.randaugment.apply(image, d["ops"])
        return to_normalized_tensor(image, self.mean, self.std)


class EvalTransform:
    """``transform(image, epoch=None, index=None)``: the evaluation transform of a PIL image, float32 [3, H, W]:
    with ``size``, the references' (Salesforce BLIP's ``transform_test``, LAVIS' ``blip_image_eval``: PIL's bicubic
    resize to size x size, ``ToTensor``, ``Normalize(mean, std)``, bit for bit, without torchvision); with
    ``processor``, that image processor's output. No randomness: epoch and index are ignored."""

    def __init__(self, size: Optional[int] = None, mean=CLIP_MEAN, std=CLIP_STD, processor=None):
        if processor is None:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"EvalTransform: give a size (an int > 0) or a processor, got size={size!r}")
            _check_stats(mean, std)
        self.size, self.mean, self.std, self.processor = size, tuple(mean), tuple(std), processor

    def __call__(self, image, epoch: Optional[int] = None, index: Optional[int] = None) -> torch.Tensor:
        from PIL import Image

        image = _rgb(image)
        if self.processor is not None:
            from .vision import preprocess

            return preprocess(self.processor, image)
        return to_normalized_tensor(image.resize((self.size, self.size), Image.BICUBIC), self.mean, self.std)


def _processor_geometry(processor) -> tuple:
    """(size, mean, std) of an image processor that resizes to a square (BLIP's and BLIP-2's processors)."""
    size = getattr(processor, "size", None)
    if isinstance(size, int):
        side = size
    else:  # a dict, or transformers' SizeDict

        def get(key):
            return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

        h, w = get("height"), get("width")
        side = h if h is not None and h == w else get("shortest_edge")
    if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
        raise ValueError(f"the image processor resizes to {size!r}: a train transform needs a square size")
    mean = getattr(processor, "image_mean", None) or CLIP_MEAN
    std = getattr(processor, "image_std", None) or CLIP_STD
    return side, tuple(mean), tuple(std)


def train_transform(recipe: str, processor, seed: int) -> "TrainTransform":
    """The train transform of a training recipe (a key of :data:`TRAINING_RECIPES`, e.g. ``blip2-stage1``, or of
    :data:`RECIPES`) at the size, mean and std of the model's image processor (what its evaluation transform
    produces), seeded ``seed``."""
    name = TRAINING_RECIPES.get(recipe, recipe)
    if name not in RECIPES:
        raise ValueError(f"recipe {recipe!r} has no train transform (known: {sorted(TRAINING_RECIPES)}, "
                         f"{sorted(RECIPES)})")
    size, mean, std = _processor_geometry(processor)
    return TrainTransform(name, size, seed, mean, std)


class StreamAugment:
    """A :class:`TrainTransform` as a per-sample image transform of WebDataset shards
    (:class:`blipfast.data.image_stream.ImageTextSource`): each reading of a sample (its ``draw``, unique in the
    stream and the same on resume) seeds the augmentation with the pass ``epoch``, so a resampled stream, which
    reads an image many times in pass 0, still draws a new view each time."""

    per_sample = True

    def __init__(self, transform: TrainTransform):
        if not isinstance(transform, TrainTransform):
            raise TypeError(f"transform must be a TrainTransform, got {type(transform).__name__}")
        self.transform = transform

    def __repr__(self):
        return f"StreamAugment({self.transform!r})"

    @staticmethod
    def index(key: str, draw) -> int:
        """The sample index the augmentation is seeded with: a hash of the reading's ``draw`` (of ``key`` when the
        stream gives no draw)."""
        return hash63(repr(tuple(draw)) if draw is not None else f"key:{key}")

    def __call__(self, image, *, key: str, epoch: int, draw=None) -> torch.Tensor:
        return self.transform(image, epoch, self.index(key, draw))
