"""Image-text pairs from WebDataset tar shards as img2dataset writes them, streamed (``--data shards/{...}.tar``).

A sample is the files of one key in a shard: ``KEY.jpg`` (or ``png`` / ``webp``: ``--image-key``, the first
present wins), ``KEY.txt`` and ``KEY.json`` (``{"caption": ..., "url": ..., "width": ...}``). The caption is
the first of ``--caption-key``'s candidates present: ``txt`` names a file's text, ``json:caption`` a field of a
JSON file (default ``txt;json:caption``). The image id is :func:`blipfast.data.shards.key_image_id` of the key.

The tars are read by the ``webdataset`` package (``gopen`` opens local files, URLs and ``pipe:`` commands, its
tar iterator and ``group_by_keys`` make the samples), one shard at a time; its errors (an unreadable or
truncated tar, a file name twice in a sample) become bad samples of that shard. A sample without an image or a
caption (e.g. the halves of a key that straddles a shard boundary: each shard is grouped on its own), an empty
caption, or an image that does not decode is skipped and counted (:class:`blipfast.data.stream.BadSamples`).

Decoding, the image transform (the vision model's processor) and the caption's processing (LAVIS'
``pre_caption``) run per sample, and the ``tokenize`` callable per batch, in the loader workers; nothing holds
more than the shuffle buffer's undecoded samples.
"""
from __future__ import annotations

import io
import json
from typing import Callable, Optional

from .annotations import pre_caption
from .shards import key_image_id
from .stream import BadSample, StreamLoader, collate_tensors, stream_loader

DEFAULT_IMAGE_KEY = "jpg;png;webp"
DEFAULT_CAPTION_KEY = "txt;json:caption"


def _keys(spec: str, name: str) -> list:
    if not isinstance(spec, str) or not [k for k in spec.split(";") if k.strip()]:
        raise ValueError(f"{name} must be ';'-separated file extensions, got {spec!r}")
    return [k.strip().lower() for k in spec.split(";") if k.strip()]


