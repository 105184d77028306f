"""Swap the fused blipfast modules into Hugging Face BLIP / BLIP-2 models, in place.

``apply_blipfast_to_blip2(model)`` replaces ``model.qformer`` (a ``Blip2QFormerModel``, or InstructBLIP's
``InstructBlipQFormerModel``) with a :class:`blipfast.QFormer` (:class:`blipfast.InstructBlipQFormer`);
``apply_blipfast_to_blip(model)`` replaces ``model.text_encoder`` / ``model.text_decoder`` of an HF BLIP (v1) model
with :class:`blipfast.BlipTextModel` / :class:`blipfast.BlipTextLMHeadModel`; ``revert_blipfast(model)`` puts the
original modules back. The new modules hold the very same ``nn.Parameter`` objects (see
:mod:`blipfast.models.hf_swap`, where they live: the model layer uses them too).
"""
from .models.hf_swap import apply_blipfast_to_blip, apply_blipfast_to_blip2, revert_blipfast

__all__ = ["apply_blipfast_to_blip", "apply_blipfast_to_blip2", "revert_blipfast"]
