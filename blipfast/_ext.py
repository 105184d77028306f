"""The optional compiled extension ``blipfast._C`` (CUDA C++ kernels from csrc/).

Importing blipfast never fails because the extension is missing or broken: ``cuda_extension_available()``
says whether it was built and loads, ``load_error()`` why not (the exception text), ``build_info()`` what
was built. ``blipfast info`` prints build_info() with the self-test's cached verdicts (``selftest_verdicts()``) and,
when the extension does not load, the error on stderr.
The tests that need the extension fail (instead of skipping) where a CUDA device is visible and the build
was not switched off: the tests marked ``extension`` (tests/helpers/runtime.py's ``require_extension``).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys

NAME = "blipfast._C"
REBUILD_HINT = ("rebuild it against the installed torch: `pip install -e . --no-build-isolation` on a machine with "
                "an nvcc of torch's CUDA major version (BLIPFAST_BUILD_CUDA=1 makes a failed build an error)")


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why): disabled, not built, or built but failing to load (e.g. an ABI mismatch with
    the installed torch: an undefined symbol)."""
    if os.environ.get("BLIPFAST_DISABLE_C", "0") == "1":
        return None, "disabled by BLIPFAST_DISABLE_C=1"
    try:
        mod = importlib.import_module(NAME)
    except ModuleNotFoundError as exc:
        if exc.name != NAME:  # the library exists but needs a module that does not
            return None, f"does not load: {type(exc).__name__}: {exc}"
        return None, f"not built ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported, never raised at `import blipfast`
        return None, f"does not load: {type(exc).__name__}: {exc}"
    return mod, None


def extension():
    """The loaded ``blipfast._C`` module, or None."""
    return _load()[0]


def load_error() -> str | None:
    """Why ``blipfast._C`` is not available (the exception text of the failed import), or None when it loads."""
    return _load()[1]


def switched_off() -> str | None:
    """The setting that deliberately leaves the extension out (BLIPFAST_BUILD_CUDA=0 at build time or
    BLIPFAST_DISABLE_C=1 at run time), or None."""
    if os.environ.get("BLIPFAST_BUILD_CUDA", "auto").strip().lower() == "0":
        return "BLIPFAST_BUILD_CUDA=0"
    if os.environ.get("BLIPFAST_DISABLE_C", "0") == "1":
        return "BLIPFAST_DISABLE_C=1"
    return None


def cuda_extension_available() -> bool:
    """True when ``blipfast._C`` was built and loads (its kernels still need a CUDA device to run)."""
    return _load()[0] is not None


def build_info() -> dict:
    """What was built: extension presence (and its load error), CUDA archs, torch/CUDA versions, Triton."""
    import torch

    mod, err = _load()
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": mod is not None,
        "extension_error": err,
        "triton": None,
    }
    if mod is not None:
        info.update(mod.build_info())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


# ``blipfast info``
def add_arguments(parser) -> None:
    pass


def selftest_verdicts() -> dict:
    """The self-test's cached verdicts (docs/selftest.md): the cache folder and, per device key, each
    (op, backend, dtype)'s pass or failure; those of this machine's visible CUDA devices first."""
    import torch

    from .selftest import cache

    current = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        key = cache.device_key(torch.device("cuda", i))
        if key not in current:
            current.append(key)
    entries = cache.cached()
    entries.sort(key=lambda e: e["key"] not in current)
    return {"cache": str(cache.selftest_dir()),
            "devices": [{"key": e["key"], "current": e["key"] in current,
                         "verdicts": {name: "pass" if v.get("ok") else f"FAIL: {v.get('error')}"
                                      for name, v in e["verdicts"].items()}} for e in entries]}


def run(args) -> int:
    import json

    info = build_info()
    info["selftest"] = selftest_verdicts()
    print(json.dumps(info, indent=1))
    if info["extension_error"] is not None:
        hint = "" if switched_off() else f"; {REBUILD_HINT}"
        print(f"blipfast: {NAME} is not available: {info['extension_error']}{hint}", file=sys.stderr)
    return 0
