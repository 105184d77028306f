"""Thin nn.Modules over blipfast.ops: the Q-Former (a drop-in for HF ``Blip2QFormerModel``) and its text
embeddings, and the BLIP-2 models built on them."""
from .blip2 import Blip2Stage1, Blip2Stage1Config, Blip2Stage1Output, QFormerLMHead
from .qformer import ImageKV, QFormer, QFormerConfig, QFormerEmbeddings, QFormerLayer, QFormerOutput

__all__ = ["Blip2Stage1", "Blip2Stage1Config", "Blip2Stage1Output", "ImageKV", "QFormer", "QFormerConfig",
           "QFormerEmbeddings", "QFormerLayer", "QFormerLMHead", "QFormerOutput"]
