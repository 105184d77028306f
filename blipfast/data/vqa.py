"""VQA data as Salesforce BLIP reads it (``data/vqa_dataset.py``; docs/blip-finetune.md): the VQAv2 and Visual
Genome QA lists with their answers, the test questions and the answer list, and the trainer's dataset.

Files: JSON lists or JSON lines of objects (BLIP's ``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``,
``vqa_test.json``; LAVIS' VQA lists have the same fields):

- ``image``: the path relative to the image folder (``train2014/COCO_train2014_000000000009.jpg``,
  ``VG_100K/2377.jpg``; BLIP reads VQA and VG images from two roots: keep both trees under one ``--images``);
- ``question``: processed by BLIP's ``pre_question`` (lower case, ``.!"()*#:;~`` removed, at most 50 words);
- ``answer``: a list (VQAv2: the 10 human answers) or a string (Visual Genome); ``dataset``: ``"vqa"`` or
  ``"vg"``; ``question_id`` (the evaluation's key).

Answer weights are BLIP's: a VQAv2 row (``"dataset": "vqa"``, or a list without ``dataset``) gives each distinct
answer its share of the row's answers (``1 / len(answers)`` per occurrence, in order of first occurrence); a
Visual Genome row (``"dataset": "vg"``) its one answer with weight 0.2; a string answer of another row weight 1.
Answers are not processed (BLIP tokenises them as they are). Several files are read as one when ``--data`` names
them separated by commas (BLIP trains on ``vqa_train``, ``vqa_val`` and ``vg_qa`` together).

:func:`read_answer_list` reads BLIP's ``answer_list.json`` (the 3,128 candidates of rank inference).
:func:`make_synthetic_vqa` writes a small VQA set of drawn shapes for ``blipfast train --task blip-vqa`` without
``--data``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Optional

import torch

from .annotations import Annotations, _rows
from .datasets import ImageTextDataset

__all__ = ["VqaAnnotations", "VqaDataset", "answer_weights", "make_synthetic_vqa", "pre_question",
           "read_answer_list", "read_vqa"]

VG_WEIGHT = 0.2  # BLIP's vqa_dataset: weights = [0.2] for a Visual Genome answer


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question`` (data/utils.py)."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def answer_weights(answer, dataset: Optional[str] = None) -> tuple[list, list]:
    """(distinct answers, weights) of a row as BLIP's ``vqa_dataset.__getitem__`` computes them (see the module
    docstring)."""
    if isinstance(answer, str):
        return [answer], [VG_WEIGHT if dataset == "vg" else 1.0]
    weight: dict = {}
    for a in answer:
        weight[a] = weight.get(a, 0.0) + 1 / len(answer)
    return list(weight), list(weight.values())


@dataclasses.dataclass
class VqaAnnotations(Annotations):
    """:class:`~blipfast.data.annotations.Annotations` whose ``captions`` are the processed questions (one pair per
    question; ``image_id`` is the question's row), with ``answers`` / ``weights`` (lists per question; empty
    without answers), ``question_id`` (the file's, else the row number) and ``human`` (the answer field as given,
    for scoring)."""

    answers: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)
    question_id: list = dataclasses.field(default_factory=list)
    human: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        n = sum(len(a) for a in self.answers)
        return (f"{self.path}: {len(self)} questions over {len(self.images)} images, {n} distinct answers, from "
                f"{self.rows} rows" + (f"; {len(self.bad)} row(s) skipped" if self.bad else ""))


def _check_answer(answer) -> Optional[str]:
    if isinstance(answer, str):
        return None if answer.strip() else "empty 'answer'"
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        return None
    return f"'answer' must be a string or a non-empty list of strings, got {answer!r:.80}"


def read_vqa(path, images_dir: Optional[str] = None, *, check_images: bool = True, need_answers: bool = True,
             max_words: int = 50) -> VqaAnnotations:
    """Read one or several (comma-separated) VQA files (see the module docstring). A row that cannot be used (no
    image or question, no answer when ``need_answers``, an image missing under ``images_dir``) is reported in
    ``bad`` and skipped; a file with no usable row is a ValueError."""
    paths = [p for p in str(path).split(",") if p] if isinstance(path, str) else [path]
    if check_images and images_dir is not None and not os.path.isdir(images_dir):
        raise ValueError(f"--images: image folder {images_dir!r} does not exist")
    ann = VqaAnnotations(path=",".join(map(str, paths)), images=[], image_index=[], image_id=[], captions=[],
                         lines=[], bad=[], rows=0)
    pos: dict = {}
    exists: dict = {}
    for one in paths:
        name, items = _rows(one)
        for line, obj in items:
            ann.rows += 1
            why = None
            if isinstance(obj, Exception):
                why = str(obj)
            elif not isinstance(obj, dict):
                why = f"expected an object with 'image' and 'question', got {type(obj).__name__}"
            elif not isinstance(obj.get("image"), str) or not obj["image"].strip():
                why = "no 'image' path"
            elif not isinstance(obj.get("question"), str) or not pre_question(obj["question"], max_words).strip():
                why = "no 'question' (or an empty one)"
            elif need_answers or "answer" in obj:
                why = _check_answer(obj.get("answer")) if "answer" in obj else "no 'answer'"
            key = os.path.normpath(obj["image"]) if why is None else None
            if why is None and check_images and images_dir is not None:
                if key not in exists:
                    exists[key] = os.path.isfile(os.path.join(images_dir, key))
                if not exists[key]:
                    why = f"image {os.path.join(images_dir, key)!r} does not exist"
            if why is not None:
                ann.bad.append(f"{name}:{line}: {why} (skipped)")
                continue
            if key not in pos:
                pos[key] = len(ann.images)
                ann.images.append(key)
            answers, weights = answer_weights(obj["answer"], obj.get("dataset")) if "answer" in obj else ([], [])
            ann.image_index.append(pos[key])
            ann.image_id.append(len(ann.captions))
            ann.captions.append(pre_question(obj["question"], max_words))
            ann.raw.append(obj["question"])
            ann.lines.append(line)
            ann.answers.append(answers)
            ann.weights.append(weights)
            ann.question_id.append(obj.get("question_id", len(ann.question_id)))
            ann.human.append(obj.get("answer"))
    if not ann.captions:
        raise ValueError(f"--data: {ann.path!r} has no usable question ({ann.rows} rows; {'; '.join(ann.bad[:5])})")
    return ann


def read_answer_list(path) -> list:
    """BLIP's ``answer_list.json``: a JSON list of answer strings (the candidates of rank inference)."""
    try:
        with open(path, encoding="utf-8") as fh:
            answers = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--answer-list: cannot read {path!r}: {exc}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"--answer-list: {path!r} must hold a non-empty JSON list of strings")
    return answers


