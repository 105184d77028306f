"""``blipfast eval caption``, timed: captioning throughput of blipfast's generation path against transformers' own
``generate``, and the caption scorer's own time (docs/benchmarks.md#eval-caption-generation-and-scoring).

Timed on CUDA (random weights built from configurations on the device in bf16, nothing downloaded; the same
weights on both sides, pixels of the papers' resolutions, a batch of images per call):

- BLIP-2 OPT-2.7b-shaped (ViT-g 224 px, 32 queries, the default Q-Former, OPT-2.7b's dimensions): the model of
  ``blipfast eval caption --model`` (:class:`blipfast.generate.engine.Generator`: :class:`blipfast.Blip2Stage2`
  with blipfast's Q-Former swapped in, the Q-Former and query tokens kept fp32 as transformers loads them, the
  LLM's attention as ``--attn-implementation auto`` picks it) against transformers' unswapped
  ``Blip2ForConditionalGeneration.generate``, both with LAVIS' ``coco`` decoding settings (beam 5, LAVIS' max 30 /
  min 8 lengths as new-token counts, prompt "a photo of": its 4 OPT tokens).
- BLIP-base-shaped (ViT-B/16 384 px, BERT-base decoder): transformers' ``BlipForConditionalGeneration.generate``
  with blipfast's text decoder swapped in (:func:`blipfast.patch.apply_blipfast_to_blip`) against the unswapped
  model, BLIP's COCO settings (beam 3, max 20 / min 5 tokens counting the prompt "a picture of ").

Timed on every device: :func:`blipfast.evaluation.score_captions` (PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr;
SPICE off) on N synthetic captions with 5 references each (N = 25,000 on CUDA; 2,000 on a CPU and with
``--quick``), one call: the scorer must stay a small fraction of the time that generated the N captions. Without
Java or pycocoevalcap the case reports itself skipped with the reason. ``images_per_s`` prints images/s and the
fraction scorer time / generation time for the same N.

``--quick``: a small BLIP-2 shape (the timings are then no statement about the papers' models).
"""
from __future__ import annotations

import random
from typing import Optional

import torch

from .common import Case

GROUP_BLIP2 = "eval caption BLIP-2"
GROUP_BLIP = "eval caption BLIP-base"
GROUP_SCORER = "eval caption scorer"
HF_BLIP2 = "HF Blip2ForCondGen.generate"
OURS_BLIP2 = "blipfast Generator (Stage2)"
HF_BLIP = "HF BlipForCondGen.generate"
OURS_BLIP = "blipfast apply_blipfast_to_blip"
SCORER = "score_captions (no SPICE)"
OPT_PROMPT = (2, 102, 1345, 9)  # "a photo of" as OPT's tokenizer gives it (BOS first)
BERT_PROMPT = (101, 1037, 3861, 1997, 102)  # "a picture of " as BERT's gives it ([CLS] ... [SEP])
IMAGE_TOKEN, OPT_VOCAB = 50265, 50304  # transformers' Salesforce/blip2-opt-2.7b configuration
REFERENCES = 5


def scorer_captions(device: torch.device, quick: bool) -> int:
    """N of the scorer case: 25,000 on CUDA (the issue's figure), 2,000 on a CPU or with ``quick``."""
    return 2000 if quick or device.type != "cuda" else 25000


# ----------------------------------------------------------------------------------------------
# models


def _build(cls, cfg, device, dtype):
    """``cls(cfg)`` with random weights, made on ``device`` in ``dtype``; the modules transformers keeps in fp32
    when it loads a checkpoint in ``dtype`` (BLIP-2's Q-Former and query tokens) made fp32 as well."""
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    for name in getattr(model, "_keep_in_fp32_modules", None) or ():
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        elif isinstance(part, torch.nn.Module):
            part.float()
    return model.eval()


