"""``blipfast capfilt --mode blip2``: BLIP-2's caption bootstrapping (docs/blip.md), and the command's entry point.

The BLIP-2 paper's pre-training captions: for every web image, ``--num-captions`` (10) synthetic captions by nucleus
sampling from a BLIP captioner (BLIP-large in the paper; the same sampling as CapFilt: top_p 0.9, prompt "a
picture of ", repetition penalty 1.1), ranked together with the image's web caption(s) by the image-text cosine
similarity of a CLIP model (``--ranker``: a local Hugging Face ``CLIPModel`` folder with its tokenizer and image
processor, CLIP ViT-L/14 in the paper), the ``--keep`` (2) best kept; training then draws one of an image's kept
captions per visit (``blipfast train --caption-sampling random``, docs/training.md).

Rows: the scores log holds every text of an image with ``clip`` (the cosine, rounded to 1e-6), ``rank`` (0 the
best; ties keep the order web texts first, then the samples) and ``keep``; ``OUT`` one row per kept text,
``{"image", "caption", "source", "clip", "rank"}``. Everything else (batching, the per-batch seed, resume, the
settings file, unreadable images, the summary) is CapFilt's (:func:`blipfast.capfilt.drive`); the settings also
hold the mode, the ranker, ``--num-captions`` and ``--keep``. The captioner is loaded as CapFilt's
(:func:`blipfast.capfilt.load_blip`); the samples of an image come from one ``generate`` call with
``num_return_sequences``.

``blipfast capfilt`` runs :func:`run` here: ``--mode blip`` (the default) is BLIP's CapFilt
(:func:`blipfast.capfilt.run`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import capfilt
from .capfilt import BlipPart, load_blip, sample_captions, sampling

add_arguments = capfilt.add_arguments


@dataclass
class Ranker:
    """The CLIP model of ``--ranker`` (eval mode, no gradients), its tokenizer and image processor."""

    model: torch.nn.Module
    tokenizer: object
    processor: object


def load_ranker(path: str, device=None, dtype=None) -> Ranker:
    """A local Hugging Face ``CLIPModel`` folder with its tokenizer and image processor; ValueError naming
    ``--ranker`` when it is not one."""
    from transformers import AutoTokenizer, CLIPModel

    from .data.vision import load_image_processor, quiet_transformers

    if not os.path.isfile(os.path.join(str(path), "config.json")):
        raise ValueError(f"--ranker: {path!r} is not a Hugging Face model folder (no config.json); give a local "
                         f"CLIPModel folder, e.g. openai/clip-vit-large-patch14 downloaded")
    with quiet_transformers():
        try:
            model = CLIPModel.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many kinds for a folder it cannot read
            raise ValueError(f"--ranker: cannot load a CLIPModel and its tokenizer from {path!r}: {exc}") from None
    processor = load_image_processor(path, where="--ranker")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Ranker(model=model, tokenizer=tok, processor=processor)


class Bootstrap:
    """BLIP-2's bootstrapping over batches of PIL images (see the module docstring)."""

    def __init__(self, captioner: BlipPart, ranker: Ranker, *, num_captions: int = 10, keep: int = 2,
                 prompt: str = "a picture of ", top_p: float = 0.9, repetition_penalty: float = 1.1,
                 max_length: int = 20, min_length: int = 5, max_text_len=None):
        if num_captions < 1:
            raise ValueError(f"--num-captions must be >= 1, got {num_captions}")
        if keep < 1:
            raise ValueError(f"--keep must be >= 1, got {keep}")
        self.cap, self.ranker = captioner, ranker
        self.gen = sampling(captioner, top_p, repetition_penalty, max_length, min_length)
        self.prompt, self.num, self.keep = prompt, num_captions, keep
        limit = ranker.model.config.text_config.max_position_embeddings
        self.max_text_len = limit if max_text_len is None else min(max_text_len, limit)
        p = next(captioner.model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def similarity(self, images, texts: list, owner: torch.Tensor) -> torch.Tensor:
        """The CLIP cosine [N] of texts[i] with image owner[i] (float32)."""
        clip = self.ranker.model
        px = self.ranker.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        enc = self.ranker.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                    return_tensors="pt")
        img = clip.get_image_features(pixel_values=px).pooler_output.float()
        txt = clip.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                     attention_mask=enc["attention_mask"].to(self.device)).pooler_output.float()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        return (img[owner.to(self.device)] * txt).sum(-1)

    @torch.no_grad()
    def process(self, images: list, web: list) -> list:
        """Per image: [{"caption", "source", "clip", "rank", "keep"}] for its web texts (``web[i]``) and its
        ``num_captions`` samples."""
        px = self.cap.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        embeds = self.cap.model.vision_model(pixel_values=px).last_hidden_state
        samples = sample_captions(self.cap, embeds, self.prompt, self.gen, self.num)
        texts, owner, source = [], [], []
        for i, ws in enumerate(web):
            mine = [(t, "web") for t in ws] + [(t, "synthetic") for t in samples[i * self.num:(i + 1) * self.num]]
            for t, s in mine:
                texts.append(t)
                owner.append(i)
                source.append(s)
        sim = self.similarity(images, texts, torch.tensor(owner)).tolist()
        out = [[] for _ in web]
        for t, i, s, c in zip(texts, owner, source, sim):
            out[i].append({"caption": t, "source": s, "clip": round(c, 6)})
        for texts_i in out:  # rank by the rounded cosine (what the log shows), stable: web texts first on ties
            order = sorted(range(len(texts_i)), key=lambda j: -texts_i[j]["clip"])
            for r, j in enumerate(order):
                texts_i[j]["rank"] = r
                texts_i[j]["keep"] = r < self.keep
        return out


def settings(args, dtype: torch.dtype) -> dict:
    """CapFilt's settings with the mode's: what decides the rows of ``OUT``."""
    sett = capfilt.settings(args, dtype)
    del sett["filter"], sett["threshold"]
    return {"mode": "blip2", **sett, "ranker": os.path.abspath(args.ranker), "num_captions": args.num_captions,
            "keep": args.keep}


def run(args) -> int:
    """``blipfast capfilt``: BLIP's CapFilt (``--mode blip``) or BLIP-2's bootstrapping (``--mode blip2``)."""
    if getattr(args, "mode", "blip") != "blip2":
        return capfilt.run(args)
    try:
        return _run(args)
    except ValueError as exc:
        return capfilt.run_failed(exc)


def _run(args) -> int:
    from .options import resolve_device, resolve_dtype

    capfilt.check_common(args, "blip2")
    if args.keep > args.num_captions + 1:
        raise ValueError(f"--keep {args.keep} exceeds --num-captions + 1 ({args.num_captions + 1}: the samples and "
                         f"a web caption)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    def build():
        cap = load_blip(args.captioner, "captioner", args.tokenizer, device, dtype)
        return Bootstrap(cap, load_ranker(args.ranker, device, dtype), num_captions=args.num_captions,
                         keep=args.keep, prompt=args.prompt, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, max_length=args.max_length,
                         min_length=args.min_length, max_text_len=args.max_text_len)

    return capfilt.drive(args, settings(args, dtype), build, {"num_captions": args.num_captions, "keep": args.keep},
                         {"captioner": args.captioner, "ranker": args.ranker})