class VqaDataset(ImageTextDataset):
    """The trainer's VQA pairs: one image and its question per item, the answers' tensors as the task tokenised them
    (integer tensors as int64, the answer weights as float32)."""

    def _text(self, p: int) -> dict:
        return {**{k: v[p] if v.is_floating_point() else v[p].long() for k, v in self.text.items()},
                "image_id": self.image_id[p], "index": torch.tensor(p)}


# ----------------------------------------------------------------------------------------------
# the synthetic set

_CAPTION = re.compile(r"a (\w+) (\w+) (\w+) (?:at the (.+)|in the (center)) on a (\w+) background\Z")
_QUESTIONS = (("what color is the shape?", 1), ("what shape is it?", 2), ("what color is the background?", 5),
              ("is the shape large or small?", 0))


def make_synthetic_vqa(out: str, n: int = 512, seed: int = 0, image_size: int = 64) -> dict:
    """A VQA set of drawn shapes (:mod:`blipfast.data.synthetic`'s images): per image one question about its
    colour, shape, background or size; train rows VQAv2-style (10 answers, mostly right, so several weighted
    answers) and a few Visual Genome-style (one answer), an evaluation file with the answers (LAVIS' ``vqa_val_eval``
    layout) and the answer list. Returns {"data", "images", "eval", "answer_list"} paths."""
    from .synthetic import _draw

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"--synthetic-size must be an int >= 2, got {n!r}")
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rng = random.Random(seed)
    train, evaluation, vocab = [], [], set()
    for i in range(n):
        im, caption = _draw(rng, image_size)
        name = f"{i:06d}.png"
        im.save(os.path.join(images, name))
        parts = _CAPTION.match(caption).groups()
        question, field = _QUESTIONS[i % len(_QUESTIONS)]
        truth = parts[field]
        others = sorted({"red", "blue", "circle", "square", "white", "large", "small"} - {truth})
        humans = [truth] * 8 + [rng.choice(others) for _ in range(2)]
        vocab.update(humans)
        if i % 5 == 4:  # an evaluation question
            evaluation.append({"question_id": i, "image": name, "question": question, "answer": humans})
        elif i % 7 == 3:
            train.append({"image": name, "question": question, "answer": truth, "dataset": "vg"})
        else:
            train.append({"question_id": i, "image": name, "question": question, "answer": humans,
                          "dataset": "vqa"})
    paths = {"images": images}
    for key, rows in (("data", train), ("eval", evaluation), ("answer_list", sorted(vocab))):
        paths[key] = os.path.join(out, f"vqa_{key}.json")
        with open(paths[key], "w") as fh:
            json.dump(rows, fh)
    return paths
