"""The device and dtype options every ``blipfast`` command shares: one dtype table, one default device, one way to
add the flags.

- :data:`DTYPES`: the dtype names the commands accept (``bf16``, ``fp16``, ``fp32``; ``bfloat16``, ``float16`` and
  ``float32`` are read as the same names) and the torch dtype of each;
- :func:`resolve_device`: a ``--device`` value (``cuda``, ``cuda:1``, ``cpu``; None or ``auto``: CUDA when a CUDA
  device is visible, else the CPU) as a ``torch.device``, refusing ``cuda`` on a machine without one;
- :func:`resolve_dtype`: a dtype name (None or ``auto``: bf16 on CUDA, fp32 on the CPU) as a torch dtype for a
  device; :func:`auto_dtype_name` is the name that default stands for;
- :func:`add_device_argument` / :func:`add_dtype_argument`: the argparse flags, with the same choices and help in
  every command;
- the exit codes every command returns (:data:`EXIT_OK`, :data:`EXIT_USAGE`, :data:`EXIT_NOT_FINITE`,
  :data:`EXIT_STOPPED`; docs/troubleshooting.md lists them).
"""
from __future__ import annotations

import argparse
from typing import Optional, Union

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEVICE_HELP = "cuda, cuda:1 or cpu (default: cuda when available)"
DEVICE_TYPES = ("cpu", "cuda")

# exit codes of every command (an unexpected error, a Python traceback, exits 1)
EXIT_OK = 0  # done
EXIT_USAGE = 2  # refused before or while working: a bad option, input file or model, with a message (argparse's code)
EXIT_NOT_FINITE = 65  # a value that must be finite is not (a training loss diverged; retrieval's image features)
EXIT_STOPPED = 75  # stopped early and resumable: SIGTERM / SIGINT or --stop-after (sysexits' EX_TEMPFAIL: requeue)
AUTO_HELP = "bf16 on CUDA, fp32 on CPU"


def dtype_name(value: str) -> str:
    """``value`` with the long torch names read as the short ones ("bfloat16" -> "bf16"); others unchanged."""
    return _ALIASES.get(value, value) if isinstance(value, str) else value


def resolve_device(value: Union[str, torch.device, None] = None, *, flag: str = "--device") -> torch.device:
    """The device of a ``--device`` value (see the module docstring); ValueError naming ``flag`` for a value that is
    not a device, or a CUDA device on a machine without one."""
    if isinstance(value, torch.device):
        return value
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{flag}: {value!r} is not a device ({DEVICE_HELP.split(' (')[0]}): {exc}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{flag}: {value!r} is not a device blipfast runs on ({DEVICE_HELP.split(' (')[0]})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {value}: no CUDA device is visible")
    return device


def auto_dtype_name(device: torch.device) -> str:
    """The dtype the commands default to on ``device``: "bf16" on CUDA, "fp32" elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_dtype(name: Optional[str], device: Union[str, torch.device] = "cpu", *, flag: str = "--dtype"
                  ) -> torch.dtype:
    """The torch dtype of a dtype option; None or "auto" is :func:`auto_dtype_name` of ``device``."""
    key = auto_dtype_name(device) if name is None or name == "auto" else dtype_name(name)
    if key not in DTYPES:
        raise ValueError(f"{flag} must be auto or one of {', '.join(sorted(DTYPES))}, got {name!r}")
    return DTYPES[key]


def add_device_argument(p: argparse.ArgumentParser, *, help: str = DEVICE_HELP, **kw) -> None:
    """``--device`` (default None: :func:`resolve_device` picks CUDA when available)."""
    p.add_argument("--device", help=help, **kw)


def add_dtype_argument(p: argparse.ArgumentParser, what: str, *, flag: str = "--dtype", default: Optional[str] = None,
                       auto: bool = False, note: str = "", extra: tuple = ()) -> None:
    """A dtype flag: ``what`` it sets, choices bf16 / fp16 / fp32 (plus ``auto`` with ``auto`` and the names of
    ``extra``, e.g. ``("fp8",)``; the long names are accepted as the short ones), the default in the help (None or
    "auto": :data:`AUTO_HELP`)."""
    choices = (["auto"] if auto else []) + sorted(DTYPES) + list(extra)
    shown = AUTO_HELP if default in (None, "auto") else default
    if auto and default == "auto":
        shown = f"auto: {AUTO_HELP}"
    p.add_argument(flag, type=dtype_name, choices=choices, default=default,
                   help=f"{what} (default: {shown}{'; ' + note if note else ''})")