def decode_image(data: bytes):
    """The RGB PIL image of encoded ``data``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def tar_samples(url: str):
    """The samples of one tar shard in order (dicts of ``__key__``, ``__url__`` and one ``bytes`` per
    extension), read by the ``webdataset`` package; what it cannot read comes as ``{"__error__": why}`` (with
    ``__key__`` None) where it was found."""
    try:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander
    except ImportError:
        raise ValueError("WebDataset shards need the webdataset package: pip install webdataset") from None

    errors: list = []
    reported = [None]
    stream = None
    last = [None]  # the last tar member read

    def handler(exn) -> bool:
        msg = str(exn.args[0]).split(" @ <")[0] if exn.args else ""  # webdataset appends the file object
        status = getattr(stream, "status", None)  # webdataset's Pipe: a command's exit status, once seen
        if status:
            msg = f"the command exited with status {status}"
        where = f"after member {last[0]!r}" if last[0] else "at its start"
        why = f"{msg if status else type(exn).__name__ + ': ' + msg} ({where})"
        if why != reported[-1]:  # a broken tar fails the member's read, then the next header's: one report
            errors.append({"__key__": None, "__url__": url, "__error__": why})
            reported.append(why)
        return True

    def members(stream):
        for f in tar_file_expander([{"url": url, "stream": stream}], handler=handler):
            last[0] = f.get("fname", last[0])
            yield f

    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # a missing file, a URL scheme without its tool, ...
        yield {"__key__": None, "__url__": url, "__error__": f"cannot open: {type(exc).__name__}: {exc}"}
        return
    try:
        for sample in group_by_keys(members(stream), handler=handler):
            yield from errors
            errors.clear()
            yield sample
        yield from errors
        try:
            stream.close()
        except Exception as exc:  # webdataset's Pipe: the command's exit status (when no read reported it)
            if reported[-1] is None:
                status = getattr(stream, "status", None)
                why = f"the command exited with status {status}" if status else f"{type(exc).__name__}: {exc}"
                yield {"__key__": None, "__url__": url, "__error__": why}
    finally:
        try:
            stream.close()
        except Exception:  # (closed early: the generator was dropped)
            pass


class ImageTextSource:
    """The samples of image-text tar shards for :class:`blipfast.data.stream.ShardStream`.

    ``image_transform``: PIL RGB image -> tensor (e.g. the vision model's processor); one with an attribute
    ``per_sample = True`` (a random augmentation) is called ``image_transform(image, key=, epoch=, draw=)``:
    the sample's key, the pass over the shards it was read in (0 with ``resampled``) and ``draw``, a position
    ``(logical worker, shard position, offset)`` unique to this reading of the sample in the whole stream, so
    that it can seed its draws from ``(seed, epoch, key)`` or ``(seed, draw)`` and stay deterministic and
    resumable; ``tokenize``: list of
    captions -> dict of [B, ...] tensors (``input_ids``, ``attention_mask``, ...); ``text_transform``: the caption
    processing (default LAVIS' ``pre_caption``; None keeps the text); ``image_decoder``: bytes -> what
    ``image_transform`` takes (default :func:`decode_image`).
    Batches hold ``pixel_values`` [B, ...], ``image_id`` int64 [B] and the tokens (with ``tokenize=None``:
    ``caption``, the list of captions).
    """

    def __init__(self, tokenize: Callable, image_transform: Callable, *, image_key: str = DEFAULT_IMAGE_KEY,
                 caption_key: str = DEFAULT_CAPTION_KEY, text_transform: Optional[Callable] = pre_caption,
                 image_decoder: Optional[Callable] = None):
        if not callable(image_transform) or not (tokenize is None or callable(tokenize)):
            raise TypeError("image_transform must be a callable, tokenize a callable or None")
        self.tokenize, self.image_transform, self.text_transform = tokenize, image_transform, text_transform
        self.image_decoder = image_decoder or decode_image
        self.image_keys = _keys(image_key, "--image-key")
        self.caption_keys = [tuple(k.split(":", 1)) if ":" in k else (k, None)
                             for k in _keys(caption_key, "--caption-key")]

    def config(self) -> dict:
        return {"image_key": self.image_keys, "caption_key": [":".join(filter(None, k)) for k in self.caption_keys]}

    samples = staticmethod(tar_samples)

    def caption(self, raw: dict) -> str:
        for ext, field in self.caption_keys:
            if ext not in raw:
                continue
            try:
                text = raw[ext].decode("utf-8")
                if field is not None:
                    obj = json.loads(text)
                    text = obj.get(field) if isinstance(obj, dict) else None
                    if text is None:
                        continue
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadSample(f"unreadable .{ext}: {exc}") from None
            if not isinstance(text, str):
                raise BadSample(f".{ext} {field!r} is not a string: {type(text).__name__}")
            return text
        raise BadSample("no caption (looked for " + ", ".join(
            f".{e}" if f is None else f".{e}[{f!r}]" for e, f in self.caption_keys) + ")")

    def decode(self, raw: dict) -> dict:
        if "__error__" in raw:
            raise BadSample(raw["__error__"])
        ext = next((k for k in self.image_keys if k in raw), None)
        if ext is None:
            raise BadSample(f"no image (looked for {', '.join('.' + k for k in self.image_keys)})")
        caption = self.caption(raw)
        if self.text_transform is not None:
            caption = self.text_transform(caption)
        if not caption.strip():
            raise BadSample("empty caption")
        try:
            image = self.image_decoder(raw[ext])
            if getattr(self.image_transform, "per_sample", False):
                pixels = self.image_transform(image, key=raw["__key__"], epoch=raw.get("__epoch__", 0),
                                              draw=raw.get("__draw__"))
            else:
                pixels = self.image_transform(image)
        except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
            raise BadSample(f"cannot decode .{ext}: {type(exc).__name__}: {exc}") from None
        return {"pixel_values": pixels, "caption": caption, "image_id": key_image_id(raw["__key__"]),
                "__key__": raw["__key__"]}

    def collate(self, items: list) -> dict:
        out = collate_tensors(items, ["pixel_values"])
        captions = [it["caption"] for it in items]
        out.update(self.tokenize(captions) if self.tokenize is not None else {"caption": captions})
        return out


def image_text_loader(data, *, tokenize: Callable, image_transform: Callable, image_key: str = DEFAULT_IMAGE_KEY,
                      caption_key: str = DEFAULT_CAPTION_KEY, text_transform: Optional[Callable] = pre_caption,
                      image_decoder: Optional[Callable] = None, **stream_args) -> StreamLoader:
    """The batches of process ``rank``'s share of the shards ``data`` names (a spec of
    :func:`blipfast.data.shards.expand_shards`, or its list). ``stream_args``: ``batch_size`` (required),
    ``rank``, ``world``, ``num_workers``, ``seed``, ``shuffle_buffer``, ``resampled``, ``state`` (a
    :meth:`StreamLoader.state_dict` to resume from), ``snapshot_every`` of :class:`ShardStream`; ``pin_memory``
    and ``with_keys`` of :class:`StreamLoader`."""
    from .shards import expand_shards

    source = ImageTextSource(tokenize, image_transform, image_key=image_key, caption_key=caption_key,
                             text_transform=text_transform, image_decoder=image_decoder)
    return stream_loader(expand_shards(data), source, **stream_args)
