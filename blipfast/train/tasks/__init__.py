"""What ``blipfast train`` trains: one task per file, behind the contract of :class:`Task` (see
:mod:`blipfast.train.tasks.base`), found by name.

:func:`task_names` lists the tasks from the file names of this package (``blip2_stage1.py`` is
``blip2-stage1``; ``base`` and modules whose name starts with "_", the pieces tasks share, are none) without
importing them; :func:`task_class` imports the one asked for, whose module registers its
class with :func:`register`.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import PRESETS, Task, register
from .base import _REGISTRY

__all__ = ["PRESETS", "Task", "register", "task_class", "task_names"]


def task_names() -> tuple:
    """The task names, from the modules of this package (no import)."""
    return tuple(sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__)
                        if m.name != "base" and not m.name.startswith("_")))


def task_class(name: str) -> type:
    """The :class:`Task` subclass registered as ``name``; ValueError naming ``--task`` for an unknown one."""
    if name not in task_names():
        raise ValueError(f"--task: unknown task {name!r}; choose from {', '.join(task_names())}")
    importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    if name not in _REGISTRY:
        raise ValueError(f"--task: the module of {name!r} registers no task of that name")
    return _REGISTRY[name]
