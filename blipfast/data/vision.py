"""The frozen vision encoder of stage 1: a local Hugging Face vision tower and its own image processor.

:func:`load_vision_tower` reads a local model folder: a vision model saved on its own (``Blip2VisionModel``,
``CLIPVisionModel``, ``SiglipVisionModel``, ... - the class named in ``config.json``'s ``architectures``), the
vision tower of a composite BLIP-2 / InstructBLIP / BLIP / CLIP / SigLIP checkpoint (only the ``vision_model.*``
weights are read), or any tower ``AutoModel`` loads (ViT, DINOv2, ...).

:class:`VisionTower` returns the tokens that stage 1's ``ln_vision`` takes: the output of the tower's last
encoder layer BEFORE any final LayerNorm. HF ``Blip2VisionModel`` applies its ``post_layernorm`` (which *is*
BLIP-2's ``ln_vision``) to ``last_hidden_state``, SigLIP, ViT and DINOv2 apply their final norm there too, while
CLIP's ``last_hidden_state`` is already pre-norm; the encoder's own output (``hidden_states[-1]``) is the same
quantity for all of them. It is read from the tower's ``encoder`` submodule with a forward hook (no list of
every layer's hidden states is kept); a tower without one falls back to ``output_hidden_states=True``.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
import torch.nn as nn

# model_type of a composite config -> (vision model class in transformers, key prefix of its weights)
_COMPOSITE = {
    "blip-2": ("Blip2VisionModel", "vision_model."),
    "instructblip": ("InstructBlipVisionModel", "vision_model."),
    "blip": ("BlipVisionModel", "vision_model."),
    "clip": ("CLIPVisionModel", "vision_model."),
    "siglip": ("SiglipVisionModel", "vision_model."),
    "siglip2": ("Siglip2VisionModel", "vision_model."),
}


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load/save progress bars and notices (e.g. the slow image processor fallback) off."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class ImageReadError(ValueError):
    """An image file that cannot be opened or decoded."""


def load_image(path: str):
    """The RGB PIL image at ``path``; :class:`ImageReadError` naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageReadError(f"cannot read image {path!r}: {type(exc).__name__}: {exc}") from None


class VisionTower(nn.Module):
    """A frozen HF vision model whose forward returns its pre-final-LayerNorm tokens [B, N, width]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.width = int(getattr(cfg, "hidden_size", 0) or 0)
        encoders = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] == "encoder"]
        self._box: list = []
        if encoders:  # the encoder's output, caught by a hook registered once (also traced by torch.compile)
            enc = min(encoders, key=lambda e: e[0].count("."))[1]
            enc.register_forward_hook(self._catch)
        self._hooked = bool(encoders)

    def _catch(self, _mod, _inp, out):
        self._box.append(out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state)

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout, as LAVIS' frozen ViT)
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self._hooked:
            return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        self._box.clear()
        self.model(pixel_values=pixel_values)
        return self._box.pop()


def _load_prefixed(model: nn.Module, folder: str, prefix: str) -> None:
    """Load the ``prefix``-ed tensors of a (sharded) checkpoint folder into ``model`` (every key accounted for;
    a safetensors checkpoint reads no other tensor)."""
    from .. import convert

    convert.load_into(model, folder, prefix=prefix, what="--vision", into=f"{type(model).__name__} ({prefix}*)")


def load_vision_tower(path: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
    """(VisionTower, image processor) of the local model folder ``path``; see the module docstring."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"--vision: {path!r} is not a folder (a local Hugging Face vision model folder)")
    with quiet_transformers():
        return _load(path, device, dtype)


def _load(path, device, dtype):
    import transformers
    from transformers import AutoConfig, AutoModel

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"--vision: cannot read the model config in {path!r}: {exc}") from None
    archs = list(getattr(cfg, "architectures", None) or [])
    try:
        if archs and archs[0].endswith("VisionModel") and hasattr(transformers, archs[0]):
            model = getattr(transformers, archs[0]).from_pretrained(path)
        elif cfg.model_type in _COMPOSITE and getattr(cfg, "vision_config", None) is not None:
            cls_name, prefix = _COMPOSITE[cfg.model_type]
            model = getattr(transformers, cls_name)(cfg.vision_config)
            _load_prefixed(model, path, prefix)
        else:
            model = AutoModel.from_pretrained(path)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"--vision: cannot load a vision model from {path!r} ({type(exc).__name__}: {exc})") from None
    processor = load_image_processor(path, where="--vision")
    tower = VisionTower(model)
    if tower.width <= 0:
        raise ValueError(f"--vision: cannot tell the hidden size of {type(model).__name__} (config.hidden_size)")
    if device is not None or dtype is not None:
        tower = tower.to(device=device, dtype=dtype)
    return tower, processor


