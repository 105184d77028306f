"""Stage-1 datasets (images through the vision model's processor, or cached ViT tokens) and the batch order.

Both datasets return, per pair, the image input (``pixel_values`` [3, H, W] float32, or ``image_embeds``
[N, width] as cached) and the pre-tokenised caption (each tensor of ``text``, e.g. ``input_ids`` and
``attention_mask``, as int64 [T]), the pair's ``image_id`` and its index. Captions are tokenised once up front
(stage 1: :func:`tokenizer.tokenize`; stage 2 adds ``labels``).

:class:`GlobalBatchSampler` fixes the order: epoch e is a permutation drawn from ``seed + e``, cut into global
batches of ``batch_size * world`` pairs (the remainder is dropped, so every step has the same shapes); rank r
takes rows ``[r * B, (r + 1) * B)`` of each global batch. The torch.distributed gathers of ITC and the
negatives then see the global batch in the order one process holding it sees it (a ``DistributedSampler``
interleaves ranks instead), and the position in the data is one number, the micro-batches consumed, so a run
resumes mid-epoch exactly.

:func:`caption_sampling` (``blipfast train --caption-sampling``): "all" (the default) trains every caption as its
own pair; "random" wraps the dataset in :class:`OneCaptionPerImage`, whose items are the images: each visit of an
image (epoch e, image i) reads one of its pairs, chosen by a hash of (seed, e, i), as BLIP-2 draws one of an
image's bootstrapped captions per step (docs/training.md). An epoch is then one pass over the images.
"""
from __future__ import annotations

import hashlib
import sys
from typing import Optional

import torch
from torch.utils.data import Dataset, Sampler

from .annotations import Annotations
from .vision import ImageReadError, load_image, preprocess


class _Pairs(Dataset):
    def __init__(self, ann: Annotations, text: dict):
        bad = [k for k, v in text.items() if not isinstance(v, torch.Tensor) or v.shape[0] != len(ann)]
        if bad:
            raise ValueError(f"text: {bad} must be tensors with one row per pair ({len(ann)})")
        self.ann = ann
        self.text = dict(text)
        self.image_id = torch.tensor(ann.image_id, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.ann)

    def _text(self, p: int) -> dict:
        return {**{k: v[p].long() for k, v in self.text.items()}, "image_id": self.image_id[p],
                "index": torch.tensor(p)}


