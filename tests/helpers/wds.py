"""Tiny WebDataset shards for the data tests: written with ``tarfile`` (so that a test can also write broken
ones), raw one-byte "images" that a test decoder turns into the sample number, or real 1x1 PNGs."""
from __future__ import annotations

import io
import tarfile

import torch


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: str, files) -> None:
    """A tar of ``files``: (member name, bytes) pairs in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            add(tf, name, data)


def sample_files(key: str, number: int, image_ext: str = "jpg", caption: str = None):
    """The members of one good sample: an 'image' holding ``number`` as 4 bytes and its caption."""
    return [(f"{key}.{image_ext}", number.to_bytes(4, "little")),
            (f"{key}.txt", (caption or f"caption of sample {number}").encode())]


def write_shards(folder: str, n_shards: int, per_shard, start: int = 0) -> list:
    """``n_shards`` shards ``{folder}/00000.tar``, ... of good samples keyed by their global number (9 digits);
    ``per_shard``: an int or one count per shard. Returns the paths."""
    counts = [per_shard] * n_shards if isinstance(per_shard, int) else list(per_shard)
    paths, k = [], start
    for s, n in enumerate(counts):
        files = []
        for _ in range(n):
            files += sample_files(f"{k:09d}", k)
            k += 1
        paths.append(f"{folder}/{s:05d}.tar")
        write_shard(paths[-1], files)
    return paths


def raw_number(data: bytes) -> int:
    """The test decoder: the sample number an 'image' of :func:`sample_files` holds."""
    if len(data) != 4:
        raise ValueError(f"not a test image ({len(data)} bytes)")
    return int.from_bytes(data, "little")


def number_tensor(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int64)


def tokenize_lengths(captions) -> dict:
    """A stand-in tokenizer: each caption's length as its one 'token'."""
    return {"input_ids": torch.tensor([[len(c)] for c in captions], dtype=torch.int64)}


def png_bytes(value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()
