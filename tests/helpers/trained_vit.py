"""Checks the ``blipfast train`` tests of the tasks whose BLIP-2 ViT trains (``blip2-caption``, ``blip2-retrieval``)
share: a stopped-and-resumed run equals an uninterrupted one, and the ViT moved and is in the checkpoint."""
from __future__ import annotations

import torch

from tests.helpers.train import read_log, weights


def assert_resumed_run_is_identical(full: str, part: str, steps: int, keys: tuple) -> dict:
    """``part`` (stopped, then resumed) logged ``keys`` of every step as ``full`` did (steps 1..``steps``, finite
    losses) and holds the same tensors bit for bit; returns ``full``'s last weights."""
    rf, rp = read_log(full), read_log(part)
    assert [r["step"] for r in rf] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rf)
    assert [[r[k] for k in keys] for r in rp] == [[r[k] for k in keys] for r in rf]
    wf, wp = weights(full), weights(part)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)
    return wf


def assert_vit_trained(wf: dict, vision: str, positions: int) -> None:
    """The checkpoint ``wf`` holds the ViT (HF names) moved away from the ``vision`` folder's, its position table of
    ``positions`` rows (the training resolution's patches + CLS)."""
    from transformers import Blip2VisionModel

    vit0 = Blip2VisionModel.from_pretrained(vision).state_dict()
    name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert name in wf and not torch.equal(wf[name], vit0["encoder.layers.1.mlp.fc1.weight"])
    assert wf["vision_model.embeddings.position_embedding"].shape[:2] == (1, positions)
