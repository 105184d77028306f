"""Streams of samples from shards: split by process and DataLoader worker, shuffled through a buffer, resumable.

:class:`ShardStream` is a ``torch.utils.data.IterableDataset`` of *batches* over a list of shards (see
:mod:`blipfast.data.shards`); what a shard holds and how a sample becomes tensors is a *source*'s business
(:class:`blipfast.data.image_stream.ImageTextSource` for WebDataset tars of images and captions,
:class:`blipfast.data.feature_shards.FeatureSource` for feature shards). :class:`StreamLoader` runs it in a
``DataLoader`` and records where it is.

Order. There are ``G = world x num_workers`` logical workers; worker ``g = rank * num_workers + w`` reads its
own sequence of shards, position ``s = 0, 1, 2, ...``:

- plain: pass ``p`` shuffles the shard list with ``seed`` and ``p`` (the same permutation on every process) and
  worker ``g`` takes every ``G``-th shard of it from the ``g``-th on; so each pass reads every shard once, on one
  worker. A worker's passes follow each other without end (the trainer's epoch is ``--samples-per-epoch``
  samples, counted by the trainer); the shuffle buffer is drained at the end of each pass, so a pass emits
  exactly its shards' samples.
- resampled (``--resampled``, as OpenCLIP): shard ``s`` of worker ``g`` is drawn with replacement by a generator
  seeded with ``(seed, g, s)``.

Each worker's samples go through a shuffle buffer of ``shuffle_buffer`` samples (webdataset's algorithm: once
full, a uniformly drawn element leaves for every one that enters; undecoded bytes are buffered), then are decoded
(a sample that cannot be used is skipped, counted and reported, see :class:`BadSamples`) and batched in the
worker. Everything is a function of ``(seed, rank, worker)`` and the data: the same arguments give the same
batches. The DataLoader hands out batch ``j`` from worker ``j mod num_workers``.

Resume. A sample's position is ``(s, offset in its shard)``. Every ``snapshot_every`` batches a worker attaches
a snapshot of its state: the reader's position, the positions in the buffer (in buffer order), the buffer's
random generator and the count of samples it emitted. :class:`StreamLoader` keeps, per worker, the last
snapshot it handed out and the count of samples emitted up to the last batch it handed out;
:meth:`StreamLoader.state_dict` is that (JSON). Restoring re-reads the few shards the buffer's samples came
from (sequentially), rebuilds the buffer, replays the samples emitted since the snapshot without decoding them,
and rotates the workers so that the one whose batch is next goes first: a resumed run gets the batches of an
uninterrupted one, in the same order, with the same ``num_workers``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
import time
from typing import Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

FORMAT = "blipfast-stream"


class BadSample(ValueError):
    """A sample that cannot be used (no image, no caption, an image that does not decode, a broken shard)."""


class BadSamples:
    """Rate-limited report of skipped samples, one line each on stderr naming the shard and the key: the first
    ``burst``, then at most one every ``every`` seconds (with the count of those not shown)."""

    def __init__(self, burst: int = 10, every: float = 30.0):
        self.burst, self.every = burst, every
        self.shown, self.hidden, self.last = 0, 0, 0.0

    def __call__(self, url: str, key, reason: str, total: int) -> None:
        now = time.monotonic()
        if self.shown >= self.burst and now - self.last < self.every:
            self.hidden += 1
            return
        more = f"; {self.hidden} more not shown" if self.hidden else ""
        what = f"sample {key!r}" if key is not None else "a part"
        print(f"blipfast data: skipped {what} of shard {url}: {reason} ({total} skipped by this worker{more})",
              file=sys.stderr, flush=True)
        self.shown, self.hidden, self.last = self.shown + 1, 0, now


def _seeded(*parts) -> random.Random:
    return random.Random(":".join(map(str, parts)))  # str seeds hash with SHA-512: the same in every process


class _Worker:
    """One logical worker's reader, shuffle buffer and counters (the state a snapshot holds)."""

    def __init__(self, stream: "ShardStream", g: int):
        self.st, self.g = stream, g
        n, G = len(stream.urls), stream.logical_workers
        self.n_g = len(range(g, n, G))
        self.size = stream.shuffle_buffer if stream.shuffle else 1
        self.pass_, self.rng = 0, _seeded(stream.seed, "buffer", g)
        self.reader = (0, 0)  # the position of the next sample to read
        self.buf: list = []  # (s, offset, raw sample)
        self.emitted = self.bad = 0
        self._order = (None, None)

    def url(self, s: int) -> str:
        st = self.st
        if st.resampled:
            return st.urls[_seeded(st.seed, "draw", self.g, s).randrange(len(st.urls))]
        p, i = divmod(s, self.n_g)
        if self._order[0] != p:
            order = list(range(len(st.urls)))
            if st.shuffle:
                _seeded(st.seed, "shards", p).shuffle(order)
            self._order = (p, order)
        return st.urls[self._order[1][self.g + i * st.logical_workers]]

    def pass_of(self, s: int) -> int:
        return 0 if self.st.resampled else s // self.n_g

    def read(self, s: int):
        """(s, offset, raw) of every sample from shard ``s`` on, forever."""
        empty = 0
        limit = self.n_g if not self.st.resampled else max(100, len(self.st.urls))
        while True:
            url = self.url(s)
            n = 0
            for off, raw in enumerate(self.st.source.samples(url)):
                n += 1
                yield s, off, raw
            empty = 0 if n else empty + 1
            if empty >= limit:
                raise ValueError(f"--data: {empty} shard(s) in a row hold no sample (worker {self.g}, last "
                                 f"{url!r})")
            s += 1

    def restore(self, snap: dict):
        """Rebuild the state of ``snap``; returns the iterator of samples that continues the reader."""
        self.pass_, self.reader = int(snap["pass"]), tuple(snap["reader"])
        version, internal, gauss = snap["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.emitted, self.bad = int(snap["emitted"]), int(snap["bad"])
        want = {(s, o): i for i, (s, o) in enumerate(zip(snap["buf_s"], snap["buf_off"]))}
        start = min([s for s, _ in want] + [self.reader[0]])
        items = self.read(start)
        buf: list = [None] * len(want)
        for item in items:
            if item[:2] >= self.reader:
                pending = item
                break
            i = want.get(item[:2])
            if i is not None:
                buf[i] = item
        if any(b is None for b in buf):  # a shard changed (or a command or URL read differently): go on
            print(f"blipfast data: --resume: {sum(b is None for b in buf)} of the {len(buf)} samples in worker "
                  f"{self.g}'s shuffle buffer are no longer in their shards; continuing without them",
                  file=sys.stderr, flush=True)
        self.buf = [b for b in buf if b is not None]
        return itertools.chain([pending], items)

    def snapshot(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"pass": self.pass_, "reader": list(self.reader), "rng": [version, list(internal), gauss],
                "buf_s": [b[0] for b in self.buf], "buf_off": [b[1] for b in self.buf],
                "emitted": self.emitted, "bad": self.bad}

    def _pick(self):
        buf = self.buf
        k = self.rng.randrange(len(buf)) if len(buf) > 1 else 0
        item = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        self.emitted += 1
        return item

    def shuffled(self, items):
        """The samples of ``items`` through the buffer (drained at the end of each pass)."""
        for s, off, raw in items:
            p = self.pass_of(s)
            while p > self.pass_:
                while self.buf:
                    yield self._pick()
                self.pass_ += 1
            self.buf.append((s, off, raw))
            self.reader = (s, off + 1)
            if len(self.buf) >= self.size:
                yield self._pick()


class ShardStream(IterableDataset):
    """Batches of ``source``'s samples from shards ``urls`` for process ``rank`` of ``world`` (see the module
    docstring). ``state``: a :meth:`StreamLoader.state_dict` to resume from (None: the start).

    Batches are dicts of tensors (``source.collate``) plus ``__key__`` (the sample keys) and ``__stream__`` (the
    position; :class:`StreamLoader` takes both out). ``num_workers`` must be the DataLoader's.
    """

    def __init__(self, urls: Sequence[str], source, *, batch_size: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 resampled: bool = False, state: Optional[dict] = None, snapshot_every: int = 32,
                 max_bad_run: int = 10000):
        super().__init__()
        for name, v, lo in (("batch_size", batch_size, 1), ("world", world, 1), ("rank", rank, 0),
                            ("num_workers", num_workers, 0), ("seed", seed, 0), ("shuffle_buffer", shuffle_buffer, 0),
                            ("snapshot_every", snapshot_every, 1), ("max_bad_run", max_bad_run, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world:
            raise ValueError(f"rank must be < world ({world}), got {rank}")
        self.urls = list(urls)
        if not self.urls:
            raise ValueError("--data names no shards")
        self.source, self.batch_size = source, batch_size
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, max(1, shuffle_buffer)
        self.resampled, self.snapshot_every, self.max_bad_run = resampled, snapshot_every, max_bad_run
        self.logical_workers = world * max(1, num_workers)
        if not resampled and len(self.urls) < self.logical_workers:
            raise ValueError(f"--data: {len(self.urls)} shard(s) for {world} process(es) x {max(1, num_workers)} "
                             f"loader worker(s): every worker needs a shard of its own (fewer --num-workers, more "
                             f"shards, or --resampled)")
        self.state = None
        if state is not None:
            self.load_state(state)

    def config(self) -> dict:
        """What a resumed stream must share with the recorded one."""
        digest = hashlib.sha1("\n".join(u.rsplit("/", 1)[-1] for u in self.urls).encode()).hexdigest()
        return {"shards": len(self.urls), "shard_names": digest, "batch_size": self.batch_size, "rank": self.rank,
                "world": self.world, "num_workers": max(1, self.num_workers), "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "resampled": self.resampled,
                "source": self.source.config()}

    def load_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("--resume: the checkpoint holds no data-stream position")
        mine, theirs = self.config(), state.get("config", {})
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise ValueError("--resume: the data stream was recorded with other "
                             + ", ".join(f"{k} ({theirs.get(k)!r}, now {mine[k]!r})" for k in diff))
        self.state = state

    def __iter__(self):
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != max(1, self.num_workers):
            raise ValueError(f"ShardStream: built for num_workers={self.num_workers}, run by {n} worker(s)")
        batches = self.state["batches"] if self.state else 0
        w = (i + batches) % n  # the worker whose batch is next goes first
        return self._batches(w, self.state["workers"][w] if self.state else None)

    def _batches(self, w: int, rec: Optional[dict]):
        worker = _Worker(self, self.rank * max(1, self.num_workers) + w)
        snap = json.loads(rec["snapshot"]) if rec and rec["snapshot"] else None
        items = worker.restore(snap) if snap else worker.read(0)
        gen = worker.shuffled(items)
        target = rec["emitted"] if rec else 0
        while worker.emitted < target:  # replay what was emitted since the snapshot, undecoded
            next(gen)
        worker.bad = rec["bad"] if rec else 0
        report, run, since, batch = BadSamples(), 0, 0, []
        decode, collate = self.source.decode, self.source.collate
        for s, off, raw in gen:
            raw["__epoch__"], raw["__draw__"] = worker.pass_of(s), (worker.g, s, off)  # see image_stream
            try:
                batch.append(decode(raw))
            except BadSample as exc:
                worker.bad += 1
                run += 1
                report(raw.get("__url__", worker.url(s)), raw.get("__key__"), str(exc), worker.bad)
                if run >= self.max_bad_run:
                    raise ValueError(f"--data: {run} samples in a row could not be used (the last: "
                                     f"{raw.get('__key__')!r} of {raw.get('__url__')}: {exc}); check "
                                     f"--image-key / --caption-key") from None
                continue
            run = 0
            if len(batch) == self.batch_size:
                out = collate(batch)
                batch = []
                since += 1
                meta = {"worker": w, "emitted": worker.emitted, "bad": worker.bad}
                if since >= self.snapshot_every:
                    meta["snapshot"], since = json.dumps(worker.snapshot()), 0
                out["__stream__"] = meta
                yield out


def _same(batch):
    return batch


class StreamLoader:
    """Iterates ``stream``'s batches through a ``DataLoader`` (``stream.num_workers`` workers) and records the
    position after the last batch handed out: :meth:`state_dict` (JSON-serialisable) resumes a
    :class:`ShardStream` there. A new ``iter()`` continues where the last one stopped. ``bad_samples``: the
    samples skipped so far (all workers, since the stream's start). Batches keep ``__key__`` (the sample keys,
    a list) when ``with_keys``.

    Take :meth:`state_dict` between batches, after the last batch fetched was used: a batch fetched is a batch
    consumed.
    """

    def __init__(self, stream: ShardStream, *, pin_memory: bool = False, prefetch_factor: Optional[int] = None,
                 with_keys: bool = False, multiprocessing_context=None):
        self.stream, self.with_keys = stream, with_keys
        self.loader_args = {"pin_memory": pin_memory, "multiprocessing_context": multiprocessing_context,
                            **({"prefetch_factor": prefetch_factor} if stream.num_workers and prefetch_factor else {})}
        st = stream.state
        n = max(1, stream.num_workers)
        self.batches = int(st["batches"]) if st else 0
        self.workers = [dict(r) for r in st["workers"]] if st else \
            [{"snapshot": None, "emitted": 0, "bad": 0} for _ in range(n)]

    @property
    def bad_samples(self) -> int:
        return sum(int(r["bad"]) for r in self.workers)

    def state_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "config": self.stream.config(), "batches": self.batches,
                "workers": [dict(r) for r in self.workers]}

    def __iter__(self):
        from torch.utils.data import DataLoader

        self.stream.state = self.state_dict()
        # a generator of its own: the DataLoader draws its workers' base seed from it, not from the global RNG
        # (which a resumed trainer has just restored for dropout)
        loader = DataLoader(self.stream, batch_size=None, collate_fn=_same, num_workers=self.stream.num_workers,
                            persistent_workers=False, generator=torch.Generator().manual_seed(self.stream.seed),
                            **self.loader_args)
        for batch in loader:
            meta = batch.pop("__stream__")
            rec = self.workers[meta["worker"]]
            rec["emitted"], rec["bad"] = meta["emitted"], meta["bad"]
            if "snapshot" in meta:
                rec["snapshot"] = meta["snapshot"]
            self.batches += 1
            if not self.with_keys:
                batch.pop("__key__", None)
            yield batch


def stream_loader(urls: Sequence[str], source, *, num_workers: int = 0, pin_memory: bool = False,
                  with_keys: bool = False, multiprocessing_context=None, **stream_args) -> StreamLoader:
    """A :class:`StreamLoader` over ``ShardStream(urls, source, num_workers=num_workers, **stream_args)``
    (4 batches prefetched per worker; ``multiprocessing_context``: the DataLoader's, e.g. "fork" for a source
    holding callables that do not pickle)."""
    stream = ShardStream(urls, source, num_workers=num_workers, **stream_args)
    return StreamLoader(stream, pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                        with_keys=with_keys, multiprocessing_context=multiprocessing_context)


class ShardReader(IterableDataset):
    """Batches of ``source``'s samples of ``jobs`` (``[(url, first offset), ...]``) in order, unshuffled, for
    writers that resume per shard (``blipfast cache-features``): DataLoader worker ``i`` of ``W`` reads jobs
    ``i, i + W, ...``. A batch holds samples of one job: its tensors stacked, other fields as lists (``caption``,
    ``__key__``, ...), ``__source__`` (the url), ``__offsets__`` (each sample's offset in it), ``__bad__`` (samples
    skipped since the last batch) and ``__end__`` (True on the job's last batch, which may hold no sample)."""

    def __init__(self, jobs: Sequence, source, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        super().__init__()
        self.jobs, self.source, self.batch_size = [(str(u), int(s)) for u, s in jobs], source, batch_size

    @staticmethod
    def _collate(url: str, rows: list, bad: int, end: bool) -> dict:
        out: dict = {"__source__": url, "__offsets__": [o for o, _ in rows], "__bad__": bad, "__end__": end}
        for k in (rows[0][1] if rows else {}):
            vals = [d[k] for _, d in rows]
            out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        return out

    def __iter__(self):
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info is not None else (0, 1)
        report, total = BadSamples(), 0
        for url, start in self.jobs[i::n]:
            rows, bad = [], 0
            for off, raw in enumerate(self.source.samples(url)):
                if off < start:
                    continue
                try:
                    rows.append((off, self.source.decode(raw)))
                except BadSample as exc:
                    bad, total = bad + 1, total + 1
                    report(url, raw.get("__key__"), str(exc), total)
                    continue
                if len(rows) == self.batch_size:
                    yield self._collate(url, rows, bad, False)
                    rows, bad = [], 0
            yield self._collate(url, rows, bad, True)


def collate_tensors(items: list, keys: Sequence[str]) -> dict:
    """``{k: stack of item[k]}`` for ``keys``, ``image_id`` as int64 and ``__key__`` as a list."""
    out = {k: torch.stack([it[k] for it in items]) for k in keys}
    out["image_id"] = torch.tensor([it["image_id"] for it in items], dtype=torch.int64)
    out["__key__"] = [it["__key__"] for it in items]
    return out
