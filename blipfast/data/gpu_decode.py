"""Image decoding on the device, in batches, for ``blipfast cache-features --gpu-decode``: when the CPU's JPEG
decoders cannot keep up with the vision model (EVA ViT-g takes ~1,100 images/s on an H100 in bf16; one CPU core
decodes and resizes ~100-200 web JPEGs/s), the encoded bytes go to the GPU and nvJPEG decodes them there.

:class:`BatchImageDecoder` decodes a list of encoded images: JPEGs with ``torchvision.io.decode_jpeg`` on the
device (nvJPEG on CUDA, one call for the batch; on a CPU device the same call runs libjpeg-turbo, the CPU
fallback), other formats (PNG, WebP, ...) with ``torchvision.io.decode_image`` on the CPU; every image in RGB.
Then the vision model's own image processor runs on the decoded uint8 tensors where they are: transformers'
torchvision image processors (the default with torchvision installed) take tensors on any device and give the
pixels they give for the same image as a PIL image, on the CPU bit for bit. An image that does not decode is
reported and left out (as a bad sample), never a crash.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

_JPEG_MAGIC = b"\xff\xd8\xff"


def _reason(exc: BaseException) -> str:
    """torchvision's message without the C++ source location it starts with."""
    msg = (str(exc).splitlines() or [type(exc).__name__])[0]
    return msg.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1] if ".cpp:" in msg else msg


class BatchImageDecoder:
    """``decoder(datas) -> (pixel_values [n, 3, H, W] float32 on the device, kept, errors)`` for a list of
    encoded images: ``kept`` the indices of the images decoded (in order), ``errors`` ``{index: why}`` of the
    others. ``processor``: a transformers image processor with the torchvision backend."""

    def __init__(self, processor, device):
        try:
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg
            from transformers.image_processing_backends import TorchvisionBackend
        except ImportError as exc:
            raise ValueError(f"--gpu-decode needs torchvision and a transformers with torchvision image processors: "
                             f"{exc}") from None
        if not isinstance(processor, TorchvisionBackend):
            raise ValueError(f"--gpu-decode runs the vision model's image processor on the device, which needs "
                             f"transformers' torchvision backend; {type(processor).__name__} is not one (leave out "
                             f"--gpu-decode)")
        self.processor, self.device = processor, torch.device(device)
        self._mode, self._decode_image, self._decode_jpeg = ImageReadMode.RGB, decode_image, decode_jpeg

    def _jpegs(self, data: list) -> list:
        """Decoded images (or the exception) of JPEG byte tensors: one batched call, per image where it fails."""
        try:
            return list(self._decode_jpeg(data, mode=self._mode, device=self.device))
        except RuntimeError:  # one bad image fails the batch: find it
            out = []
            for d in data:
                try:
                    out.append(self._decode_jpeg(d, mode=self._mode, device=self.device))
                except RuntimeError as exc:
                    out.append(exc)
            return out

    def decode(self, datas: Sequence[bytes]) -> tuple[list, dict]:
        """(the decoded uint8 [3, H, W] images of ``datas`` that decode, on the device; ``{index: why}``)."""
        if not isinstance(datas, (list, tuple)) or not all(isinstance(d, (bytes, bytearray)) for d in datas):
            raise TypeError("BatchImageDecoder: datas must be a list of encoded images (bytes)")
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's (a follow-up)
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode(datas)

    def _decode(self, datas):
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) if len(d) else None for d in datas]
        images: list = [None] * len(datas)
        errors: dict = {}
        jpeg = [i for i, d in enumerate(datas) if bytes(d[:3]) == _JPEG_MAGIC]
        for i, img in zip(jpeg, self._jpegs([tensors[i] for i in jpeg]) if jpeg else []):
            images[i] = img
        for i in range(len(datas)):
            if i in errors or (images[i] is not None and not isinstance(images[i], Exception)):
                continue
            if isinstance(images[i], Exception):
                errors[i] = f"cannot decode the JPEG: {_reason(images[i])}"
                continue
            try:
                if tensors[i] is None:
                    raise RuntimeError("empty file")
                images[i] = self._decode_image(tensors[i], mode=self._mode).to(self.device)
            except (RuntimeError, ValueError) as exc:
                errors[i] = f"cannot decode the image: {_reason(exc)}"
        return [img for i, img in enumerate(images) if i not in errors], errors

    def __call__(self, datas: Sequence[bytes]):
        images, errors = self.decode(datas)
        kept = [i for i in range(len(datas)) if i not in errors]
        if not images:
            return None, kept, errors
        out = self.processor(images=images, return_tensors="pt", device=self.device)["pixel_values"]
        return out.float(), kept, errors
