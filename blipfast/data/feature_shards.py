"""Feature shards: a vision encoder's tokens per image with the image's captions and id, written by every rank
in shards that are read front to back, and streamed to training without any annotation file.

Why safetensors shards (not WebDataset tars of per-sample ``.npy``): a shard's tokens are one contiguous
[n, N, width] tensor, so reading a shard is one sequential pass over one file, a row is a slice of a memory map
(no per-sample parsing or copy out of a tar member, ~20 GB/s from the page cache), fp8 is a native safetensors
dtype, and the stream's shuffle buffer holds *references* to rows (a few bytes) instead of 0.7 MB of tokens each.
A shard is self-describing: its header holds the keys and captions.

A folder of feature shards:

- ``r00000-000000.safetensors``, ... (rank, shard): tensors ``tokens`` [n, N, width] in the stored dtype,
  ``image_id`` int64 [n], and for fp8 ``scale`` float32 [n, N]; metadata ``keys`` and ``captions`` (JSON: the
  sample keys, each image's list of raw captions), ``dtype``;
- ``rank-00000.json``, ...: each rank's progress (its shards; per input source, the offset it has written up to
  and whether it is done), so an interrupted rank resumes per shard;
- ``index.json`` (:func:`write_index`, once every rank is done): dtype, N, width, counts, the shards in order.

``fp8``: e4m3 (``torch.float8_e4m3fn``) with one float32 scale per token, ``amax(|token|) / 448``, so each token
uses e4m3's whole range; 1 byte per value plus 4 per token (1,412 bytes per 1,408-wide token against 2,816 in
bf16). The stored value's error is e4m3's rounding, at most 2**-4 of its magnitude for normal values
(see :func:`encode`).
"""
from __future__ import annotations

import collections
import json
import os
from typing import Callable, Optional, Sequence

import torch

from ..files import share
from ..files import write_json_atomic as _write_json
from ..options import DTYPES as _DTYPES
from .annotations import pre_caption
from .stream import BadSample, StreamLoader, collate_tensors, stream_loader

SHARD_FORMAT = "blipfast-feature-shard"
INDEX_FORMAT = "blipfast-feature-shards"
DTYPES = {**_DTYPES, "fp8": torch.float8_e4m3fn}
E4M3_MAX = 448.0


def encode(tokens: torch.Tensor, dtype: str):
    """(stored tokens, per-token scale or None) of float ``tokens`` [..., width] in ``dtype`` (a DTYPES name)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype != "fp8":
        return tokens.to(DTYPES[dtype]).contiguous(), None
    x = tokens.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


_E4M3_TABLE: list = []


def _e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cpu":
        return q.float()
    if not _E4M3_TABLE:  # PyTorch's CPU e4m3 -> fp32 cast is scalar code, a 256-entry table lookup ~4x faster
        _E4M3_TABLE.append(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float())
    return _E4M3_TABLE[0].index_select(0, q.view(torch.uint8).reshape(-1).int()).view(q.shape)


def decode(stored: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The tokens in ``dtype`` from :func:`encode`'s output (on any device: the trainer may move the stored
    bytes and decode them on the GPU)."""
    if scale is None:
        return stored.to(dtype)
    return (_e4m3_to_float(stored) * scale.float().unsqueeze(-1)).to(dtype)


def _progress_path(out: str, rank: int) -> str:
    return os.path.join(out, f"rank-{rank:05d}.json")


