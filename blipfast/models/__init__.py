"""Thin nn.Modules over blipfast.ops: the Q-Former (a drop-in for HF ``Blip2QFormerModel``) and its text
embeddings; the stage-1/stage-2/retrieval models build on them."""
from .qformer import ImageKV, QFormer, QFormerConfig, QFormerEmbeddings, QFormerLayer, QFormerOutput

__all__ = ["ImageKV", "QFormer", "QFormerConfig", "QFormerEmbeddings", "QFormerLayer", "QFormerOutput"]
