"""Image-caption annotation files: JSONL rows or the JSON list LAVIS and BLIP use, read as training pairs with bad
rows reported (:func:`read_annotations`) or as a retrieval gallery (:func:`read_gallery`).

Accepted formats (detected from the first non-blank character):

- JSONL: one object per line, ``{"image": "relative/path.jpg", "caption": "a dog on a couch"}``;
- a JSON list of such objects (LAVIS ``coco_karpathy_train.json``, BLIP's pre-training files).

``caption`` is a string or a list of strings (one image-text pair per caption). An optional ``image_id``
(any string or number, as in LAVIS' COCO files) says which pairs show the same image; without it the image
path does. Captions go through LAVIS' ``BlipCaptionProcessor`` (:func:`pre_caption`: lower case, the
punctuation ``.!"()*#:;~`` removed, at most 50 words).

A row that cannot be used (not JSON, not valid UTF-8, not an object, no ``image`` or ``caption``, an empty caption,
an image file that does not exist under ``images``) is reported as ``FILE:LINE: reason (skipped)`` and skipped;
the pairs of the other rows are kept. A UTF-8 byte-order mark at the start is ignored. A file that cannot be read at
all, or leaves no pair, is a ValueError.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Optional

MAX_WORDS = 50  # LAVIS BlipCaptionProcessor(max_words=50)


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS ``BlipCaptionProcessor.pre_caption`` (with an empty prompt)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@dataclasses.dataclass
class Annotations:
    """The usable pairs of an annotation file.

    ``images``: the distinct image keys (paths as written in the file, normalised), in order of first use;
    ``image_index[p]``: pair p's image in ``images``; ``image_id[p]``: pair p's image identity (equal for pairs
    showing the same image, from ``image_id`` or the path) as consecutive ints; ``captions[p]``: the processed
    caption; ``lines[p]``: the line of the row it came from; ``bad``: one message per skipped row or caption;
    ``raw[p]``: the caption as the file has it (before the processing).
    """

    path: str
    images: list
    image_index: list
    image_id: list
    captions: list
    lines: list
    bad: list
    rows: int
    raw: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def summary(self) -> str:
        return (f"{self.path}: {len(self)} image-text pairs over {len(self.images)} images from {self.rows} rows"
                + (f"; {len(self.bad)} row(s) or caption(s) skipped" if self.bad else ""))

    def image_path(self, images_dir: Optional[str], p: int) -> str:
        key = self.images[self.image_index[p]]
        return key if images_dir is None else os.path.join(images_dir, key)


def _line_of(text: str, pos: int, state: list) -> int:
    """1-based line of ``pos``; ``state`` = [last pos, its line] makes a forward scan linear."""
    last, line = state
    line += text.count("\n", last, pos)
    state[0], state[1] = pos, line
    return line


# the bytes that are not UTF-8, as "surrogateescape" decoding keeps them
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _not_utf8(text: str, m: re.Match) -> str:
    col = m.start() - text.rfind("\n", 0, m.start())
    return f"not valid UTF-8 (byte 0x{ord(m.group()) - 0xdc00:02x} at column {col})"


def _json_list_items(text: str, path: str) -> Iterator[tuple]:
    """(line, object or exception) for each element of a top-level JSON list, with line numbers."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    state = [0, 1]
    i = ws.match(text, 0).end()
    if text[i:i + 1] != "[":
        raise ValueError(f"{path}: expected a JSON list or JSON lines")
    i = ws.match(text, i + 1).end()
    if text[i:i + 1] == "]":
        return
    while True:
        line = _line_of(text, i, state)
        start = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); the list cannot be read past "
                             f"this point") from None
        bad = _NOT_UTF8.search(text, start, i)
        if bad:
            obj = ValueError(f"{_not_utf8(text, bad)[:-1]}, line {_line_of(text, bad.start(), state)})")
        yield line, obj
        i = ws.match(text, i).end()
        if text[i:i + 1] == ",":
            i = ws.match(text, i + 1).end()
        elif text[i:i + 1] == "]":
            return
        else:
            raise ValueError(f"{path}:{_line_of(text, i, state)}: expected ',' or ']' in the JSON list")


def _jsonl_items(text: str) -> Iterator[tuple]:
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 and friends are valid inside JSON
        if not line.strip():
            continue
        bad = _NOT_UTF8.search(line)
        if bad:
            yield n, ValueError(_not_utf8(line, bad))
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, ValueError(f"not valid JSON ({exc.msg})")


