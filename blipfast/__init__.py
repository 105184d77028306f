"""blipfast: fast, faithful BLIP and BLIP-2 with fused Q-Former kernels.

Public API: ``blipfast.ops`` (the fused ops with their references), ``QFormerConfig`` / ``QFormer`` (a
drop-in for Hugging Face's ``Blip2QFormerModel``), ``Blip2Stage1`` (BLIP-2 stage-1 pre-training in one fused
step), ``Blip2Stage2`` (stage 2: the Q-Former bridged to a frozen LLM), ``BlipTextModel`` /
``BlipTextLMHeadModel`` (drop-ins for the BLIP v1 text model and decoder), ``BlipPretrain`` /
``BlipPretrainConfig`` (BLIP v1 pre-training: ITC with momentum queues, ITM, LM), ``BlipRetrieval`` /
``BlipCaptioner``, ``BlipVQA``, ``BlipNLVR``, ``BlipVisDial`` (BLIP v1's downstream task models: fine-tuning and
inference), ``apply_blipfast_to_blip2`` /
``apply_blipfast_to_blip`` / ``revert_blipfast`` (swap them into HF BLIP-2, InstructBLIP and BLIP models in
place), ``blipfast.convert`` (HF <-> LAVIS and Salesforce BLIP weights), ``blipfast.distributed``.

``import blipfast`` (and ``import blipfast.ops``) imports torch, and Triton where it is installed, only: the models
and the patch, which import transformers, load on first use of one of their names.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ._ext import build_info, cuda_extension_available
from . import ops

# the models and the patch import transformers (seconds): each name is imported from its module on first use
_LAZY = {
    **dict.fromkeys(("Blip2Retrieval", "Blip2Stage1", "Blip2Stage1Config", "QFormer", "QFormerConfig",
                     "QFormerEmbeddings", "BlipTextLMHeadModel", "BlipTextModel", "BlipPretrain",
                     "BlipPretrainConfig"), ".models"),
    **dict.fromkeys(("apply_blipfast_to_blip", "apply_blipfast_to_blip2", "revert_blipfast"), ".patch"),
    "Blip2Stage2": ".models.blip2_stage2",
    "InstructBlipQFormer": ".models.instructblip",
    **dict.fromkeys(("BlipRetrieval", "BlipRetrievalConfig"), ".models.blip_retrieval"),
    **dict.fromkeys(("BlipCaptioner", "BlipCaptionConfig"), ".models.blip_caption"),
    **dict.fromkeys(("BlipVQA", "BlipVQAConfig"), ".models.blip_vqa"),
    **dict.fromkeys(("BlipNLVR", "BlipNLVRConfig"), ".models.blip_nlvr"),
    **dict.fromkeys(("BlipVisDial", "BlipVisDialConfig"), ".models.blip_visdial"),
}

__version__ = "0.1.0"

from . import selftest as _selftest  # noqa: E402,F401  (installs the first-use check of the fused kernels)

__all__ = ["ops", "build_info", "cuda_extension_available", "__version__", "QFormer", "QFormerConfig",
           "QFormerEmbeddings", "apply_blipfast_to_blip2", "revert_blipfast", "Blip2Stage1", "Blip2Stage1Config",
           "Blip2Stage2", "InstructBlipQFormer", "BlipTextLMHeadModel", "BlipTextModel", "apply_blipfast_to_blip",
           "Blip2Retrieval", "BlipPretrain", "BlipPretrainConfig", "BlipRetrieval", "BlipRetrievalConfig",
           "BlipCaptioner", "BlipCaptionConfig", "BlipVQA", "BlipVQAConfig", "BlipNLVR", "BlipNLVRConfig",
           "BlipVisDial", "BlipVisDialConfig"]


def __getattr__(name):
    """The lazily imported public names (``_LAZY``) and the subpackages (``blipfast.models`` etc.) on first use."""
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
    elif not name.startswith("_") and any(m.name == name for m in _pkgutil.iter_modules(__path__)):
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