def preprocess(processor, image) -> torch.Tensor:
    """pixel_values [3, H, W] (float32) of one PIL image through the model's own image processor."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0].float()


def describe(path: str) -> dict:
    """What identifies a vision model folder for the feature cache: its config and processor config."""
    out = {"path": os.path.abspath(path)}
    for name in ("config.json", "preprocessor_config.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as fh:
                out[name] = json.load(fh)
    return out


def load_image_processor(path, *, where: str = "--model", backend: str = "pil"):
    """The image processor of a local folder (its ``preprocessor_config.json``) on transformers' PIL backend.

    The references (LAVIS, Salesforce BLIP) resize PIL images with torchvision's transforms, that is with PIL's
    own resampling; transformers' default backend, once torchvision is installed, resizes tensors instead, which
    gives other pixels (up to 0.015 after normalisation at 224 px, enough to change a beam search). Every loader of
    blipfast reads processors through this one function, so that the same folder gives the same pixels in
    training, feature caching, generation and evaluation, with or without torchvision. A processor type without a
    PIL backend is loaded on its default one. ``backend="torchvision"``: the tensor backend, for the processors
    that run on the device (``cache-features --gpu-decode``). Raises ValueError naming ``where`` when the folder
    has no usable processor config."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    with quiet_transformers():
        try:
            try:
                return AutoImageProcessor.from_pretrained(path, backend=backend)
            except (ValueError, KeyError, TypeError):  # no such backend for this processor type
                if backend != "pil":
                    raise
                return AutoImageProcessor.from_pretrained(path)
        except Exception as exc:  # transformers raises many kinds for a missing or broken config
            raise ValueError(f"{where}: {str(path)!r} has no usable image processor config "
                             f"(preprocessor_config.json): {exc}") from None


def default_blip_processor(size: int):
    """BLIP's evaluation transform (LAVIS' ``blip_image_eval``, BLIP's ``transform_test``) as an HF image processor:
    RGB, PIL's bicubic resize to size x size, [0, 1], CLIP's mean/std. transformers' PIL backend
    (``BlipImageProcessorPil``, where transformers has one) resizes with PIL as BLIP's torchvision transforms do on PIL
    images; its default backend with torchvision installed resizes tensors, which need not give the same pixels."""
    import transformers

    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    with quiet_transformers():
        return cls(size={"height": size, "width": size})


def load_blip_vision(path: str):
    """(BlipVisionModel, image processor) of a local folder, trainable (BLIP v1 trains its ViT): a
    ``BlipVisionModel`` or any BLIP (v1) checkpoint folder (``BlipForConditionalGeneration``,
    ``BlipForImageTextRetrieval``, ...: its ``vision_model.*`` weights). Without a ``preprocessor_config.json``
    the processor is :func:`default_blip_processor` at the ViT's size."""
    from transformers import AutoConfig, BlipVisionModel

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"--vision: {path!r} is not a folder (a local BlipVisionModel or BLIP model folder)")
    with quiet_transformers():
        try:
            cfg = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise ValueError(f"--vision: cannot read the model config in {path!r}: {exc}") from None
        if cfg.model_type == "blip_vision_model":
            model = BlipVisionModel.from_pretrained(path)
        elif cfg.model_type == "blip":
            model = BlipVisionModel(cfg.vision_config)
            _load_prefixed(model, path, "vision_model.")
        else:
            raise ValueError(f"--vision: BLIP trains its own ViT, a BlipVisionModel; {path!r} holds a "
                             f"{cfg.model_type!r} model (give a BlipVisionModel or BLIP folder, or none: a fresh ViT "
                             f"of the preset)")
        has_processor = os.path.isfile(os.path.join(path, "preprocessor_config.json"))
    processor = load_image_processor(path, where="--vision") if has_processor else None
    return model, processor or default_blip_processor(model.config.image_size)
