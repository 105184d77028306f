"""blipfast: fast, faithful BLIP and BLIP-2 with fused Q-Former kernels.

Public API: ``blipfast.ops`` (the fused ops with their references), ``QFormerConfig`` / ``QFormer`` (a
drop-in for Hugging Face's ``Blip2QFormerModel``), ``Blip2Stage1`` (BLIP-2 stage-1 pre-training in one fused
step), ``Blip2Stage2`` (stage 2: the Q-Former bridged to a frozen LLM), ``BlipTextModel`` /
``BlipTextLMHeadModel`` (drop-ins for the BLIP v1 text model and decoder), ``BlipPretrain`` /
``BlipPretrainConfig`` (BLIP v1 pre-training: ITC with momentum queues, ITM, LM), ``apply_blipfast_to_blip2`` /
``apply_blipfast_to_blip`` / ``revert_blipfast`` (swap them into HF BLIP-2, InstructBLIP and BLIP models in
place), ``blipfast.convert`` (HF <-> LAVIS and Salesforce BLIP weights), ``blipfast.distributed``.
"""
from ._ext import build_info, cuda_extension_available
from . import ops
from .models import Blip2Retrieval, Blip2Stage1, Blip2Stage1Config, QFormer, QFormerConfig, QFormerEmbeddings
from .patch import apply_blipfast_to_blip, apply_blipfast_to_blip2, revert_blipfast
from .models.blip2_stage2 import Blip2Stage2
from .models.instructblip import InstructBlipQFormer

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "cuda_extension_available", "__version__", "QFormer", "QFormerConfig",
           "QFormerEmbeddings", "apply_blipfast_to_blip2", "revert_blipfast", "Blip2Stage1", "Blip2Stage1Config",
           "Blip2Stage2", "InstructBlipQFormer", "BlipTextLMHeadModel", "BlipTextModel", "apply_blipfast_to_blip",
           "Blip2Retrieval", "BlipPretrain", "BlipPretrainConfig"]


def __getattr__(name):  # the BLIP (v1) models load transformers' modeling code: imported on first use
    if name in ("BlipTextModel", "BlipTextLMHeadModel", "BlipPretrain", "BlipPretrainConfig"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
