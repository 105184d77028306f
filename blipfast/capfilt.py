"""``blipfast capfilt``: BLIP's CapFilt (docs/semantics.md#capfilt), caption-and-filter bootstrapping of a web dataset.

For every image of a web annotation file (rows ``{"image": path under --images, "caption": text or [texts]}``):

1. the captioner (BLIP's image-grounded decoder) writes one synthetic caption by nucleus sampling (top_p 0.9,
   prompt "a picture of ", repetition penalty 1.1, as BLIP's ``generate(sample=True)``; the prompt is cut from
   the text);
2. the filter (BLIP's image-grounded encoder with its ITM head) scores each web caption and the synthetic one:
   p(match) = softmax(itm_head(h[ENC]))[1], the text starting with [ENC] as in BLIP (transformers' ITM uses [CLS]);
3. every text with p(match) >= ``--threshold`` (0.5) is kept.

(``--mode blip2``, BLIP-2's bootstrapping, is :mod:`blipfast.capfilt_blip2`, which reuses this module's loader,
sampling and batched resumable loop, :func:`drive`.)

Output: ``OUT`` holds one JSONL row per kept text, ``{"image", "caption", "source": "web"|"synthetic", "itm"}``
(``image`` relative to ``--images``, so ``blipfast train --data OUT --images DIR`` reads it); ``<OUT stem>.scores
.jsonl`` one row per processed image with every text, its score and the decision; ``<OUT stem>.summary.json`` the
counts (images, kept/removed per source, unreadable images). Both models are Hugging Face BLIP models
(``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``) with blipfast's text model swapped in
(``apply_blipfast_to_blip``) and SDPA attention in the ViT; the filter computes every image's cross-attention K/V
once and shares it across the image's texts (``kv_index``); when captioner and filter are the same checkpoint
the ViT runs once per image.

Batched (``--batch-size`` images), with a tqdm bar. Resumable: a batch is appended to the scores log in one write
(then to ``OUT``); a new invocation drops a partial last line, skips the images the log holds and rewrites
``OUT`` from the log, so a crash never leaves a half-written row. The synthetic captions are drawn with a seed per
batch of the input order (``--seed``), so a resumed run writes what an uninterrupted one writes (same
``--batch-size``). The settings that decide the rows (models, threshold, sampling, batch size, seed, dtype) are
kept in ``<OUT stem>.settings.json``; a resume with other settings is refused (``--restart`` starts OUT again), so
one output never mixes two settings' decisions. Unreadable images are reported and skipped (and retried by the
next invocation).

Checkpoints (``--captioner`` / ``--filter``): a local HF BLIP model folder (its tokenizer and image processor
with it), a ``blipfast train --model blip`` run folder (or one of its ``checkpoint-*`` folders: the pre-trained
decoder captions, the encoder and ITM head filter), or a Salesforce BLIP ``.pth`` (pre-training, captioning,
retrieval or ITM checkpoints, through ``blipfast.convert``; sizes read from the weights; ``--tokenizer`` gives
the BERT tokenizer, to which [DEC] and [ENC] are added as BLIP does).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .files import append_lines, check_settings, read_jsonl_rows
from .options import EXIT_OK, EXIT_USAGE, add_device_argument, add_dtype_argument, resolve_device, resolve_dtype


def add_arguments(p) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--data", required=True, help="web annotation file: JSONL or a JSON list of {'image': path "
                   "relative to --images, 'caption': text or list of texts}")
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--captioner", required=True, help="captioning model: HF BLIP folder, blipfast run folder or "
                   "Salesforce BLIP .pth")
    p.add_argument("--filter", help="ITM filter model (--mode blip): HF BLIP folder, blipfast run folder or "
                   "Salesforce BLIP .pth")
    p.add_argument("--mode", choices=("blip", "blip2"), default="blip", help="blip: BLIP's CapFilt (one synthetic "
                   "caption, every text the ITM filter matches kept); blip2: BLIP-2's bootstrapping (--num-captions "
                   "synthetic captions ranked with the web texts by the CLIP model of --ranker, the top --keep kept; "
                   "docs/blip.md)")
    p.add_argument("--ranker", help="--mode blip2: local Hugging Face CLIPModel folder (e.g. CLIP ViT-L/14) with its "
                   "tokenizer and image processor")
    p.add_argument("--num-captions", type=int, help="--mode blip2: synthetic captions per image (default 10)")
    p.add_argument("--keep", type=int, help="--mode blip2: texts kept per image, the best ranked (default 2)")
    p.add_argument("--out", required=True, help="output JSONL of the kept texts (the scores log and the summary go "
                   "beside it)")
    p.add_argument("--tokenizer", help="local BERT tokenizer folder (needed for .pth checkpoints; default: the "
                   "model folder's or the run's)")
    p.add_argument("--threshold", type=float, help="--mode blip: keep a text when its p(match) >= this (default 0.5)")
    p.add_argument("--prompt", default="a picture of ", help="captioning prompt (default: 'a picture of ')")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="default 1.1, as BLIP's sampling")
    p.add_argument("--max-length", type=int, default=20, help="caption length in tokens with the prompt (default 20)")
    p.add_argument("--min-length", type=int, default=5, help="default 5")
    p.add_argument("--max-text-len", type=int, help="tokens of a scored text (default: BLIP's ITM 35; --mode blip2: "
                   "the ranker's context, CLIP's 77)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (per batch; default 0)")
    p.add_argument("--max-images", type=int, help="stop after this many images in this invocation (whole batches; "
                   "run again to continue)")
    add_device_argument(p)
    add_dtype_argument(p, "model dtype")
    p.add_argument("--restart", action="store_true", help="start OUT again (OUT, its scores log, summary and "
                   "settings are deleted) instead of continuing it; a run that continues OUT must use the settings it "
                   "was started with")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


# ----------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class BlipPart:
    """One model of the pipeline: the HF model (blipfast text model swapped in), its tokenizer, its image processor,
    and ``source`` (the resolved checkpoint, to tell whether captioner and filter share their ViT)."""

    model: torch.nn.Module
    tokenizer: object
    processor: object
    source: str

    @property
    def enc_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("[ENC]")


def _tokenizer(path: str, where: str):
    from .data.tokenizer import add_enc_token, load_tokenizer

    try:
        return add_enc_token(load_tokenizer(path))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _from_run(src, where: str):
    """(HF-named state dict, BlipPretrainConfig, tokenizer, processor) of a ``blipfast train --model blip`` run (a
    resolved :class:`blipfast.convert.Source` of kind "run" or "checkpoint")."""
    from . import convert
    from .data.vision import default_blip_processor, load_image_processor
    from .models.blip_pretrain import BlipPretrain, BlipPretrainConfig

    if src.run_config is None:
        raise ValueError(f"{where}: {src.path!r} is a checkpoint folder without its run's config.yaml beside it")
    model = src.run_config.get("model") or {}
    if model.get("name") != "blip":
        raise ValueError(f"{where}: {src.run_dir!r} is a BLIP-2 run; capfilt needs BLIP (v1) models (blipfast train "
                         f"--model blip, an HF BLIP folder or a Salesforce BLIP .pth)")
    mcfg = BlipPretrainConfig(**{k: v for k, v in model.items() if k != "name"})
    net = BlipPretrain(mcfg)
    convert.load_into(net, src, what=where, into="the run's model")
    proc_dir = os.path.join(src.run_dir, "image_processor")
    processor = load_image_processor(proc_dir, where=where) if os.path.isdir(proc_dir) else \
        default_blip_processor(mcfg.vision.image_size)
    return net.state_dict(), mcfg, _tokenizer(src.run_config["tokenizer"], where), processor


def _layers(sd, prefix: str) -> int:
    n = len(prefix)
    return 1 + max(int(k[n:].split(".")[0]) for k in sd if k.startswith(prefix))


def _infer_configs(sd: dict, role: str, tok, where: str):
    """(BlipTextConfig, BlipVisionConfig, embed_dim) from the shapes of a converted Salesforce checkpoint (heads of
    64, timm's ViT LayerNorm eps 1e-6, BERT's 1e-12)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    text = "text_decoder.bert." if role == "captioner" else "text_encoder."
    need = ["vision_model.embeddings.class_embedding", text + "embeddings.word_embeddings.weight"]
    if role == "filter":
        need.append("itm_head.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        what = "a captioning (text_decoder) model" if role == "captioner" else "an ITM (text_encoder, itm_head) model"
        raise ValueError(f"{where}: the checkpoint is not {what}: it lacks {missing}")
    v = "vision_model."
    hidden = sd[v + "embeddings.class_embedding"].shape[-1]
    patch = sd[v + "embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((sd[v + "embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision = BlipVisionConfig(hidden_size=hidden, intermediate_size=sd[v + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=_layers(sd, v + "encoder.layers."), num_attention_heads=hidden // 64,
                              image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6)
    words = sd[text + "embeddings.word_embeddings.weight"]
    th = words.shape[1]
    textc = BlipTextConfig(vocab_size=words.shape[0], hidden_size=th, num_attention_heads=th // 64,
                           num_hidden_layers=_layers(sd, text + "encoder.layer."),
                           intermediate_size=sd[text + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                           max_position_embeddings=sd[text + "embeddings.position_embeddings.weight"].shape[0],
                           encoder_hidden_size=sd[text + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
                           bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
                           pad_token_id=tok.pad_token_id)
    embed = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    return textc, vision, embed


def _hf_model(role: str, text, vision, embed_dim: int, sd: dict, where: str):
    """The HF BLIP model of ``role`` filled from an HF-named state dict (every weight must be there)."""
    import torch.nn as nn
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from . import convert
    from .data.vision import quiet_transformers

    cfg = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=embed_dim)
    with quiet_transformers():
        model = (BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval)(cfg)
    if role == "captioner":  # BLIP pre-training leaves the LM head with a weight of its own: keep it so
        w, e = "text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"
        if w in sd and e in sd and not torch.equal(sd[w], sd[e]):
            head = model.text_decoder.cls.predictions.decoder
            head.weight = nn.Parameter(head.weight.detach().clone())
    own = model.state_dict()
    convert.load_into(model, {k: v for k, v in sd.items() if k in own}, what=where, into=f"the {role}")
    return model


def load_blip(path: str, role: str, tokenizer: Optional[str] = None, device=None, dtype=None) -> BlipPart:
    """The ``role`` ("captioner" or "filter") model of a checkpoint (see the module docstring), in eval mode on
    ``device`` in ``dtype``, with blipfast's text model and the ViT's SDPA attention."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from . import convert
    from .data.vision import default_blip_processor, load_image_processor, quiet_transformers
    from .models.blip_vision import fuse_vision_model
    from .patch import apply_blipfast_to_blip

    where = f"--{role}"
    src = convert.resolve_source(path, what=where)
    if src.kind in ("run", "checkpoint"):
        sd, mcfg, tok, processor = _from_run(src, where)
        if tokenizer is not None:
            tok = _tokenizer(tokenizer, "--tokenizer")
        model = _hf_model(role, mcfg.text, mcfg.vision, mcfg.embed_dim, sd, where)
        source = src.checkpoint
    elif src.kind == "hf":
        cls = BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval
        with quiet_transformers():
            try:
                model = cls.from_pretrained(path)
                processor = load_image_processor(path, where=where)
            except Exception as exc:  # transformers raises many kinds for a folder it cannot read
                raise ValueError(f"{where}: cannot load a {cls.__name__} from {path!r}: {exc}") from None
        tok = _tokenizer(tokenizer or path, "--tokenizer" if tokenizer else where)
        source = src.path
    elif os.path.isfile(src.weights):
        if tokenizer is None:
            raise ValueError(f"{where}: {path!r} is a checkpoint file; give --tokenizer (a local BERT tokenizer "
                             f"folder, e.g. bert-base-uncased: BLIP adds [DEC] and [ENC] to it)")
        try:
            sd = convert.load_checkpoint(src.weights, to="hf").state_dict
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        tok = _tokenizer(tokenizer, "--tokenizer")
        text, vision, embed = _infer_configs(sd, role, tok, where)
        model = _hf_model(role, text, vision, embed, sd, where)
        processor = default_blip_processor(vision.image_size)
        source = src.path
    else:
        raise ValueError(f"{where}: {path!r} is neither an HF BLIP folder (config.json), a blipfast train run nor a "
                         f"checkpoint file")
    cfg = model.config.text_config
    enc = tok.convert_tokens_to_ids("[ENC]")
    if role == "filter" and not 0 <= enc < cfg.vocab_size:
        raise ValueError(f"{where}: the tokenizer's [ENC] ({enc}) is outside the model's vocabulary ({cfg.vocab_size})")
    apply_blipfast_to_blip(model)
    fuse_vision_model(model.vision_model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return BlipPart(model=model, tokenizer=tok, processor=processor, source=source)


# ----------------------------------------------------------------------------------------------
# the work


def sampling(captioner: BlipPart, top_p: float, repetition_penalty: float, max_length: int, min_length: int) -> dict:
    """The ``generate`` arguments of BLIP's nucleus sampling (``generate(sample=True)``), checked against the
    captioner."""
    limit = captioner.model.config.text_config.max_position_embeddings
    if max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the captioner's max_position_embeddings ({limit})")
    return dict(do_sample=True, top_p=top_p, repetition_penalty=repetition_penalty, max_length=max_length,
                min_length=min_length, num_beams=1)


@torch.no_grad()
def sample_captions(captioner: BlipPart, image_embeds: torch.Tensor, prompt: str, gen: dict, num: int = 1) -> list:
    """``num`` sampled captions per image, image i's at ``[i * num, (i + 1) * num)``: HF
    ``BlipForConditionalGeneration.generate`` with a prompt (cut from the text) and ``num_return_sequences``, as
    BLIP samples; ``gen`` from :func:`sampling`."""
    tok, cfg = captioner.tokenizer, captioner.model.config.text_config
    dev = image_embeds.device
    b = image_embeds.shape[0]
    ids = tok([prompt] * b, return_tensors="pt")["input_ids"].to(dev)
    ids[:, 0] = cfg.bos_token_id
    ids = ids[:, :-1]  # without [SEP]
    out = captioner.model.text_decoder.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=cfg.sep_token_id,
        pad_token_id=cfg.pad_token_id, encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=dev),
        num_return_sequences=num, **gen)
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return [t[len(prompt):].strip() if t.startswith(prompt.strip()) else t.strip() for t in texts]


class CapFilt:
    """Captioner + filter over batches of PIL images (see the module docstring)."""

    def __init__(self, captioner: BlipPart, filt: BlipPart, *, prompt: str = "a picture of ", top_p: float = 0.9,
                 repetition_penalty: float = 1.1, max_length: int = 20, min_length: int = 5, max_text_len: int = 35,
                 threshold: float = 0.5):
        self.cap, self.filt = captioner, filt
        self.gen = sampling(captioner, top_p, repetition_penalty, max_length, min_length)
        max_text_len = min(max_text_len, filt.model.config.text_config.max_position_embeddings)
        self.prompt, self.threshold, self.max_text_len = prompt, threshold, max_text_len
        # the same checkpoint: one ViT for both (the filter's is the captioner's)
        self.shared_vit = captioner.source == filt.source
        if self.shared_vit:
            filt.model.vision_model = captioner.model.vision_model
        p = next(captioner.model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def _pixels(self, part: BlipPart, images) -> torch.Tensor:
        px = part.processor(images=images, return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def pixels(self, images) -> tuple:
        """(captioner's, filter's) pixel_values of PIL images (each model's own processor)."""
        cap = self._pixels(self.cap, images)
        return cap, (cap if self.shared_vit else self._pixels(self.filt, images))

    @torch.no_grad()
    def image_embeds(self, cap_pixels: torch.Tensor, filt_pixels: torch.Tensor) -> tuple:
        """(captioner's, filter's) ViT tokens of the images (one ViT pass when they share it)."""
        cap = self.cap.model.vision_model(pixel_values=cap_pixels).last_hidden_state
        if self.shared_vit:
            return cap, cap
        return cap, self.filt.model.vision_model(pixel_values=filt_pixels).last_hidden_state

    def caption(self, image_embeds: torch.Tensor) -> list:
        """One sampled caption per image (HF ``BlipForConditionalGeneration.generate`` with a prompt, as BLIP)."""
        return sample_captions(self.cap, image_embeds, self.prompt, self.gen)

    @torch.no_grad()
    def itm(self, image_embeds: torch.Tensor, texts: list, owner: torch.Tensor) -> torch.Tensor:
        """p(match) [N] of texts[i] with image owner[i] (the filter's ITM head on [ENC]; image K/V once per image)."""
        from .data.annotations import pre_caption

        tok = self.filt.tokenizer
        enc = tok([pre_caption(t, 30) for t in texts], padding="longest", truncation=True,
                  max_length=self.max_text_len, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        ids[:, 0] = self.filt.enc_token_id
        te = self.filt.model.text_encoder
        h = te(ids, attention_mask=enc["attention_mask"].to(self.device), encoder_kv=te.image_kv(image_embeds),
               kv_index=owner.to(self.device)).last_hidden_state
        return self.filt.model.itm_head(h[:, 0]).float().softmax(-1)[:, 1]

    def process(self, images: list, web: list) -> list:
        """Per image: [{"caption", "source", "itm", "keep"}] for its web texts (``web[i]``) and one synthetic."""
        return self.process_pixels(*self.pixels(images), web)

    def process_pixels(self, cap_pixels: torch.Tensor, filt_pixels: torch.Tensor, web: list) -> list:
        """:meth:`process` on preprocessed images."""
        cap_embeds, filt_embeds = self.image_embeds(cap_pixels, filt_pixels)
        synthetic = self.caption(cap_embeds)
        texts, owner, source = [], [], []
        for i, (ws, syn) in enumerate(zip(web, synthetic)):
            for t in ws:
                texts.append(t)
                owner.append(i)
                source.append("web")
            texts.append(syn)
            owner.append(i)
            source.append("synthetic")
        p = self.itm(filt_embeds, texts, torch.tensor(owner)).tolist()
        out = [[] for _ in web]
        for t, i, s, pi in zip(texts, owner, source, p):
            out[i].append({"caption": t, "source": s, "itm": round(pi, 6), "keep": pi >= self.threshold})
        return out


# ----------------------------------------------------------------------------------------------
# files


def side_paths(out: str) -> tuple:
    """(scores log, summary) beside ``OUT``; :func:`settings_path` is the third."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".scores.jsonl", stem + ".summary.json"


def settings_path(out: str) -> str:
    """The settings the scores log was written with, beside ``OUT``."""
    return side_paths(out)[1][:-len(".summary.json")] + ".settings.json"


def settings(args, dtype: torch.dtype) -> dict:
    """What decides the rows of ``OUT``: a resume must not change it (it would mix both settings' decisions)."""
    def path(p):
        return None if p is None else os.path.abspath(p)

    return {"captioner": path(args.captioner), "filter": path(args.filter), "tokenizer": path(args.tokenizer),
            "threshold": args.threshold, "prompt": args.prompt, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty, "max_length": args.max_length,
            "min_length": args.min_length, "max_text_len": args.max_text_len, "batch_size": args.batch_size,
            "seed": args.seed, "dtype": str(dtype).replace("torch.", "")}


def _read_log(path: str) -> dict:
    """image -> texts of the complete rows of a scores log; a partial last line (a crash mid-write) is cut off."""
    return {r["image"]: r["texts"] for r in read_jsonl_rows(path)
            if isinstance(r, dict) and isinstance(r.get("image"), str) and isinstance(r.get("texts"), list)}


def _out_rows(image: str, texts: list) -> list:
    """The ``OUT`` rows of an image's kept texts: every field of the text but the decision."""
    return [json.dumps({"image": image, **{k: v for k, v in t.items() if k != "keep"}}) + "\n"
            for t in texts if t["keep"]]


def summarize(done: dict, unreadable: list, **extra) -> dict:
    """The counts of the summary: images, unreadable ones, kept / removed texts per source, then ``extra``."""
    counts = {s: {"kept": 0, "removed": 0} for s in ("web", "synthetic")}
    for texts in done.values():
        for t in texts:
            counts[t["source"]]["kept" if t["keep"] else "removed"] += 1
    return {"images": len(done), "unreadable": sorted(unreadable), **counts, **extra}


# ----------------------------------------------------------------------------------------------


def run(args) -> int:
    try:
        return _run(args)
    except ValueError as exc:
        return run_failed(exc)


def run_failed(exc: ValueError) -> int:
    """Print a usage error (a ValueError naming its flag) and give its exit status."""
    print(f"blipfast capfilt: {exc}", file=sys.stderr, flush=True)
    return EXIT_USAGE


# each mode's own flags, the model it needs and its defaults (a flag of the other mode is refused)
MODE_FLAGS = {"blip": ("filter", "threshold"), "blip2": ("ranker", "num_captions", "keep")}
MODE_MODEL = {"blip": ("filter", "the ITM filter model"), "blip2": ("ranker", "a local Hugging Face CLIPModel folder")}
MODE_DEFAULTS = {"blip": {"threshold": 0.5, "max_text_len": 35}, "blip2": {"num_captions": 10, "keep": 2}}


def check_common(args, mode: str) -> None:
    """ValueError naming the flag for the options both modes share and for the other mode's flags; fills in the
    mode's defaults."""
    other = "blip2" if mode == "blip" else "blip"
    for flag in MODE_FLAGS[other]:
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is an option of --mode {other}, not of --mode {mode}")
    model, what = MODE_MODEL[mode]
    if getattr(args, model, None) is None:
        raise ValueError(f"--{model} is required with --mode {mode} ({what})")
    for name, v in MODE_DEFAULTS[mode].items():
        if getattr(args, name, None) is None:
            setattr(args, name, v)
    for name in ("batch_size", "max_length", "max_text_len", "num_captions", "keep"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")


def _run(args) -> int:
    check_common(args, "blip")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    def build():
        cap = load_blip(args.captioner, "captioner", args.tokenizer, device, dtype)
        filt = load_blip(args.filter, "filter", args.tokenizer, device, dtype)
        return CapFilt(cap, filt, prompt=args.prompt, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                       max_length=args.max_length, min_length=args.min_length, max_text_len=args.max_text_len,
                       threshold=args.threshold)

    return drive(args, settings(args, dtype), build, {"threshold": args.threshold},
                 {"captioner": args.captioner, "filter": args.filter})


def drive(args, sett: dict, build, summary_extra: dict, models: dict) -> int:
    """The batched, resumable loop both modes share (see the module docstring): reads ``--data``, checks ``sett``
    against the stored settings, calls ``build()`` for the pipeline (``process(images, web texts)`` -> per image
    its texts ``{"caption", "source", <scores>, "keep"}``), appends each batch to the scores log then to ``OUT``,
    writes the summary (:func:`summarize` with ``summary_extra``; ``models`` beside it) and prints the counts."""
    from tqdm.auto import tqdm

    from .data.annotations import read_annotations
    from .data.vision import ImageReadError, load_image

    t0 = time.perf_counter()
    ann = read_annotations(args.data, args.images, check_images=True)
    for msg in ann.bad[:10]:
        print(f"blipfast capfilt: {msg}", file=sys.stderr)
    web: dict = {}
    for p, raw in enumerate(ann.raw):
        web.setdefault(ann.images[ann.image_index[p]], []).append(raw)
    keys = list(web)

    log_path, summary_path = side_paths(args.out)
    if args.restart:
        for p in (args.out, log_path, summary_path, settings_path(args.out)):
            if os.path.isfile(p):
                os.remove(p)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = _read_log(log_path)
    check_settings(settings_path(args.out), sett, output=f"--out {args.out}",
                   resumed=bool(done) or os.path.isfile(args.out))
    pipe = build()

    if done or not os.path.isfile(args.out):  # OUT follows the log (repairs a crash between the two writes)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(line for image, texts in done.items() for line in _out_rows(image, texts))
        os.replace(tmp, args.out)
    else:  # an OUT without its log: its images count as done
        with open(args.out) as fh:
            for line in fh:
                if line.strip():
                    done.setdefault(json.loads(line)["image"], [])
    todo = [k for k in keys if k not in done]
    unreadable: list = []
    n_new = 0
    bar = tqdm(total=len(todo), desc="capfilt", unit="img", file=sys.stderr, disable=not args.progress)
    with open(log_path, "a") as log, open(args.out, "a") as out:
        for b in range(0, len(keys), args.batch_size):
            if args.max_images is not None and n_new >= args.max_images:
                break
            chunk = [k for k in keys[b:b + args.batch_size] if k not in done]
            images, names = [], []
            for k in chunk:
                try:
                    images.append(load_image(os.path.join(args.images, k)))
                    names.append(k)
                except ImageReadError as exc:
                    print(f"blipfast capfilt: {exc} (skipped)", file=sys.stderr, flush=True)
                    unreadable.append(k)
            if images:
                torch.manual_seed((args.seed * 1_000_003 + b // args.batch_size) % 2**63)
                results = pipe.process(images, [web[k] for k in names])
                append_lines(log, [json.dumps({"image": k, "texts": r}) + "\n" for k, r in zip(names, results)])
                append_lines(out, [line for k, r in zip(names, results) for line in _out_rows(k, r)])
                done.update(zip(names, results))
            n_new += len(chunk)
            bar.update(len(chunk))
    bar.close()
    summary = summarize(done, unreadable, **summary_extra)
    with open(summary_path, "w") as fh:
        json.dump({**summary, **models, "seed": args.seed, "settings": sett}, fh, indent=1)
    rows = sum(t["keep"] for texts in done.values() for t in texts)
    left = len([k for k in keys if k not in done]) - len(unreadable)
    w, s = summary["web"], summary["synthetic"]
    print(f"blipfast capfilt: {summary['images']} images" + (f" ({len(unreadable)} unreadable, skipped)" if unreadable
                                                             else "")
          + f"; web texts {w['kept']} kept, {w['removed']} removed; synthetic {s['kept']} kept, {s['removed']} "
          f"removed -> {args.out} ({rows} rows) in {time.perf_counter() - t0:.1f} s"
          + (f"; {left} images left (run again to continue)" if left > 0 else ""), flush=True)
    return EXIT_OK