def blip2_config(quick: bool = False):
    """A BLIP-2 OPT-2.7b-shaped ``Blip2Config`` (``quick``: a small ViT, Q-Former and OPT of the same vocabulary)."""
    from transformers import Blip2Config

    if quick:
        small = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)
        vision, qformer = small, dict(small, encoder_hidden_size=256)
        text = dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=256)
    else:  # transformers' defaults: ViT-g 224 px (patch 14) and BLIP-2's Q-Former; OPT-2.7b's dimensions
        vision, qformer = {}, {}
        text = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                    word_embed_proj_dim=2560)
    text = dict(text, model_type="opt", vocab_size=OPT_VOCAB, max_position_embeddings=2048)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                       image_token_index=IMAGE_TOKEN)


def _blip2_cases(device, dtype, quick: bool) -> list[Case]:
    import copy

    from transformers import Blip2ForConditionalGeneration

    from ..models.blip2_stage2 import Blip2Stage2

    hf = _build(Blip2ForConditionalGeneration, blip2_config(quick), device, dtype)
    base = copy.deepcopy(hf)  # the unswapped model, same weights (Blip2Stage2 patches ``hf`` in place)
    ours = Blip2Stage2.from_hf(hf, dtype=dtype, device=device).eval()  # as Generator loads it
    settings = ours.decoding_settings("coco")
    kw = settings.generate_kwargs()
    b = 4 if quick else 16  # blipfast caption's --batch-size default
    size = base.config.vision_config.image_size
    gen = torch.Generator(device).manual_seed(0)
    px = torch.randn(b, 3, size, size, device=device, generator=gen).to(dtype)
    prompt = torch.tensor(OPT_PROMPT, device=device).expand(b, -1)
    # transformers' processor puts one image token per query before the prompt
    hf_ids = torch.cat([torch.full((b, base.config.num_query_tokens), IMAGE_TOKEN, device=device), prompt], 1)
    params = dict(images=b, image_size=size, queries=base.config.num_query_tokens, settings="coco",
                  num_beams=kw["num_beams"], max_new_tokens=kw["max_new_tokens"], min_new_tokens=kw["min_new_tokens"],
                  dtype=str(dtype).replace("torch.", ""), shape="quick" if quick else "OPT-2.7b")

    def run_base():
        return base.generate(pixel_values=px, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), **kw)

    def run_ours():
        return ours.generate(pixel_values=px, input_ids=prompt, attention_mask=torch.ones_like(prompt), **kw)

    g = f"{GROUP_BLIP2} {params['shape']} B={b}"
    return _generation_pair(g, (HF_BLIP2, run_base), (OURS_BLIP2, run_ours), params)


def _blip_cases(device, dtype) -> list[Case]:
    """BLIP-base-shaped captioner at 384 px: transformers' defaults are ViT-B/16 and a BERT-base decoder."""
    import copy

    from transformers import BlipConfig, BlipForConditionalGeneration

    from ..patch import apply_blipfast_to_blip

    base = _build(BlipForConditionalGeneration, BlipConfig(vision_config=dict(image_size=384)), device, dtype)
    ours = apply_blipfast_to_blip(copy.deepcopy(base))
    b = 16
    gen = torch.Generator(device).manual_seed(0)
    px = torch.randn(b, 3, 384, 384, device=device, generator=gen).to(dtype)
    prompt = torch.tensor(BERT_PROMPT, device=device).expand(b, -1)
    kw = dict(num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0)  # BLIP's caption_coco.yaml
    params = dict(images=b, image_size=384, settings="BLIP caption_coco", num_beams=3, max_length=20, min_length=5,
                  dtype=str(dtype).replace("torch.", ""), shape="BLIP-base")

    def run(model):
        def f():
            ids = prompt.clone()  # transformers writes [DEC] into the prompt's first column
            return model.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        return f

    return _generation_pair(f"{GROUP_BLIP} B={b}", (HF_BLIP, run(base)), (OURS_BLIP, run(ours)), params)


def _generation_pair(group: str, base: tuple, ours: tuple, params: dict) -> list[Case]:
    """The baseline and blipfast's case of a generation group: a few calls of a second or more each."""
    def timed(fn):
        @torch.no_grad()
        def f():
            return fn()
        return f

    few = dict(max_warmup=2, max_iters=5)
    return [Case(group, base[0], timed(base[1]), baseline=True, params=params, **few),
            Case(group, ours[0], timed(ours[1]), params=params, **few)]