class FeatureShardWriter:
    """Writes rank ``rank``'s feature shards into folder ``out`` (created), continuing what an earlier run of
    the same rank wrote there (same ``dtype`` and ``meta``, e.g. the vision model's config, else ValueError).

    Rows come in with the *source* they were read from (an input shard's URL) and their offset in it;
    :meth:`resume_offset` says where to continue a source (None: done). Each source's rows are buffered on their
    own and written as a shard every ``shard_size`` rows and at :meth:`end_source`, so a shard never mixes
    sources and a resumed run redoes at most the unwritten rows of the sources it was reading.
    """

    def __init__(self, out: str, *, rank: int = 0, dtype: str = "bf16", shard_size: int = 256,
                 meta: Optional[dict] = None):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"--shard-size must be a positive int, got {shard_size!r}")
        self.out, self.rank, self.dtype, self.shard_size = out, rank, dtype, shard_size
        os.makedirs(out, exist_ok=True)
        self.path = _progress_path(out, rank)
        meta = json.loads(json.dumps(meta or {}))
        if os.path.isfile(self.path):
            with open(self.path) as fh:
                self.progress = json.load(fh)
            for k, want in (("dtype", dtype), ("meta", meta)):
                if self.progress.get(k) != want:
                    raise ValueError(f"--out: {out!r} holds rank {rank}'s features with another {k}; use a new "
                                     f"folder (or the same settings to continue it)")
        else:
            self.progress = {"format": "blipfast-feature-progress", "rank": rank, "dtype": dtype, "meta": meta,
                             "tokens": None, "width": None, "shards": [], "sources": {}}
        self.pending: dict = {}

    def resume_offset(self, source: str) -> Optional[int]:
        """The offset to continue ``source`` at (0 when new), None when it is done."""
        rec = self.progress["sources"].get(source)
        if rec is None:
            return 0
        return None if rec["done"] else int(rec["next"])

    def add(self, source: str, offsets: Sequence[int], keys: Sequence[str], image_ids: Sequence[int],
            captions: Sequence, tokens: torch.Tensor) -> None:
        """Rows of ``source``: ``tokens`` [B, N, width] float, each row's offset in the source, key, int id and
        caption(s) (a string or a list of strings)."""
        b = tokens.shape[0] if isinstance(tokens, torch.Tensor) and tokens.dim() == 3 else None
        if b is None or not tokens.is_floating_point():
            raise ValueError(f"tokens must be a float tensor [B, N, width], got "
                             f"{getattr(tokens, 'shape', type(tokens))}")
        for name, v in (("offsets", offsets), ("keys", keys), ("image_ids", image_ids), ("captions", captions)):
            if len(v) != b:
                raise ValueError(f"{name}: {len(v)} entries for {b} rows of tokens")
        n, w = int(tokens.shape[1]), int(tokens.shape[2])
        p = self.progress
        if p["tokens"] is None:
            p["tokens"], p["width"] = n, w
        elif (p["tokens"], p["width"]) != (n, w):
            raise ValueError(f"tokens: [{n}, {w}] per row, the shards of {self.out!r} hold [{p['tokens']}, "
                             f"{p['width']}]")
        tokens = tokens.detach().cpu()
        if not torch.isfinite(tokens).all():
            raise ValueError(f"tokens: non-finite values in the rows of {source!r} at offsets {list(offsets)}")
        caps = [[c] if isinstance(c, str) else [str(x) for x in c] for c in captions]
        q, scale = encode(tokens, self.dtype)
        rec = self.pending.setdefault(source, {"tokens": [], "scale": [], "keys": [], "ids": [], "captions": []})
        rec["tokens"].append(q)
        if scale is not None:
            rec["scale"].append(scale)
        rec["keys"] += [str(k) for k in keys]
        rec["ids"] += [int(i) for i in image_ids]
        rec["captions"] += caps
        rec["next"] = int(offsets[-1]) + 1
        if len(rec["keys"]) >= self.shard_size:
            self._flush(source)

    def end_source(self, source: str) -> None:
        """Every row of ``source`` was added: write them and mark it done."""
        self._flush(source)
        rec = self.progress["sources"].setdefault(source, {"next": 0, "done": False})
        rec["done"] = True
        _write_json(self.path, self.progress)

    def close(self) -> None:
        """Write the rows still buffered (their sources stay open for a later run)."""
        for source in list(self.pending):
            self._flush(source)
        _write_json(self.path, self.progress)

    def _flush(self, source: str) -> None:
        from safetensors.torch import save_file

        rec = self.pending.pop(source, None)
        if not rec or not rec["keys"]:
            return
        p = self.progress
        name = f"r{self.rank:05d}-{len(p['shards']):06d}.safetensors"
        tensors = {"tokens": torch.cat(rec["tokens"]), "image_id": torch.tensor(rec["ids"], dtype=torch.int64)}
        if rec["scale"]:
            tensors["scale"] = torch.cat(rec["scale"])
        meta = {"format": SHARD_FORMAT, "dtype": self.dtype, "keys": json.dumps(rec["keys"]),
                "captions": json.dumps(rec["captions"])}
        tmp = os.path.join(self.out, name + ".tmp")
        save_file(tensors, tmp, metadata=meta)
        share(tmp)  # safetensors writes 0600
        os.replace(tmp, os.path.join(self.out, name))
        p["shards"].append({"file": name, "images": len(rec["keys"]), "pairs": sum(map(len, rec["captions"])),
                            "source": source})
        p["sources"].setdefault(source, {"next": 0, "done": False})["next"] = rec["next"]
        _write_json(self.path, p)


