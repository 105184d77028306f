"""Thin nn.Modules over blipfast.ops: the Q-Former (a drop-in for HF ``Blip2QFormerModel``) and its text
embeddings, the BLIP-2 models built on them, and the BLIP (v1) text model (MED, drop-ins for HF
``BlipTextModel`` / ``BlipTextLMHeadModel``) and the BLIP models built on it (``BlipPretrain``, ``BlipRetrieval``,
``BlipCaptioner``, ``BlipVQA``, ``BlipNLVR``, ``BlipVisDial``).

The BLIP names are imported on first use (``blipfast.models.blip`` pulls in transformers' modeling and
generation code, seconds of import time that BLIP-2-only users should not pay)."""
from .blip2 import Blip2Stage1, Blip2Stage1Config, Blip2Stage1Output, QFormerLMHead
from .blip2_retrieval import Blip2Features, Blip2Retrieval
from .layers import ImageKV
from .qformer import QFormer, QFormerConfig, QFormerEmbeddings, QFormerLayer, QFormerOutput

_BLIP = ("BlipTextLMHeadModel", "BlipTextModel", "blip_text_config", "share_encoder_decoder")
_BLIP_PRETRAIN = ("BlipPretrain", "BlipPretrainConfig", "BlipPretrainOutput")
_BLIP_FINETUNE = {"BlipRetrieval": "blip_retrieval", "BlipRetrievalConfig": "blip_retrieval",
                  "BlipRetrievalOutput": "blip_retrieval", "BlipCaptioner": "blip_caption",
                  "BlipCaptionConfig": "blip_caption", "BlipVQA": "blip_vqa", "BlipVQAConfig": "blip_vqa",
                  "BlipNLVR": "blip_nlvr", "BlipNLVRConfig": "blip_nlvr", "BlipVisDial": "blip_visdial",
                  "BlipVisDialConfig": "blip_visdial"}

__all__ = ["Blip2Features", "Blip2Retrieval", "Blip2Stage1", "Blip2Stage1Config", "Blip2Stage1Output", "ImageKV",
           "QFormer", "QFormerConfig", "QFormerEmbeddings", "QFormerLayer", "QFormerLMHead", "QFormerOutput", *_BLIP, *_BLIP_PRETRAIN, *_BLIP_FINETUNE]


def __getattr__(name):
    if name in _BLIP:
        from . import blip

        return getattr(blip, name)
    if name in _BLIP_PRETRAIN:
        from . import blip_pretrain

        return getattr(blip_pretrain, name)
    if name in _BLIP_FINETUNE:
        import importlib

        return getattr(importlib.import_module(f".{_BLIP_FINETUNE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