def generation_cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> list[Case]:
    """The timed generation cases (CUDA only: billions of parameters)."""
    if device.type != "cuda":
        return []
    return _blip2_cases(device, dtype, quick) + ([] if quick else _blip_cases(device, dtype))


# ----------------------------------------------------------------------------------------------
# the scorer

_WORDS = ("a man woman person dog cat bird horse group of people two three young old small large white black red "
          "blue green brown sitting standing walking riding holding eating playing looking on in at with next to "
          "near under top the street table field water grass beach road building room kitchen plate pizza bus "
          "train bike motorcycle skateboard surfboard frisbee ball tennis racket umbrella laptop phone bed couch "
          "window door tree sky snow park city car truck sign clock boat").split()


def synthetic_captions(n: int, references: int = REFERENCES, seed: int = 0) -> tuple[dict, dict]:
    """(predictions, references) of ``n`` images: COCO-like captions of 7-16 words (capitalised, some with a comma
    or a full stop), each prediction sharing words with its references."""
    rng = random.Random(seed)

    def caption(words):
        text = " ".join(words)
        if rng.random() < 0.2:
            text = text.replace(" ", ", ", 1)
        return text[0].upper() + text[1:] + ("." if rng.random() < 0.5 else "")

    preds, refs = {}, {}
    for i in range(n):
        topic = rng.sample(_WORDS, 12)
        refs[i] = [caption(rng.choices(topic + _WORDS, k=rng.randint(7, 16))) for _ in range(references)]
        preds[i] = caption(rng.choices(topic, k=rng.randint(7, 12)))
    return preds, refs


def scorer_case(device: torch.device, quick: bool = False, captions: Optional[int] = None) -> Case:
    """One call of :func:`blipfast.evaluation.score_captions` on N synthetic captions (``captions``, default
    :func:`scorer_captions`), skipped with the reason where the toolkit cannot run."""
    from ..evaluation.caption import ScorerUnavailableError, check_toolkit, score_captions

    n = captions or scorer_captions(device, quick)
    params = dict(captions=n, references=REFERENCES, spice="off")
    try:
        check_toolkit()
        skip = None
    except ScorerUnavailableError as exc:
        skip = str(exc)
    preds, refs = synthetic_captions(n) if skip is None else ({}, {})

    def run():
        return score_captions(preds, refs, spice=False)

    return Case(f"{GROUP_SCORER} N={n}", SCORER, run, params=params, skip=skip, max_warmup=0, max_iters=1,
                measure_memory=False)


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          captions: Optional[int] = None) -> list[Case]:
    """Generation (CUDA; elsewhere one row skipped as needing it) and the caption scorer (every device;
    ``captions``: its N)."""
    gen = generation_cases(device, dtype, quick) if device.type == "cuda" else [
        Case("eval caption generation", "blipfast and HF generate", lambda: None, skip="needs a CUDA device")]
    return gen + [scorer_case(device, quick, captions)]


def images_per_s(results) -> str:
    """Images/s of each generation row, the scorer's seconds and captions/s, and the fraction scorer time /
    generation time of the same N captions (``blipfast bench`` prints it under the table)."""
    lines, rates = [], []
    scorer = next((r for r in results if r.group.startswith(GROUP_SCORER) and r.ms is not None), None)
    for r in results:
        if r.ms is None or not r.group.startswith((GROUP_BLIP2, GROUP_BLIP)):
            continue
        ips = r.params["images"] / (r.ms / 1e3)
        rates.append((r, ips))
        lines.append(f"  {r.params['shape']:<9} {r.name:<32} {ips:9.1f} images/s")
    if scorer is not None:
        n, s = scorer.params["captions"], scorer.ms / 1e3
        lines.append(f"  scorer    {n} captions x {scorer.params['references']} references: {s:.1f} s "
                     f"({n / s:.0f} captions/s)")
        for r, ips in rates:
            lines.append(f"  scorer / generation of the same {n} captions, {r.params['shape']} {r.name}: "
                         f"{s / (n / ips):.3f}")
    return "\n".join(lines)