def visit(item) -> tuple:
    """(epoch, pair index) of a dataset item: an index, or (epoch, index) from ``GlobalBatchSampler(with_epoch=
    True)`` (what a per-sample augmentation is seeded with)."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return int(item[0]), int(item[1])
    return 0, int(item)


class ImageTextDataset(_Pairs):
    """Pairs whose image is read from ``images_dir`` and preprocessed by ``processor`` (the vision model's), or,
    with ``augment`` (a :class:`blipfast.data.transforms.TrainTransform`), augmented: ``augment(image, epoch,
    pair index)``, the epoch from the sampler's items (``GlobalBatchSampler(with_epoch=True)``).

    An image that cannot be read is reported once per process (with its annotation line, also appended to
    ``report_path``) and the pair is replaced by the next readable pair, so batches keep their size and a run
    stays deterministic.
    """

    def __init__(self, ann: Annotations, images_dir: str, processor, text: dict, report_path: Optional[str] = None,
                 augment=None):
        super().__init__(ann, text)
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable (image, epoch, index) -> tensor, got {type(augment).__name__}")
        self.images_dir = images_dir
        self.processor = processor
        self.augment = augment
        self.report_path = report_path
        self._reported: set = set()

    def _report(self, p: int, exc: Exception) -> None:
        if p in self._reported:
            return
        self._reported.add(p)
        msg = f"{self.ann.path}:{self.ann.lines[p]}: {exc} (skipped: the next pair takes its place)"
        print(f"blipfast train: {msg}", file=sys.stderr, flush=True)
        if self.report_path:
            with open(self.report_path, "a") as fh:
                fh.write(msg + "\n")

    def pixels(self, image, epoch: int, index: int) -> torch.Tensor:
        """[3, H, W] float32 of one image: augmented (seeded by ``epoch`` and ``index``) or the processor's."""
        if self.augment is not None:
            return self.augment(image, epoch, index)
        return preprocess(self.processor, image)

    def __getitem__(self, item) -> dict:
        epoch, p = visit(item)
        n = len(self)
        for k in range(n):
            q = (p + k) % n
            try:
                image = load_image(self.ann.image_path(self.images_dir, q))
            except ImageReadError as exc:
                self._report(q, exc)
                continue
            return {"pixel_values": self.pixels(image, epoch, q), **self._text(q)}
        raise ValueError(f"--images: no image of {self.ann.path!r} can be read")


class FeatureTextDataset(_Pairs):
    """Pairs whose image tokens come from a :class:`features.FeatureCache` (every image must be in it). A cache of
    several views per image gives pair ``p`` in epoch ``e`` the view :func:`features.view_of` picks for a run seeded
    ``seed`` (the epoch from ``GlobalBatchSampler(with_epoch=True)``)."""

    def __init__(self, ann: Annotations, cache, text: dict, seed: int = 0):
        super().__init__(ann, text)
        self.cache, self.seed = cache, seed

    def __getitem__(self, item) -> dict:
        from .features import view_of

        epoch, p = visit(item)
        view = view_of(self.cache.views, self.seed, epoch, p)
        return {"image_embeds": self.cache.get(self.ann.images[self.ann.image_index[p]], view), **self._text(p)}


def caption_choice(n: int, seed: int, epoch: int, index: int) -> int:
    """Which of ``n`` captions image ``index`` reads in ``epoch`` of a run seeded ``seed``: a hash of the three
    (blake2b, its own key, unrelated to the augmentations' :func:`blipfast.data.transforms.view_seeds`)."""
    for name, v in (("n", n), ("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "n" else 0):
            raise ValueError(f"caption_choice: {name} must be an int >= {1 if name == 'n' else 0}, got {v!r}")
    digest = hashlib.blake2b(b"blipfast.caption:%d:%d:%d" % (seed, epoch, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


class OneCaptionPerImage(Dataset):
    """One item per image of ``ann`` (in order of first use), reading one of its pairs per visit: item ``(epoch,
    i)`` (``GlobalBatchSampler(with_epoch=True)``) is ``pairs[(epoch, p)]`` with ``p`` the
    :func:`caption_choice`-th pair of image i. The captions stay tokenised once, in ``pairs``' rows."""

    def __init__(self, pairs: Dataset, ann: Annotations, seed: int):
        if len(pairs) != len(ann):
            raise ValueError(f"pairs has {len(pairs)} items, the annotations {len(ann)} pairs")
        groups: dict = {}
        for p, i in enumerate(ann.image_index):
            groups.setdefault(i, []).append(p)
        self.pairs, self.seed = pairs, int(seed)
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def pair(self, epoch: int, i: int) -> int:
        """The pair image ``i`` reads in ``epoch``."""
        g = self.groups[i]
        return g[caption_choice(len(g), self.seed, epoch, i)]

    def __getitem__(self, item) -> dict:
        epoch, i = visit(item)
        return self.pairs[(epoch, self.pair(epoch, i))]


CAPTION_SAMPLING = ("all", "random")  # --caption-sampling


def caption_sampling(ds: Dataset, ann: Annotations, mode: str, seed: int) -> tuple:
    """(the training dataset of ``--caption-sampling mode``, whether its items need the epoch): ``ds`` itself for
    "all", :class:`OneCaptionPerImage` for "random"."""
    if mode not in CAPTION_SAMPLING:
        raise ValueError(f"--caption-sampling must be one of {', '.join(CAPTION_SAMPLING)}, got {mode!r}")
    return (ds, False) if mode == "all" else (OneCaptionPerImage(ds, ann, seed), True)


def collate(rows: list) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class GlobalBatchSampler(Sampler):
    """Yields rank ``rank``'s index list of each micro-batch, forever, starting after ``start`` micro-batches
    (see the module docstring); with ``with_epoch``, (epoch, index) pairs (for a per-sample augmentation).
    ``steps_per_epoch`` = n // (batch_size * world)."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 start: int = 0, with_epoch: bool = False):
        if n < batch_size * world:
            raise ValueError(f"the data set has {n} pairs, fewer than one global batch ({batch_size} x {world} "
                             f"process(es)); lower --batch-size")
        self.n, self.b, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.shuffle, self.start, self.with_epoch = seed, shuffle, start, with_epoch
        self.steps_per_epoch = n // (batch_size * world)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self):
        m = self.start
        bw = self.b * self.world
        while True:
            epoch, k = divmod(m, self.steps_per_epoch)
            perm = self.order(epoch)
            for k in range(k, self.steps_per_epoch):
                lo = k * bw + self.rank * self.b
                rows = perm[lo:lo + self.b].tolist()
                yield [(epoch, p) for p in rows] if self.with_epoch else rows
            m = (epoch + 1) * self.steps_per_epoch

    def __len__(self) -> int:  # one epoch's worth (the iterator itself is endless)
        return self.steps_per_epoch
