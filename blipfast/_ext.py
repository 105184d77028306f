"""The optional compiled extension ``blipfast._C`` (CUDA C++ kernels from csrc/).

Importing blipfast never fails because the extension is missing: ``cuda_extension_available()`` says
whether it was built and loads, ``build_info()`` what it was built for.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings


@functools.lru_cache(maxsize=None)
def _load():
    if os.environ.get("BLIPFAST_DISABLE_C", "0") == "1":
        return None, "disabled by BLIPFAST_DISABLE_C=1"
    try:
        mod = importlib.import_module("blipfast._C")
    except ImportError as exc:  # not built (CPU-only install) or built against another torch
        return None, f"{type(exc).__name__}: {exc}"
    return mod, None


def extension():
    """The loaded ``blipfast._C`` module, or None."""
    return _load()[0]


def cuda_extension_available() -> bool:
    """True when ``blipfast._C`` was built and loads (its kernels still need a CUDA device to run)."""
    return _load()[0] is not None


def build_info() -> dict:
    """What was built: extension presence, CUDA archs, torch/CUDA versions, Triton availability."""
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


def require_extension(what: str):
    mod = extension()
    if mod is None:
        raise RuntimeError(
            f"{what} needs the compiled extension blipfast._C, which is not available "
            f"({_load()[1]}); reinstall with `pip install -e . --no-build-isolation` on a machine with nvcc"
        )
    return mod


def warn_once(msg: str) -> None:
    _warn_once(msg)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


# ``blipfast info``
def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import json

    print(json.dumps(build_info(), indent=1))
    return 0
