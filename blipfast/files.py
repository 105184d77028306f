"""The files the commands write and read back, written the same way everywhere.

- :func:`share`: the user's umask on files a library writes with mode 0600 (safetensors does), so that a shared
  group reads checkpoints, feature shards and outputs as it reads everything else the user writes;
- :func:`write_json_atomic`: a JSON file written under a temporary name and renamed;
- :func:`sha256`, :func:`identity`: a file's checksum, and what tells whether it changed (size, modification time,
  checksum);
- :func:`write_manifest` / :func:`verify_manifest`: a folder's ``manifest.json``, written last, with every file's
  size and SHA-256, and the list of what no longer matches it (a missing, truncated or altered file);
- :func:`read_jsonl_rows` / :func:`append_lines`: an output that grows by whole rows (one write and an fsync per
  batch; a partial last line, from a crash in the middle of a write, is cut off when the file is read back);
- :func:`check_settings`: the settings an appendable output was written with, stored beside it, and the refusal
  to continue it with other settings.

Why a full SHA-256 in the manifest rather than size + modification time + a hash of the head and tail: the
modification time changes when a run folder is copied (``cp``, most ``rsync`` invocations, object stores), which
would make every copied checkpoint look corrupt, and a sampled hash misses damage in the middle of a file.
hashlib's SHA-256 reads about 1-2 GB/s on one core (SHA extensions), so a BLIP-2 stage-1 checkpoint (about 2 GB
with its optimizer state) costs a second or two per save (the file is still in the page cache) and per resume (the
read warms the cache for the load that follows), against the minutes of training between two checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def umask() -> int:
    """The process' umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def share(*paths: str) -> None:
    """Give files (and the files under folders) the mode the user's umask gives a new file (0666 & ~umask)."""
    mode = 0o666 & ~umask()
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                for name in names:
                    os.chmod(os.path.join(root, name), mode)
        elif os.path.isfile(path):
            os.chmod(path, mode)


def write_json_atomic(path: str, obj, **dump_kw) -> None:
    """``obj`` as JSON at ``path``, written under ``path.tmp`` and renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, **({"indent": 1} | dump_kw))
    os.replace(tmp, path)


def sha256(path: str) -> str:
    """The SHA-256 of a file (hex), read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def identity(path: str, *, checksum: bool = True) -> dict:
    """What tells whether ``path`` changed: its absolute path, size and modification time (ns), and with
    ``checksum`` its SHA-256. A missing file gives ``{"path": ..., "size": None}``."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "size": None}
    out = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if checksum:
        out["sha256"] = sha256(path)
    return out


def write_manifest(folder: str, names: Optional[Iterable[str]] = None, **extra) -> str:
    """Write ``folder/manifest.json``: the size and SHA-256 of ``names`` (default: every file in the folder), and
    ``extra`` fields. Written last, it says the folder is complete."""
    names = sorted(n for n in os.listdir(folder) if n != MANIFEST and os.path.isfile(os.path.join(folder, n))) \
        if names is None else list(names)
    files = {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": sha256(os.path.join(folder, n))}
             for n in names}
    path = os.path.join(folder, MANIFEST)
    write_json_atomic(path, {**extra, "files": files})
    return path


def verify_manifest(folder: str) -> Optional[list]:
    """What in ``folder`` no longer matches its ``manifest.json`` (one message per file: missing, another size,
    another checksum), [] when everything does; None when the folder has no manifest."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            files = json.load(fh)["files"]
        items = [(str(n), int(f["size"]), str(f["sha256"])) for n, f in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} cannot be read"]
    problems = []
    for name, size, digest in items:
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != size:
            problems.append(f"{name} has {os.path.getsize(p)} bytes, {size} were written")
        elif sha256(p) != digest:
            problems.append(f"{name} does not match the checksum it was written with")
    return problems


def read_jsonl_rows(path: str) -> list:
    """The complete rows of a JSONL file that grows by appends; a partial or broken last part (a crash in the
    middle of a write) is cut off the file. [] when the file does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    rows, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return rows


def append_lines(fh, lines: list) -> None:
    """Append whole lines in one write, then flush and fsync (a crash leaves at most a partial last line)."""
    fh.write("".join(lines))
    fh.flush()
    os.fsync(fh.fileno())


def check_settings(path: str, settings: dict, *, output: str, resumed: bool, flag: str = "--restart") -> None:
    """The settings an appendable output is written with, stored in ``path`` (JSON). Continuing the output
    (``resumed``: it already holds rows) with other settings is a ValueError naming the ones that differ; else the
    settings are (re)written. ``settings`` must be JSON values."""
    if resumed and os.path.isfile(path):
        try:
            with open(path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict):
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if changed:
                shown = "; ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise ValueError(f"{output} was written with other settings ({shown}; stored in {path}): continuing "
                                 f"it would mix both in one output. Use the same settings to continue it, or "
                                 f"{flag} to start it again (or another output)")
    write_json_atomic(path, settings)