def _rows(path) -> tuple[str, Iterator[tuple]]:
    """(path, its rows as (line, object or exception)): JSONL or a JSON list, told by the first character."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_annotations: path must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--data: annotation file {path!r} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ValueError(f"--data: cannot read {path!r}: {exc}") from None
    # a row with bytes that are not UTF-8 is reported with its line (the others are read); a BOM is not text
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    return path, (_json_list_items(text, path) if text.lstrip().startswith("[") else _jsonl_items(text))


def _image_and_captions(obj) -> tuple:
    """(image path, [captions]) of a row, or (None, why it cannot be used)."""
    if isinstance(obj, Exception):
        return None, str(obj)
    if not isinstance(obj, dict):
        return None, f"expected an object with 'image' and 'caption', got {type(obj).__name__}"
    image, caption = obj.get("image"), obj.get("caption")
    if not isinstance(image, str) or not image.strip():
        return None, "no 'image' path" if image is None else f"'image' must be a non-empty string, got {image!r}"
    if caption is None:
        return None, "no 'caption'"
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) for c in captions):
        return None, f"'caption' must be a string or a list of strings, got {caption!r:.80}"
    return image, captions


def read_annotations(path: str, images_dir: Optional[str] = None, check_images: bool = True,
                     max_words: int = MAX_WORDS) -> Annotations:
    """Read ``path`` (JSONL or a JSON list) as image-text pairs for training; with ``check_images`` rows whose
    image file is missing under ``images_dir`` are skipped. See the module docstring."""
    path, items = _rows(path)
    if check_images and images_dir is not None and not os.path.isdir(images_dir):
        raise ValueError(f"--images: image folder {images_dir!r} does not exist")
    ann = Annotations(path=path, images=[], image_index=[], image_id=[], captions=[], lines=[], bad=[], rows=0)
    image_pos: dict = {}
    ident_pos: dict = {}
    exists: dict = {}
    for line, obj in items:
        ann.rows += 1

        def bad(msg, line=line):
            ann.bad.append(f"{path}:{line}: {msg} (skipped)")

        image, captions = _image_and_captions(obj)
        if image is None:
            bad(captions)
            continue
        key = os.path.normpath(image)
        if check_images and images_dir is not None:
            if key not in exists:
                exists[key] = os.path.isfile(os.path.join(images_dir, key))
            if not exists[key]:
                bad(f"image {os.path.join(images_dir, key)!r} does not exist")
                continue
        processed = []
        for k, c in enumerate(captions):
            pc = pre_caption(c, max_words)
            if pc:
                processed.append((pc, c))
            else:
                bad("empty caption" + (f" {k + 1} of {len(captions)}" if len(captions) > 1 else "")
                    + (f" ({c!r} after LAVIS' caption processing)" if c.strip() else ""))
        if not processed:
            continue
        ident = obj.get("image_id", key)
        ident = ident if isinstance(ident, (str, int)) and not isinstance(ident, bool) else json.dumps(ident)
        if key not in image_pos:
            image_pos[key] = len(ann.images)
            ann.images.append(key)
        ident_pos.setdefault(ident, len(ident_pos))
        for pc, raw in processed:
            ann.image_index.append(image_pos[key])
            ann.image_id.append(ident_pos[ident])
            ann.captions.append(pc)
            ann.raw.append(raw)
            ann.lines.append(line)
    if not ann.captions:
        shown = "; ".join(ann.bad[:5])
        raise ValueError(f"--data: {path!r} has no usable image-text pair ({ann.rows} rows"
                         + (f"; {shown}" if shown else "") + ")")
    return ann


@dataclasses.dataclass
class Gallery:
    """A retrieval gallery in LAVIS' order: image paths (as the file writes them), captions, ``img2txt`` (caption
    indices per image) and ``txt2img`` (the image of each caption); ``problems``: ``FILE:LINE: ...`` for each entry
    that changes the recall without being an error (an image listed twice, an empty caption, an image left without
    a non-empty caption)."""

    images: list
    texts: list
    img2txt: list = dataclasses.field(default_factory=list)
    txt2img: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)


def read_gallery(path, max_words: int = MAX_WORDS) -> Gallery:
    """The same files as a retrieval gallery, as LAVIS' retrieval evaluation reads them (``RetrievalEvalDataset``):
    one image per row, every caption through :func:`pre_caption` and kept (an empty one too). Unlike
    :func:`read_annotations`, a row that cannot be used is a ValueError: an evaluation never drops data; what LAVIS
    accepts but changes the recall (see :class:`Gallery`) is listed in ``problems``."""
    path, items = _rows(path)
    g = Gallery([], [])
    first_line: dict = {}
    for line, obj in items:
        image, captions = _image_and_captions(obj)
        if image is None:
            raise ValueError(f"--data: {path}:{line}: {captions}")
        key = os.path.normpath(image)
        if key in first_line:
            g.problems.append(f"{path}:{line}: image {image!r} is listed again (first at line {first_line[key]}): "
                              f"each entry is a gallery image of its own, whose captions count against the other")
        first_line.setdefault(key, line)
        texts = [pre_caption(c, max_words) for c in captions]
        empty = [k + 1 for k, t in enumerate(texts) if not t]
        if empty and len(empty) == len(texts):
            g.problems.append(f"{path}:{line}: image {image!r} has no non-empty caption (its text retrieval fails)")
        elif empty:
            g.problems.append(f"{path}:{line}: caption(s) {empty} of {len(texts)} are empty after LAVIS' caption "
                              f"processing")
        g.img2txt.append(list(range(len(g.texts), len(g.texts) + len(captions))))
        g.txt2img += [len(g.images)] * len(captions)
        g.texts += texts
        g.images.append(image)
    if not g.texts:
        raise ValueError(f"--data: {path!r} has no captions")
    return g


def keep_pairs(ann: Annotations, keep: list, reason_of: dict) -> Annotations:
    """A copy with only the pairs whose image key is in ``keep`` (a set); the others are reported with
    ``reason_of[key]`` (e.g. "not in the feature cache")."""
    sel = [p for p in range(len(ann)) if ann.images[ann.image_index[p]] in keep]
    bad = list(ann.bad)
    for p in range(len(ann)):
        key = ann.images[ann.image_index[p]]
        if key not in keep:
            bad.append(f"{ann.path}:{ann.lines[p]}: {reason_of.get(key, 'image unavailable')} (skipped)")
    images = [k for k in ann.images if k in keep]
    pos = {k: i for i, k in enumerate(images)}
    out = Annotations(path=ann.path, images=images, image_index=[pos[ann.images[ann.image_index[p]]] for p in sel],
                      image_id=[ann.image_id[p] for p in sel], captions=[ann.captions[p] for p in sel],
                      lines=[ann.lines[p] for p in sel], bad=bad, rows=ann.rows, raw=[ann.raw[p] for p in sel])
    if not out.captions:
        raise ValueError(f"--data: no pair of {ann.path!r} is usable ({'; '.join(bad[:5])})")
    return out
