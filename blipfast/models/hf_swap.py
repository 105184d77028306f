"""Swap the fused blipfast modules into Hugging Face BLIP / BLIP-2 models, in place (public as
:mod:`blipfast.patch`; here, in the model layer, so that models such as :class:`blipfast.Blip2Stage2` use it).

``apply_blipfast_to_blip2(model)`` replaces ``model.qformer`` (a ``Blip2QFormerModel``) with a
:class:`blipfast.QFormer`; ``apply_blipfast_to_blip(model)`` replaces ``model.text_encoder`` (a
``BlipTextModel``) and ``model.text_decoder`` (a ``BlipTextLMHeadModel``), whichever exist, with
:class:`blipfast.BlipTextModel` / :class:`blipfast.BlipTextLMHeadModel`. The new modules hold the very same
``nn.Parameter`` objects (tied weights stay tied), so an optimizer built before the swap keeps training the
weights, checkpoints keep their keys, and ``revert_blipfast(model)`` puts the original modules back with whatever
the weights became. Works for every HF class with those attributes (``Blip2Model``,
``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``; ``BlipForImageTextRetrieval``,
``BlipForConditionalGeneration``, ``BlipForQuestionAnswering``), and InstructBLIP
(``InstructBlipForConditionalGeneration``: its ``InstructBlipQFormerModel`` becomes an
:class:`blipfast.models.instructblip.InstructBlipQFormer`).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .instructblip import InstructBlipQFormer
from .qformer import QFormer

_ORIGINAL = "_blipfast_original_qformer"
_ORIGINAL_BLIP = "_blipfast_original_blip_text"


def _share_parameters(dst: nn.Module, src: nn.Module, who: str = "apply_blipfast_to_blip2") -> None:
    """Make every parameter path of ``dst`` hold ``src``'s Parameter at the same path (duplicates included, so
    that weights tied in ``src`` are tied in ``dst``)."""
    src_params = dict(src.named_parameters(remove_duplicate=False))
    dst_names = {n for n, _ in dst.named_parameters(remove_duplicate=False)}
    if dst_names != set(src_params):
        missing, extra = sorted(set(src_params) - dst_names), sorted(dst_names - set(src_params))
        raise ValueError(f"{who}: parameter names differ (HF only: {missing[:5]}, blipfast only: {extra[:5]})")
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


def _fast_text_module(orig: nn.Module) -> nn.Module:
    """The blipfast twin of an HF BlipTextModel / BlipTextLMHeadModel, built on "meta" and then given the HF
    module's own Parameters (no weight is copied or allocated)."""
    from .blip import BlipTextLMHeadModel, BlipTextModel

    with torch.device("meta"):
        if hasattr(orig, "bert") and hasattr(orig, "cls"):
            fast = BlipTextLMHeadModel(orig.config)
        else:
            fast = BlipTextModel(orig.config, add_pooling_layer=getattr(orig, "pooler", None) is not None,
                                 init_weights=False)
    _share_parameters(fast, orig, "apply_blipfast_to_blip")
    if isinstance(fast, BlipTextLMHeadModel):
        fast.generation_config = copy.deepcopy(orig.generation_config)
    return fast.train(orig.training)


def apply_blipfast_to_blip(model: nn.Module) -> nn.Module:
    """Replace ``model.text_encoder`` / ``model.text_decoder`` of an HF BLIP (v1) model with blipfast's
    BlipTextModel / BlipTextLMHeadModel sharing their parameters; returns ``model``."""
    from .blip import BlipTextLMHeadModel, BlipTextModel

    names = [n for n in ("text_encoder", "text_decoder") if isinstance(getattr(model, n, None), nn.Module)]
    if not names:
        raise TypeError(f"apply_blipfast_to_blip: {type(model).__name__} has no `text_encoder` or `text_decoder`")
    if any(isinstance(getattr(model, n), (BlipTextModel, BlipTextLMHeadModel)) for n in names):
        return model  # already patched
    fast = {n: _fast_text_module(getattr(model, n)) for n in names}
    object.__setattr__(model, _ORIGINAL_BLIP, {n: getattr(model, n) for n in names})  # not submodules
    for n, module in fast.items():
        setattr(model, n, module)
    return model


def revert_blipfast(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_blipfast_to_blip2` / :func:`apply_blipfast_to_blip` (the original modules see the
    trained parameters and the current training flag)."""
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is not None:
        original.train(model.qformer.training)
        model.qformer = original
        return model
    originals = model.__dict__.pop(_ORIGINAL_BLIP, None)
    if originals is None:
        raise ValueError("revert_blipfast: the model was not patched by apply_blipfast_to_blip2 or "
                         "apply_blipfast_to_blip")
    for n, module in originals.items():
        module.train(getattr(model, n).training)
        setattr(model, n, module)
    return model
