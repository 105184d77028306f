"""blipfast: fast, faithful BLIP and BLIP-2 with fused Q-Former kernels.

Public API: ``blipfast.ops`` (the fused ops with their references), ``QFormerConfig`` / ``QFormer`` (a
drop-in for Hugging Face's ``Blip2QFormerModel``), ``apply_blipfast_to_blip2`` / ``revert_blipfast`` (swap
it into an HF BLIP-2 model in place), ``blipfast.convert`` (HF <-> LAVIS weights), ``blipfast.distributed``.
"""
from ._ext import build_info, cuda_extension_available
from . import ops
from .models import Blip2Retrieval, Blip2Stage1, Blip2Stage1Config, QFormer, QFormerConfig, QFormerEmbeddings
from .patch import apply_blipfast_to_blip2, revert_blipfast

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "cuda_extension_available", "__version__", "QFormer", "QFormerConfig",
           "QFormerEmbeddings", "apply_blipfast_to_blip2", "revert_blipfast", "Blip2Stage1",
           "Blip2Stage1Config", "Blip2Retrieval"]
