"""The pieces of the ``blipfast train --task blip2-caption`` tests: a LAVIS-named stage-1 checkpoint without the
ViT (as LAVIS saves a run whose ViT was frozen), beside the tiny ViT folder and LLMs of tests/helpers/stage2.py."""
from __future__ import annotations

import torch

from tests.helpers.stage2 import write_lavis_stage1


def write_lavis_stage1_no_vit(path, seed: int = 0) -> str:
    """:func:`write_lavis_stage1` without ``visual_encoder.*`` (Q-Former, queries, ln_vision 24 wide)."""
    from blipfast import convert

    write_lavis_stage1(path, seed=seed)
    sd = torch.load(path, weights_only=True)["model"]
    convert.save_lavis_checkpoint({k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}, path)
    return str(path)
