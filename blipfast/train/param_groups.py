"""Optimizer parameter groups of the reference recipes: which parameters decay, and LAVIS' layer-wise lr scales.

Each rule takes ``named_parameters`` ((name, parameter) pairs, e.g. ``model.named_parameters()``), skips the
frozen ones (``requires_grad`` False: AdamW never updates a parameter without a gradient, so leaving them out
changes nothing) and returns the list that ``torch.optim.AdamW`` takes, group by group as the reference builds it:

- :func:`blip_groups`, Salesforce BLIP (``pretrain.py``, ``train_*.py``: ``AdamW(model.parameters(),
  weight_decay=wd)``): one group, every parameter decays, biases, LayerNorms and ``temp`` included.
- :func:`lavis_groups`, LAVIS' ``BaseModel.get_optimizer_params`` (its BLIP models): no decay where
  ``p.ndim < 2`` or the name contains ``bias``, ``ln`` or ``bn`` (as substrings, anywhere in the name); a decay
  group then a no-decay group, both with ``lr_scale``.
- :func:`lavis_blip2_groups`, LAVIS' ``Blip2Base.get_optimizer_params`` (every BLIP-2 model: stage 1, 2 and the
  fine-tuning recipes): no decay where ``len(p.shape) == 1`` or the name ends with ``.bias``; so unlike the rule
  above, 0-dimensional parameters DO decay (BLIP-2's ``temp``). The trainable parameters of the vision encoder
  (names containing ``visual_encoder``) go to one group per layer id and decay kind, with ``lr_scale = s **
  (L + 1 - layer_id)`` (``s``: the config's ``lr_layer_decay``, 0.95 in ``retrieval_coco_ft.yaml``, else 1; ``L``:
  the number of blocks); everything else has ``lr_scale`` 1. Groups come in the order of their first parameter.
  Layer ids (``get_num_layer`` of LAVIS' ViTs), :func:`eva_vit_layer`: ``cls_token``, ``mask_token``,
  ``pos_embed``, ``patch_embed.*`` 0; ``blocks.k.*`` k + 1; ``rel_pos_bias.*`` L - 1; anything else L (so the last
  block and the rest share scale ``s``; id L + 1, scale 1, is never used). :func:`clip_vit_layer` (LAVIS'
  CLIP ViT-L): the names ``class_embedding`` and ``positional_embedding`` 0 (``conv1.weight`` and ``ln_pre.*``
  are not the bare names its rule lists, so they get L), ``transformer.resblocks.k.*`` k + 1, else L.
  :func:`hf_vit_layer` applies the EVA rule to transformers' ``Blip2VisionModel`` names (``embeddings.*`` 0,
  ``encoder.layers.k.*`` k + 1, else L; ``post_layernorm``, which is BLIP-2's ``ln_vision`` and outside LAVIS'
  ``visual_encoder``, is no ViT layer).

LAVIS stores ``lr_scale`` in each group but its schedulers (``lavis/common/optims.py``) set every group's ``lr``
to the same value and nothing else reads it: in LAVIS' runs the layer-wise decay has no effect. The groups keep the
key (AdamW ignores keys it does not know); multiplying it in is a choice a trainer makes, not the reference's.

``names`` (every rule) maps a parameter's name in the model to its name in the reference (the rules match on
names); by default the names are used as they are.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

__all__ = ["RULES", "REFERENCE_RULE", "ViTLayers", "blip_groups", "clip_vit_layer", "eva_vit_layer", "group_names",
           "hf_vit_layer", "lavis_blip2_groups", "lavis_groups"]


def _trainable(named_parameters, names) -> list:
    out = []
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"named_parameters must yield (str, Parameter) pairs (model.named_parameters()), got "
                            f"{type(item).__name__}")
        name, p = item
        if p.requires_grad:
            out.append((names(name) if names is not None else name, p))
    return out


def _decay(weight_decay) -> float:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    return weight_decay


def blip_groups(named_parameters: Iterable, weight_decay: float, *, names: Optional[Callable] = None) -> list:
    """Salesforce BLIP's ``AdamW(model.parameters(), weight_decay=weight_decay)``: one group, all decaying."""
    return [{"params": [p for _, p in _trainable(named_parameters, names)], "weight_decay": _decay(weight_decay)}]


