"""NLVR2 data as Salesforce BLIP reads it (``data/nlvr_dataset.py``; docs/blip-finetune.md): two images and a
sentence per example, and the trainer's dataset of image pairs.

Files: JSON lists or JSON lines of objects with ``images`` (the two image paths relative to the image folder),
``sentence`` and ``label`` (``"True"`` / ``"False"`` as BLIP's ``nlvr_train.json`` / ``nlvr_dev.json`` /
``nlvr_test.json`` write it, or a JSON bool), optionally ``identifier`` (NLVR2's, the evaluation's key; else the
row number). Sentences go through BLIP's ``pre_caption(sentence, 40)``.

BLIP's training augmentation swaps the two images of an example with probability 0.5, and when the sentence has
the word ``left`` or ``right`` (exactly, as a space-separated word) swaps those words too.
:func:`swapped_sentence` gives the sentence with its words swapped (the task tokenises both versions); the draw
itself happens on the device in the training step (a Philox draw keyed by the step's seed and the example's
index: deterministic, resumable, no host synchronisation). BLIP's dataset class also swaps at evaluation (it is
the same class); here evaluation does not swap.

:func:`make_synthetic_nlvr2` writes a small set of drawn image pairs for ``blipfast train --task blip-nlvr`` without
``--data``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Optional

import torch

from .annotations import Annotations, _rows, pre_caption
from .datasets import ImageTextDataset, visit
from .vision import ImageReadError, load_image

__all__ = ["Nlvr2Annotations", "Nlvr2Dataset", "make_synthetic_nlvr2", "read_nlvr2", "swapped_sentence"]

MAX_WORDS = 40  # BLIP's nlvr_dataset: pre_caption(ann['sentence'], 40)


def swapped_sentence(sentence: str) -> str:
    """BLIP's left/right swap of a processed sentence (space-separated words ``left`` <-> ``right``)."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(w, w) for w in sentence.split(" "))


def _label(value) -> Optional[bool]:
    if isinstance(value, bool):
        return value
    if value in ("True", "False"):  # BLIP: label = 1 if ann['label'] == 'True' else 0
        return value == "True"
    return None


@dataclasses.dataclass
class Nlvr2Annotations(Annotations):
    """:class:`~blipfast.data.annotations.Annotations` of image pairs: ``image_index`` is each example's first
    image, ``image_index2`` its second; ``captions`` the processed sentences, ``labels`` (bools), ``identifier``."""

    image_index2: list = dataclasses.field(default_factory=list)
    labels: list = dataclasses.field(default_factory=list)
    identifier: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: {len(self)} sentences over {len(self.images)} images from {self.rows} rows"
                + (f"; {len(self.bad)} row(s) skipped" if self.bad else ""))

    def image_path2(self, images_dir: Optional[str], p: int) -> str:
        key = self.images[self.image_index2[p]]
        return key if images_dir is None else os.path.join(images_dir, key)


def read_nlvr2(path, images_dir: Optional[str] = None, *, check_images: bool = True,
               max_words: int = MAX_WORDS) -> Nlvr2Annotations:
    """Read an NLVR2 list (see the module docstring); unusable rows are reported in ``bad`` and skipped."""
    name, items = _rows(path)
    if check_images and images_dir is not None and not os.path.isdir(images_dir):
        raise ValueError(f"--images: image folder {images_dir!r} does not exist")
    ann = Nlvr2Annotations(path=name, images=[], image_index=[], image_id=[], captions=[], lines=[], bad=[], rows=0)
    pos: dict = {}
    for line, obj in items:
        ann.rows += 1
        why = None
        if isinstance(obj, Exception):
            why = str(obj)
        elif not isinstance(obj, dict):
            why = f"expected an object with 'images', 'sentence' and 'label', got {type(obj).__name__}"
        elif not (isinstance(obj.get("images"), list) and len(obj["images"]) == 2
                  and all(isinstance(i, str) and i.strip() for i in obj["images"])):
            why = f"'images' must be a list of two image paths, got {obj.get('images')!r:.80}"
        elif not isinstance(obj.get("sentence"), str) or not pre_caption(obj["sentence"], max_words):
            why = "no 'sentence' (or an empty one)"
        elif _label(obj.get("label")) is None:
            why = f"'label' must be \"True\", \"False\" or a bool, got {obj.get('label')!r}"
        keys = [os.path.normpath(i) for i in obj["images"]] if why is None else []
        if why is None and check_images and images_dir is not None:
            gone = [k for k in keys if not os.path.isfile(os.path.join(images_dir, k))]
            if gone:
                why = f"image {os.path.join(images_dir, gone[0])!r} does not exist"
        if why is not None:
            ann.bad.append(f"{name}:{line}: {why} (skipped)")
            continue
        for k in keys:
            if k not in pos:
                pos[k] = len(ann.images)
                ann.images.append(k)
        ann.image_index.append(pos[keys[0]])
        ann.image_index2.append(pos[keys[1]])
        ann.image_id.append(len(ann.captions))
        ann.captions.append(pre_caption(obj["sentence"], max_words))
        ann.raw.append(obj["sentence"])
        ann.lines.append(line)
        ann.labels.append(_label(obj["label"]))
        ann.identifier.append(obj.get("identifier", len(ann.identifier)))
    if not ann.captions:
        raise ValueError(f"--data: {name!r} has no usable example ({ann.rows} rows; {'; '.join(ann.bad[:5])})")
    return ann


