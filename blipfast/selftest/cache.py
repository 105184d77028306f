"""The self-test's verdicts on disk (docs/selftest.md#the-cache), so that a later process on the same machine pays
nothing.

A verdict is about one (op, backend, dtype) on one device under one software stack: its key is the GPU's name,
compute capability and driver version and the versions of torch (with its CUDA), Triton and blipfast, where
blipfast's version carries a fingerprint of the code a kernel's result depends on (the Triton kernels, the ops, the
self-test's own cases, and the compiled extension's size and modification time), so that an edited kernel or a
rebuilt extension is checked again. Any change of the key is a fresh start: verdicts live in a folder per key,

    <cache>/selftest/<key id>/key.json                          the key, readable
    <cache>/selftest/<key id>/<op>.<backend>.<dtype>.json       {"ok", "error", "level", "cases", "time"}

one file per verdict, written atomically (processes that check at the same time, e.g. the ranks of a job, never
corrupt each other's). ``<cache>`` is ``$BLIPFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/blipfast``, else
``~/.cache/blipfast``. A folder that cannot be written costs only the cache: verdicts then live in the process.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import tempfile
import time

import torch

from .. import __version__

ENV_DIR = "BLIPFAST_CACHE_DIR"


def cache_root() -> pathlib.Path:
    """The folder of blipfast's caches (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return pathlib.Path(os.environ[ENV_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "blipfast"


def selftest_dir() -> pathlib.Path:
    return cache_root() / "selftest"


def _driver_version() -> str | None:
    """The NVIDIA driver's version (/proc/driver/nvidia/version), else the CUDA driver API version torch sees."""
    try:
        text = pathlib.Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    try:
        return f"cuda {get()}" if get is not None else None
    except RuntimeError:
        return None


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """A short hash of the sources of blipfast.kernels, blipfast.ops and this package, and of the compiled
    extension's size and modification time."""
    h = hashlib.sha256()
    here = pathlib.Path(__file__).resolve().parent
    for pkg, folder in (("blipfast.kernels", None), ("blipfast.ops", here.parent / "ops"), ("selftest", here)):
        if folder is None:
            spec = importlib.util.find_spec(pkg)
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            folder = pathlib.Path(locations[0]) if locations else None
        for path in sorted(folder.glob("*.py")) if folder is not None else ():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    spec = importlib.util.find_spec("blipfast._C")
    if spec is not None and spec.origin:
        st = os.stat(spec.origin)
        h.update(f"_C {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def device_key(device: torch.device) -> dict:
    """The key of ``device``'s verdicts (see the module docstring). A CPU (the Triton interpreter, in tests) has no
    capability or driver."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        gpu, capability, driver = torch.cuda.get_device_name(index), f"{major}.{minor}", _driver_version()
    else:
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        gpu, capability, driver = device.type + (" (Triton interpreter)" if interp else ""), None, None
    return {"gpu": gpu, "capability": capability, "driver": driver,
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda})", "triton": _triton_version(),
            "blipfast": f"{__version__}+{code_fingerprint()}"}


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _verdict_path(key: dict, op: str, backend: str, dtype: torch.dtype) -> pathlib.Path:
    return selftest_dir() / key_id(key) / f"{op}.{backend}.{dtype_name(dtype)}.json"


def load(key: dict, op: str, backend: str, dtype: torch.dtype) -> dict | None:
    """The cached verdict ({"ok": bool, "error": str | None, ...}) or None."""
    try:
        verdict = json.loads(_verdict_path(key, op, backend, dtype).read_text())
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and isinstance(verdict.get("ok"), bool) else None


def _write(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def store(key: dict, op: str, backend: str, dtype: torch.dtype, ok: bool, error: str | None, level: str,
          cases: int) -> dict:
    """Write one verdict (and the key beside it); returns the verdict. An unwritable folder is ignored."""
    verdict = {"ok": ok, "error": error, "level": level, "cases": cases,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        path = _verdict_path(key, op, backend, dtype)
        if not (path.parent / "key.json").exists():
            _write(path.parent / "key.json", key)
        _write(path, verdict)
    except OSError:
        pass
    return verdict


def cached(key: dict | None = None) -> list:
    """Every cached key with its verdicts ({"key", "id", "verdicts": {"op/backend/dtype": verdict}}); only ``key``'s
    when given."""
    root = selftest_dir()
    folders = [root / key_id(key)] if key is not None else sorted(p for p in root.glob("*") if p.is_dir())
    out = []
    for folder in folders:
        try:
            k = json.loads((folder / "key.json").read_text())
        except (OSError, ValueError):
            continue
        verdicts = {}
        for path in sorted(folder.glob("*.*.*.json")):
            try:
                verdicts["/".join(path.name[:-len(".json")].split("."))] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        out.append({"id": folder.name, "key": k, "verdicts": verdicts})
    return out