def write_index(out: str) -> dict:
    """Merge every rank's progress in ``out`` into ``index.json`` (run once all ranks are done); returns it."""
    ranks = sorted(n for n in os.listdir(out) if n.startswith("rank-") and n.endswith(".json"))
    if not ranks:
        raise ValueError(f"--out: {out!r} holds no feature shards (no rank-*.json)")
    progress = []
    for n in ranks:
        with open(os.path.join(out, n)) as fh:
            progress.append(json.load(fh))
    progress = [p for p in progress if p["shards"]] or progress[:1]  # (a rank may have had nothing to write)
    first = progress[0]
    for p in progress[1:]:
        for k in ("dtype", "meta", "tokens", "width"):
            if p[k] != first[k]:
                raise ValueError(f"--out: the ranks of {out!r} wrote features with different {k}")
    shards = [{"file": s["file"], "images": s["images"], "pairs": s["pairs"]} for p in progress for s in p["shards"]]
    index = {"format": INDEX_FORMAT, "version": 1, "dtype": first["dtype"], "tokens": first["tokens"],
             "width": first["width"], "meta": first["meta"], "images": sum(s["images"] for s in shards),
             "pairs": sum(s["pairs"] for s in shards), "shards": shards}
    _write_json(os.path.join(out, "index.json"), index)
    return index


def is_feature_shards(path) -> bool:
    """True when folder ``path`` holds feature shards (its ``index.json`` says :data:`INDEX_FORMAT`); False for
    anything else, e.g. a cache of ``blipfast cache-features`` from an annotation file (format
    ``blipfast-features``: :class:`blipfast.data.features.FeatureCache`)."""
    index = os.path.join(path, "index.json") if isinstance(path, (str, os.PathLike)) else None
    if index is None or not os.path.isfile(index):
        return False
    try:
        with open(index) as fh:
            return json.load(fh).get("format") == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class FeatureShards:
    """A feature-shard folder's ``index.json``: ``dtype`` (name), ``tokens``, ``width``, ``meta``, ``images``,
    ``pairs`` and ``urls`` (the shard files, in order)."""

    def __init__(self, path: str):
        index = os.path.join(path, "index.json")
        if not os.path.isfile(index):
            raise ValueError(f"--features: {path!r} has no index.json (write one with `blipfast cache-features`)")
        with open(index) as fh:
            self.index = json.load(fh)
        if self.index.get("format") != INDEX_FORMAT:
            raise ValueError(f"--features: {index!r} is not a feature-shard index")
        for k in ("dtype", "tokens", "width", "meta", "images", "pairs"):
            setattr(self, k, self.index[k])
        self.urls = [os.path.join(path, s["file"]) for s in self.index["shards"]]
        if not self.urls:
            raise ValueError(f"--features: {path!r} lists no shards")