class Nlvr2Dataset(ImageTextDataset):
    """The trainer's NLVR2 examples: ``pixel_values`` [2, 3, S, S] (the two images), the tokenised sentence(s),
    ``label``. An unreadable image is reported and the example replaced by the next readable one. With ``augment``,
    each image is augmented on its own (as BLIP's ``nlvr_dataset``), the left one seeded with index ``2 p``, the
    right one ``2 p + 1``."""

    def __getitem__(self, item) -> dict:
        epoch, p = visit(item)
        n = len(self)
        for k in range(n):
            q = (p + k) % n
            try:
                pair = [load_image(self.ann.image_path(self.images_dir, q)),
                        load_image(self.ann.image_path2(self.images_dir, q))]
            except ImageReadError as exc:
                self._report(q, exc)
                continue
            px = torch.stack([self.pixels(im, epoch, 2 * q + j) for j, im in enumerate(pair)])
            return {"pixel_values": px, **self._text(q), "label": torch.tensor(int(self.ann.labels[q]))}
        raise ValueError(f"--images: no image pair of {self.ann.path!r} can be read")


def make_synthetic_nlvr2(out: str, n: int = 512, seed: int = 0, image_size: int = 64) -> dict:
    """Pairs of drawn shapes with sentences about them ("the left image has a red circle", "both images show a
    square", ...), true or false half of the time; a training and an evaluation list. Returns {"data", "images",
    "eval"} paths."""
    from .synthetic import _draw
    from .vqa import _CAPTION

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"--synthetic-size must be an int >= 2, got {n!r}")
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(seed)
    drawn = []
    for i in range(max(4, n // 2)):
        im, caption = _draw(rng, image_size)
        name = f"{i:06d}.png"
        im.save(os.path.join(images, name))
        drawn.append((name, _CAPTION.match(caption).groups()))
    rows = []
    for i in range(n):
        (a, pa), (b, pb) = rng.sample(drawn, 2)
        kind = i % 3
        if kind == 0:  # about the left image
            color, shape = (pa[1], pa[2]) if rng.random() < 0.5 else (pb[1], pb[2])
            label = (color, shape) == (pa[1], pa[2])
            sentence = f"The left image has a {color} {shape}."
        elif kind == 1:
            color, shape = (pb[1], pb[2]) if rng.random() < 0.5 else (pa[1], pa[2])
            label = (color, shape) == (pb[1], pb[2])
            sentence = f"The right image has a {color} {shape}."
        else:
            shape = rng.choice([pa[2], pb[2]])
            label = pa[2] == shape and pb[2] == shape
            sentence = f"Both images show a {shape}."
        rows.append({"identifier": f"syn-{i}-0-{int(label)}", "images": [a, b], "sentence": sentence,
                     "label": str(label)})
    cut = max(1, n // 5)
    paths = {"images": images}
    for key, part in (("data", rows[cut:]), ("eval", rows[:cut])):
        paths[key] = os.path.join(out, f"nlvr2_{key}.json")
        with open(paths[key], "w") as fh:
            json.dump(part, fh)
    return paths
