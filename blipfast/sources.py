"""What a user passes as a model or checkpoint, resolved once (:func:`resolve_source`, public as
``blipfast.convert.resolve_source``): a ``blipfast train`` run folder, one of its checkpoint folders, an HF folder,
safetensors or a torch file, described by a :class:`Source` (kind, the weights to read, the run's and the HF
configs) without loading anything. :func:`blipfast.convert.load_into` reads a :class:`Source`'s weights."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # blipfast train's RUN/checkpoint-<step>/


def list_checkpoints(run_dir) -> list:
    """The complete checkpoint folders (``checkpoint-<step>/state.pt``) of a ``blipfast train`` run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = CHECKPOINT_DIR.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, "state.pt")):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class Source:
    """A model or checkpoint as :func:`resolve_source` finds it.

    ``kind``: "run" (a ``blipfast train`` run folder: its last checkpoint), "checkpoint" (one of its
    ``checkpoint-*`` folders, or the ``model.safetensors`` in one), "hf" (a folder with a ``config.json``),
    "safetensors" (a ``.safetensors`` file, an index ``.json`` or a folder of them) or "torch" (a ``.pth`` /
    ``.pt`` / ``.bin`` file, e.g. LAVIS' or Salesforce BLIP's). ``path``: what was given (absolute);
    ``weights``: the file or folder :func:`load_state_dict` / :func:`load_into` read; ``run_dir``,
    ``checkpoint``: the run and checkpoint folders when it comes from a run; ``run_config``: the run's
    ``config.yaml`` (its resolved options); ``hf_config``: the ``config.json`` beside the weights."""

    kind: str
    path: str
    weights: str
    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    run_config: Optional[dict] = None
    hf_config: Optional[dict] = None


def _read_config(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        if path.endswith(".json"):
            return json.load(fh)
        import yaml

        return yaml.safe_load(fh) or {}


def _in_run(path: str, folder: str, weights: str) -> Source:
    run = os.path.dirname(folder)
    cfg = _read_config(os.path.join(run, "config.yaml"))
    return Source("checkpoint", path, weights, run_dir=run if cfg is not None else None, checkpoint=folder,
                  run_config=cfg, hf_config=_read_config(os.path.join(folder, "config.json")))


def resolve_source(path, *, what: str = "--init") -> Source:
    """What ``path`` is (see :class:`Source`): a ``blipfast train`` run folder, one of its checkpoint folders, an
    HF folder, safetensors or a torch file. Nothing is loaded; ValueError naming ``what`` when it does not exist,
    or is a run folder without a complete checkpoint."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        raise ValueError(f"{what}: {path!r} does not exist")
    p = os.path.abspath(path)
    if os.path.isfile(p):
        folder = os.path.dirname(p)
        if os.path.basename(p) == "model.safetensors" and os.path.isfile(os.path.join(folder, "state.pt")):
            return _in_run(p, folder, p)
        kind = "safetensors" if p.endswith((".safetensors", ".json")) else "torch"
        return Source(kind, p, p, hf_config=_read_config(os.path.join(folder, "config.json")))
    if os.path.isfile(os.path.join(p, "state.pt")):
        return _in_run(p, p, os.path.join(p, "model.safetensors"))
    found = list_checkpoints(p)
    if found:
        return Source("run", p, os.path.join(found[-1], "model.safetensors"), run_dir=p, checkpoint=found[-1],
                      run_config=_read_config(os.path.join(p, "config.yaml")),
                      hf_config=_read_config(os.path.join(found[-1], "config.json")))
    if os.path.isfile(os.path.join(p, "config.yaml")):
        raise ValueError(f"{what}: {path!r} is a blipfast train run without a complete checkpoint "
                         f"(checkpoint-*/state.pt)")
    cfg = _read_config(os.path.join(p, "config.json"))
    return Source("hf" if cfg is not None else "safetensors", p, p, hf_config=cfg)
