"""Shard lists: what ``--data`` names when it names WebDataset shards, how many samples they hold, image ids.

A shard spec is one of (:func:`expand_shards`):

- a brace pattern, ``"shards/{00000..01743}.tar"`` (several joined with ``::``, ``${WDS_NAME}`` read from the
  environment; expanded the way the ``webdataset`` package expands it);
- a folder: its ``.tar`` files, sorted by name (not recursive);
- a text file listing shards, one per line (blank lines and ``#`` comments skipped); a relative local path is
  relative to the list file's folder;
- any URL or ``pipe:`` command the ``webdataset`` package opens (``https://...``, ``pipe:aws s3 cp s3://b/x.tar -``).

Local shards are checked to exist up front; URLs and commands are opened when they are read.

:func:`dataset_size` reads the sample count written beside local shards, as OpenCLIP does: a ``sizes.json``
(``{"00000.tar": 9876, ...}``) or a ``__len__`` file in the first shard's folder, or else img2dataset's
``NNNNN_stats.json`` (``"successes"``) beside every shard. :func:`key_image_id` turns a sample key into the int64
image id of the batch (pairs with the same key show the same image). :func:`input_kind` tells what
``blipfast train``'s ``--data`` and ``--features`` name.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from typing import Optional, Sequence, Union
from urllib.parse import urlparse

_ANNOTATION_EXT = (".json", ".jsonl")


def is_remote(url: str) -> bool:
    """True for a URL or ``pipe:`` command, False for a local path."""
    return url.startswith("pipe:") or len(urlparse(url).scheme) > 1  # (a one-letter scheme is a drive letter)


def _expand_pattern(spec: str) -> list:
    from webdataset.shardlists import expand_urls  # its brace / '::' / ${WDS_...} rules, nothing of our own

    try:
        return [u for u in expand_urls(spec) if u]
    except AssertionError as exc:  # webdataset asserts on a missing ${WDS_NAME}
        raise ValueError(f"--data: {spec!r}: {exc}") from None


def _read_list(path: str) -> list:
    base = os.path.dirname(os.path.abspath(path))
    urls = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not is_remote(line) and not os.path.isabs(line):
                line = os.path.join(base, line)
            urls.append(line)
    return urls


def looks_like_shards(data: str) -> bool:
    """True when ``data`` names WebDataset shards (see the module docstring), False for an annotation file
    (``.json`` / ``.jsonl``) or anything else."""
    if not isinstance(data, str) or not data:
        return False
    if os.path.isdir(data):
        return any(n.endswith(".tar") for n in os.listdir(data))
    if os.path.isfile(data):
        if data.endswith(".tar"):
            return True
        if data.endswith(_ANNOTATION_EXT):
            return False
        with open(data, "rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
        first = next((ln.strip() for ln in head.splitlines() if ln.strip() and not ln.startswith("#")), "")
        return first.endswith(".tar") or is_remote(first)
    return "{" in data or "::" in data or is_remote(data) or data.endswith(".tar")


def expand_shards(spec: Union[str, Sequence[str]], name: str = "--data") -> list:
    """The list of shard URLs / paths that ``spec`` names (see the module docstring); ValueError naming
    ``name`` when it names none or a local shard is missing."""
    if isinstance(spec, (list, tuple)):
        urls = [u for s in spec for u in expand_shards(s, name)]
    elif not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{name} must be a shard pattern, folder or list file, got {spec!r}")
    elif os.path.isdir(spec):
        urls = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(".tar"))
        if not urls:
            raise ValueError(f"{name}: the folder {spec!r} holds no .tar shards")
    elif os.path.isfile(spec) and not spec.endswith(".tar"):
        urls = _read_list(spec)
        if not urls:
            raise ValueError(f"{name}: the list file {spec!r} names no shards")
    else:
        urls = _expand_pattern(spec)
    if not urls:
        raise ValueError(f"{name}: {spec!r} names no shards")
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{name}: {len(missing)} of {len(urls)} shard(s) do not exist: "
                         f"{', '.join(map(repr, missing[:3]))}{more}")
    return urls


def dataset_size(urls: Sequence[str]) -> Optional[int]:
    """The number of samples in local shards ``urls`` as the files beside them say (``sizes.json``, ``__len__``,
    or img2dataset's ``*_stats.json`` for every shard), or None when they do not say."""
    if not urls or any(is_remote(u) for u in urls):
        return None
    folder = os.path.dirname(urls[0])
    sizes = os.path.join(folder, "sizes.json")
    if os.path.isfile(sizes):
        with open(sizes) as fh:
            table = json.load(fh)
        try:
            return sum(int(table[os.path.basename(u)]) for u in urls)
        except KeyError as exc:
            raise ValueError(f"--data: {sizes} has no size for shard {exc.args[0]!r}") from None
    length = os.path.join(folder, "__len__")
    if os.path.isfile(length):
        with open(length) as fh:
            return int(ast.literal_eval(fh.read().strip()))
    total = 0
    for u in urls:
        stats = u[:-len(".tar")] + "_stats.json" if u.endswith(".tar") else None
        if stats is None or not os.path.isfile(stats):
            return None
        with open(stats) as fh:
            total += int(json.load(fh).get("successes", 0))
    return total


def samples_per_epoch(urls: Sequence[str], given: Optional[int]) -> int:
    """``given`` (``--samples-per-epoch``) or the size the shards' folder records; a stream has no length of its
    own, so one of them is required."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"--samples-per-epoch must be a positive int, got {given!r}")
        return given
    n = dataset_size(urls)
    if not n:
        raise ValueError("--samples-per-epoch is required for WebDataset shards (no sizes.json, __len__ or "
                         "img2dataset *_stats.json beside them says how many samples they hold)")
    return n


def hash63(text: str) -> int:
    """63 bits of the BLAKE2b hash of ``text`` (UTF-8): a stable non-negative int64 of a string, the same in every
    process and run (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def key_image_id(key: str) -> int:
    """A sample key as an int64 image id: the number itself for a decimal key below 2**63 (img2dataset's keys
    are, e.g. ``000010023``), else :func:`hash63` of it."""
    if key.isdigit() and key.isascii() and len(key) < 19:
        return int(key)
    return hash63(key)


def input_kind(data: Optional[str], features: Optional[str] = None) -> str:
    """What ``blipfast train``'s ``--data`` and ``--features`` name: ``"feature-shards"`` (a folder of feature
    shards: the captions are inside, no ``--data``), ``"shards"`` (WebDataset image-text shards), ``"annotations"``
    (an annotation file, read with ``--images`` or a feature cache of it) or ``"synthetic"`` (neither given)."""
    from .feature_shards import is_feature_shards

    if features is not None and is_feature_shards(features):
        return "feature-shards"
    if data is None:
        return "synthetic"
    return "shards" if looks_like_shards(data) else "annotations"