class FeatureSource:
    """The (image, caption) pairs of feature shards for :class:`blipfast.data.stream.ShardStream`: one sample
    per caption of each image, in shard order. A sample in the shuffle buffer is a reference (shard, row,
    caption); its tokens are read when it leaves, in ``dtype`` (default bf16; fp8 is scaled back). With
    ``dtype=None`` they stay as stored and fp8 batches also hold ``image_scale`` [B, N] float32, for
    :func:`decode` on the device (half the bytes to copy and move).
    ``tokenize``/``text_transform`` as for :class:`blipfast.data.image_stream.ImageTextSource`.
    Batches hold ``image_embeds`` [B, N, width], ``image_id`` and the tokens."""

    def __init__(self, tokenize: Callable, *, dtype: Optional[torch.dtype] = torch.bfloat16,
                 text_transform: Optional[Callable] = pre_caption, open_shards: int = 16):
        if not callable(tokenize):
            raise TypeError("tokenize must be a callable")
        self.tokenize, self.dtype, self.text_transform = tokenize, dtype, text_transform
        self.open_shards, self._open, self._pid = open_shards, collections.OrderedDict(), None

    def config(self) -> dict:
        return {"features": True}

    def _shard(self, url: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # DataLoader workers open their own maps
            self._open, self._pid = collections.OrderedDict(), os.getpid()
        if url not in self._open:
            f = safe_open(url, framework="pt")
            names = set(f.keys())
            self._open[url] = (f, f.get_slice("tokens"), f.get_slice("scale") if "scale" in names else None)
            while len(self._open) > self.open_shards:
                self._open.popitem(last=False)
        self._open.move_to_end(url)
        return self._open[url]

    def samples(self, url: str):
        try:
            f = self._shard(url)[0]
            meta = f.metadata() or {}
            keys, captions = json.loads(meta["keys"]), json.loads(meta["captions"])
            ids = f.get_tensor("image_id").tolist()
        except Exception as exc:  # a missing, truncated or foreign file
            yield {"__key__": None, "__url__": url, "__error__": f"unreadable feature shard: "
                                                                 f"{type(exc).__name__}: {exc}"}
            return
        for row, (key, caps, image_id) in enumerate(zip(keys, captions, ids)):
            for caption in caps:
                yield {"__key__": key, "__url__": url, "row": row, "caption": caption, "image_id": image_id}

    def decode(self, raw: dict) -> dict:
        if "__error__" in raw:
            raise BadSample(raw["__error__"])
        caption = raw["caption"] if self.text_transform is None else self.text_transform(raw["caption"])
        if not caption.strip():
            raise BadSample("empty caption")
        _, tokens, scale = self._shard(raw["__url__"])
        r = raw["row"]
        out = {"caption": caption, "image_id": raw["image_id"], "__key__": raw["__key__"]}
        if self.dtype is None:
            out["image_embeds"] = tokens[r]
            if scale is not None:
                out["image_scale"] = scale[r]
        else:
            out["image_embeds"] = decode(tokens[r], None if scale is None else scale[r], self.dtype)
        return out

    def collate(self, items: list) -> dict:
        out = collate_tensors(items, ["image_embeds"] + (["image_scale"] if "image_scale" in items[0] else []))
        out.update(self.tokenize([it["caption"] for it in items]))
        return out

    def __getstate__(self):  # picklable for DataLoader workers: the maps are re-opened there
        state = dict(self.__dict__)
        state["_open"], state["_pid"] = collections.OrderedDict(), None
        return state


def feature_text_loader(path: str, *, tokenize: Callable, dtype: Optional[torch.dtype] = torch.bfloat16,
                        text_transform: Optional[Callable] = pre_caption, **stream_args) -> StreamLoader:
    """The (image tokens, caption) batches of process ``rank``'s share of the feature shards in folder ``path``
    (its ``index.json``); ``stream_args`` as for :func:`blipfast.data.image_stream.image_text_loader`."""
    source = FeatureSource(tokenize, dtype=dtype, text_transform=text_transform)
    return stream_loader(FeatureShards(path).urls, source, **stream_args)
