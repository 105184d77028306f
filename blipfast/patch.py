"""Swap the Q-Former inside a Hugging Face BLIP-2 model for :class:`blipfast.QFormer`, in place.

``apply_blipfast_to_blip2(model)`` replaces ``model.qformer`` (a ``Blip2QFormerModel``) with a QFormer that
holds the very same ``nn.Parameter`` objects, so an optimizer built before the swap keeps training the
weights, checkpoints keep their keys, and ``revert_blipfast(model)`` puts the original module back with
whatever the weights became. Works for every HF class with a ``qformer`` attribute
(``Blip2Model``, ``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``, ...), and for InstructBLIP
(``InstructBlipForConditionalGeneration``: its ``InstructBlipQFormerModel`` becomes an
:class:`blipfast.models.instructblip.InstructBlipQFormer`).
"""
from __future__ import annotations

import torch.nn as nn

from .models.instructblip import InstructBlipQFormer
from .models.qformer import QFormer

_ORIGINAL = "_blipfast_original_qformer"


def _share_parameters(dst: nn.Module, src: nn.Module) -> None:
    src_params = dict(src.named_parameters())
    dst_names = {n for n, _ in dst.named_parameters()}
    if dst_names != set(src_params):
        missing, extra = sorted(set(src_params) - dst_names), sorted(dst_names - set(src_params))
        raise ValueError(f"apply_blipfast_to_blip2: parameter names differ (HF only: {missing[:5]}, "
                         f"blipfast only: {extra[:5]})")
    for name, p in src_params.items():
        *path, leaf = name.split(".")
        mod = dst
        for part in path:
            mod = getattr(mod, part)
        setattr(mod, leaf, p)


def _is_instructblip(qformer: nn.Module) -> bool:
    from transformers import InstructBlipQFormerModel

    return isinstance(qformer, InstructBlipQFormerModel)


def apply_blipfast_to_blip2(model: nn.Module) -> nn.Module:
    """Replace ``model.qformer`` with a blipfast QFormer sharing its parameters; returns ``model``."""
    qformer = getattr(model, "qformer", None)
    if qformer is None:
        raise TypeError(f"apply_blipfast_to_blip2: {type(model).__name__} has no `qformer` attribute")
    if isinstance(qformer, (QFormer, InstructBlipQFormer)):
        return model  # already patched
    fast = (InstructBlipQFormer if _is_instructblip(qformer) else QFormer)(qformer.config, init_weights=False)
    _share_parameters(fast, qformer)
    fast.train(qformer.training)
    object.__setattr__(model, _ORIGINAL, qformer)  # not a submodule: no duplicate keys in state_dict
    model.qformer = fast
    return model


def revert_blipfast(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_blipfast_to_blip2` (the original module sees the trained parameters)."""
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is None:
        raise ValueError("revert_blipfast: the model was not patched by apply_blipfast_to_blip2")
    original.train(model.qformer.training)
    model.qformer = original
    return model
