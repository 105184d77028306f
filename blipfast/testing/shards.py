"""Tiny WebDataset shards in img2dataset's layout, for the tests and the documentation's shard walk-through.

img2dataset writes a folder of ``NNNNN.tar`` shards, each with an ``NNNNN_stats.json`` beside it (``successes``:
the samples it holds) and, per sample, ``KEY.jpg``, ``KEY.txt`` (the caption) and ``KEY.json`` (``caption``,
``url``, ``key``, ``status``, ``width``, ``height``, ``original_width``, ``original_height``, ...), the key being
the shard number (5 digits) and the sample's number in it (4 digits). :func:`write_shards` writes such a folder
with the synthetic set's pictures (one coloured shape, and a caption that says which: see
:mod:`blipfast.data.synthetic`) as JPEGs.

``python -m blipfast.testing.shards OUT [SHARDS [PER_SHARD]]`` writes ``OUT/shards/`` (4 shards of 16 samples
by default), ``OUT/vit/`` (a tiny random ``Blip2VisionModel`` with its image processor) and ``OUT/tokenizer/``
(a BERT-style WordPiece vocabulary trained on the captions: a stream's captions are never all in one place, so
training from shards takes ``--tokenizer``).
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same bytes on every run
    tf.addfile(info, io.BytesIO(data))


def sample_files(key: str, image: bytes, caption: str, width: int, height: int, url: str = None) -> list:
    """One sample's (member name, bytes) pairs as img2dataset writes them."""
    meta = {"url": url or f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
            "error_message": None, "width": width, "height": height, "original_width": width,
            "original_height": height, "exif": "{}", "sha256": None}
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode("utf-8")),
            (f"{key}.json", json.dumps(meta).encode("utf-8"))]


def write_tar(path: str, files) -> str:
    """A tar of ``files``, (member name, bytes) pairs in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            _member(tf, name, data)
    return path


def write_shards(folder: str, n_shards: int = 4, per_shard: int = 16, seed: int = 0, image_size: int = 32,
                 quality: int = 90) -> list:
    """``folder/00000.tar``, ... (img2dataset's layout, see the module docstring) of ``per_shard`` JPEG samples
    each; returns the shard paths. The same arguments write the same bytes."""
    from ..data.synthetic import _draw

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for s in range(n_shards):
        files = []
        for i in range(per_shard):
            im, caption = _draw(rng, image_size)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            files += sample_files(f"{s:05d}{i:04d}", buf.getvalue(), caption, *im.size)
        paths.append(write_tar(os.path.join(folder, f"{s:05d}.tar"), files))
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as fh:
            json.dump({"count": per_shard, "successes": per_shard, "failed_to_download": 0,
                       "failed_to_resize": 0}, fh, indent=1)
    return paths


def captions_of(paths) -> list:
    """Every caption (``.txt``) of the tar shards ``paths``, in order."""
    out = []
    for p in paths:
        with tarfile.open(p) as tf:
            out += [tf.extractfile(m).read().decode("utf-8") for m in tf.getmembers() if m.name.endswith(".txt")]
    return out


def write_demo(out: str, n_shards: int = 4, per_shard: int = 16) -> dict:
    """The shards, a tiny vision tower and a tokenizer (see the module docstring); returns their paths."""
    from ..data.tokenizer import train_wordpiece
    from ..data.vision import quiet_transformers
    from .data import write_vision

    paths = write_shards(os.path.join(out, "shards"), n_shards, per_shard)
    tok = os.path.join(out, "tokenizer")
    with quiet_transformers():
        vit = write_vision(os.path.join(out, "vit"))
        train_wordpiece(captions_of(paths), 256).save_pretrained(tok)
    return {"shards": paths, "vision": vit, "tokenizer": tok}


if __name__ == "__main__":  # python -m blipfast.testing.shards OUT [SHARDS [PER_SHARD]]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "tiny-shards"
    n, per = (int(sys.argv[2]) if len(sys.argv) > 2 else 4), (int(sys.argv[3]) if len(sys.argv) > 3 else 16)
    write_demo(out, n, per)
    print(f"wrote {n} shards of {per} image-text pairs to {out}/shards, a tiny vision tower to {out}/vit and a "
          f"tokenizer to {out}/tokenizer")
