"""blipfast: fast, faithful BLIP and BLIP-2 with fused Q-Former kernels.

Public API: ``blipfast.ops`` (the fused ops with their references), ``QFormerConfig`` / ``QFormer`` (a
drop-in for Hugging Face's ``Blip2QFormerModel``), ``apply_blipfast_to_blip2`` / ``revert_blipfast`` (swap
it into an HF BLIP-2 or InstructBLIP model in place), ``Blip2Stage2`` (stage 2: the Q-Former bridged to a frozen
LLM), ``blipfast.convert`` (HF <-> LAVIS weights), ``blipfast.distributed``.
"""
from ._ext import build_info, cuda_extension_available
from . import ops
from .models import Blip2Stage1, Blip2Stage1Config, QFormer, QFormerConfig, QFormerEmbeddings
from .patch import apply_blipfast_to_blip2, revert_blipfast
from .models.blip2_stage2 import Blip2Stage2
from .models.instructblip import InstructBlipQFormer

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "cuda_extension_available", "__version__", "QFormer", "QFormerConfig",
           "QFormerEmbeddings", "apply_blipfast_to_blip2", "revert_blipfast", "Blip2Stage1",
           "Blip2Stage1Config", "Blip2Stage2", "InstructBlipQFormer"]