def lavis_groups(named_parameters: Iterable, weight_decay: float, lr_scale: float = 1, *,
                 names: Optional[Callable] = None) -> list:
    """LAVIS' ``BaseModel.get_optimizer_params(weight_decay, lr_scale)``."""
    wd, no_wd = [], []
    for n, p in _trainable(named_parameters, names):
        (no_wd if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n else wd).append(p)
    return [{"params": wd, "weight_decay": _decay(weight_decay), "lr_scale": lr_scale},
            {"params": no_wd, "weight_decay": 0, "lr_scale": lr_scale}]


def eva_vit_layer(name: str, num_layers: int) -> int:
    """LAVIS' EVA ViT ``get_num_layer(name)`` (``name`` relative to the ViT) with ``num_layers`` blocks."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def clip_vit_layer(name: str, num_layers: int) -> int:
    """LAVIS' CLIP ViT ``get_num_layer(name)`` (``name`` relative to the ViT) with ``num_layers`` blocks."""
    if name in ("class_embedding", "positional_embedding", "conv1", "ln_pre"):
        return 0
    if name.startswith("transformer.resblocks"):
        return int(name.split(".")[2]) + 1
    return num_layers


def hf_vit_layer(name: str, num_layers: int) -> Optional[int]:
    """The EVA rule on transformers ``Blip2VisionModel`` names (relative to the vision model); None for
    ``post_layernorm`` (BLIP-2's ``ln_vision``, outside LAVIS' ``visual_encoder``)."""
    if name.startswith("post_layernorm"):
        return None
    if name.startswith("embeddings."):
        return 0
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) + 1
    return num_layers


_VIT_RULES = {"eva": eva_vit_layer, "clip": clip_vit_layer, "hf": hf_vit_layer}


class ViTLayers:
    """``name -> layer id, or None for a parameter outside the ViT``: the ViT's parameters are those whose name
    contains ``prefix`` (LAVIS: ``if 'visual_encoder' in name``, then the name without ``'visual_encoder.'``;
    blipfast's ``Blip2Retrieval``: ``vision_model`` with kind ``hf``), numbered by the rule ``kind`` (``eva``,
    ``clip`` or ``hf``) for a ViT of ``num_layers`` blocks."""

    def __init__(self, kind: str, num_layers: int, prefix: str = "visual_encoder"):
        if kind not in _VIT_RULES:
            raise ValueError(f"kind must be one of {sorted(_VIT_RULES)}, got {kind!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.kind, self.num_layers, self.prefix = kind, num_layers, prefix

    def __call__(self, name: str) -> Optional[int]:
        if self.prefix not in name:
            return None
        return _VIT_RULES[self.kind](name.replace(self.prefix + ".", ""), self.num_layers)

    def __repr__(self):
        return f"ViTLayers({self.kind!r}, {self.num_layers}, prefix={self.prefix!r})"


def lavis_blip2_groups(named_parameters: Iterable, weight_decay: float, lr_scale: float = 1, *,
                       vit: Optional[ViTLayers] = None, names: Optional[Callable] = None) -> list:
    """LAVIS' ``Blip2Base.get_optimizer_params(weight_decay, lr_scale)``; ``vit`` numbers the ViT's layers
    (without it no parameter is the ViT's: a frozen ViT, or none in the model)."""
    wd = _decay(weight_decay)
    if vit is not None and not isinstance(vit, ViTLayers):
        raise TypeError(f"vit must be a ViTLayers, got {type(vit).__name__}")
    groups: dict = {}
    for n, p in _trainable(named_parameters, names):
        kind, decay = ("no_decay", 0.0) if len(p.shape) == 1 or n.endswith(".bias") else ("decay", wd)
        layer = vit(n) if vit is not None else None
        key = kind if layer is None else f"vit_layer_{layer}_{kind}"
        if key not in groups:
            scale = 1 if layer is None else lr_scale ** (vit.num_layers + 1 - layer)
            groups[key] = {"weight_decay": decay, "params": [], "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def group_names(groups: list, named_parameters: Iterable) -> list:
    """The names of each group's parameters (for logs and tests)."""
    by_id = {id(p): n for n, p in named_parameters}
    return [[by_id[id(p)] for p in g["params"]] for g in groups]


RULES = {"blip": blip_groups, "lavis": lavis_groups, "lavis-blip2": lavis_blip2_groups}

# each recipe's reference rule: Salesforce BLIP decays everything; LAVIS' BLIP-2 models use Blip2Base's rule
REFERENCE_RULE = {
    "blip-pretrain": "blip",
    "blip-finetune": "blip",
    "blip2-stage1": "lavis-blip2",
    "blip2-stage2": "lavis-blip2",
    "blip2-finetune": "lavis-blip2",
}
