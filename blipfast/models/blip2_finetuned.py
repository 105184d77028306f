"""A fine-tuned BLIP-2 run as a whole generation model (docs/blip2-finetune.md): a ``blipfast train --task
blip2-caption`` (or ``blip2-vqa``: the InstructBLIP form, with ``qformer_tokenizer/``) run or checkpoint holds every
trained tensor (the ViT included, HF names) with a ``config.json`` (the ViT's and the Q-Former's configs,
``blipfast.ln_vision_eps``, ``blipfast.llm``), but not the frozen LLM.

- :func:`finetuned_run` says whether a path is one (a run folder, one of its ``checkpoint-*`` folders, or such a
  folder copied elsewhere) and gathers what rebuilding it needs: the LLM folder the run recorded (or ``llm``), the
  tokenizer (the run's ``--tokenizer``, else the LLM's), the training resolution and the caption's end
  (``--text-suffix``: "\\n" for OPT, LAVIS' ``eos_token_id``);
- :func:`load_finetuned` builds :class:`~blipfast.models.blip2_stage2.Blip2Stage2` from it: the checkpoint's ViT at
  its resolution, ``ln_vision`` with the run's epsilon, the Q-Former, queries and projection, and the LLM of the run
  (:meth:`Blip2Stage2.from_pretrained_parts`, the trainer's own builder).

``blipfast caption`` / ``blipfast eval caption --model RUN`` / ``blipfast eval vqa --model RUN`` load a run this
way (a ``blip2-vqa`` run answers as its ``--eval-every`` does: :meth:`FineTunedRun.decoding_settings`);
``blipfast export`` writes a ``blip2-caption`` run as a Hugging Face ``Blip2ForConditionalGeneration`` folder
(:mod:`blipfast.generate.export`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import convert

__all__ = ["FineTunedRun", "finetuned_run", "load_finetuned"]

_SKIP = ("model_type", "transformers_version", "architectures")


@dataclass(frozen=True)
class FineTunedRun:
    """What :func:`load_finetuned` rebuilds: ``source`` (the resolved checkpoint), ``task`` (the run's), ``llm`` and
    ``tokenizer`` (folders), ``image_size`` (the ViT's resolution), ``text_suffix`` (the end the run appended to its
    captions, or None) and ``ln_vision_eps``."""

    source: convert.Source
    task: str
    llm: str
    tokenizer: str
    image_size: int
    text_suffix: Optional[str]
    ln_vision_eps: float
    qformer_tokenizer: Optional[str] = None
    prompt: Optional[str] = None
    max_txt_len: Optional[int] = None

    @property
    def instruct(self) -> bool:
        """The InstructBLIP form (a ``blip2-vqa`` run: the question in the Q-Former)."""
        return self.qformer_tokenizer is not None

    def decoding_settings(self, model, name: str):
        """LAVIS' settings ``name`` as the run's own evaluation decodes: for a ``blip2-vqa`` run, "vqa" is BLIP-2's
        ``predict_answers`` (not InstructBLIP's) with the run's prompt; otherwise ``model``'s own."""
        from .llm import decoding_settings

        if not (self.instruct and name == "vqa"):
            return model.decoding_settings(name)
        settings = decoding_settings(name, is_encoder_decoder=model.is_encoder_decoder)
        return dataclasses.replace(settings, prompt=self.prompt or settings.prompt)

    @property
    def vision_config(self) -> dict:
        return {k: v for k, v in self.source.hf_config["vision_config"].items() if k not in _SKIP}

    @property
    def qformer_config(self) -> dict:
        return {k: v for k, v in self.source.hf_config["qformer_config"].items() if k not in _SKIP}


def finetuned_run(path, *, llm=None, what: str = "--model") -> Optional[FineTunedRun]:
    """The :class:`FineTunedRun` of ``path`` when it is a blipfast checkpoint that holds a whole ViT (a
    ``blip2-caption`` or ``blip2-vqa`` run, a checkpoint of one, or such a checkpoint folder elsewhere), else None
    (e.g. an HF folder). A ``blip2-vqa`` checkpoint's ``qformer_tokenizer/`` folder makes it the InstructBLIP form,
    with the run's prompt and ``--max-txt-len`` (where the question is cut for the Q-Former). ``llm`` replaces the
    LLM folder the run recorded. ValueError naming ``what`` when the path does not exist or the LLM (or tokenizer)
    folder is not there."""
    src = convert.resolve_source(path, what=what)
    meta = src.hf_config or {}
    mark = meta.get("blipfast") if isinstance(meta.get("blipfast"), dict) else None
    vision = meta.get("vision_config") or {}
    if meta.get("model_type") != "blip-2" or mark is None or not vision.get("num_hidden_layers") \
            or not os.path.isfile(src.weights):
        return None
    run = src.run_config or {}
    recorded = mark.get("llm") or run.get("llm")
    tokenizer = mark.get("tokenizer") or run.get("tokenizer")
    if llm is not None and tokenizer in (None, recorded):  # the LLM's own tokenizer follows it
        tokenizer = None
    llm = llm or recorded
    if not isinstance(llm, str) or not os.path.isdir(llm):
        raise ValueError(f"{what}: {path} was trained with the LLM {llm!r}, which is not a folder here (give the "
                         f"LLM folder with --llm)")
    tokenizer = tokenizer or llm
    if not os.path.isdir(tokenizer):
        raise ValueError(f"{what}: the tokenizer folder {tokenizer!r} of {path} is not there")
    suffix = mark["text_suffix"] if "text_suffix" in mark else run.get("text_suffix")
    task = str(mark.get("task") or run.get("task"))
    qtok = os.path.join(os.path.dirname(str(src.weights)), "qformer_tokenizer")
    if not os.path.isdir(qtok):
        if task == "blip2-vqa":
            raise ValueError(f"{what}: {path} is a blip2-vqa checkpoint without its qformer_tokenizer/ folder")
        qtok = None
    prompt = mark.get("prompt", run.get("prompt")) if qtok else None
    max_len = mark.get("max_txt_len", run.get("max_txt_len")) if qtok else None
    eps = mark.get("ln_vision_eps", (run.get("model") or {}).get("ln_vision_eps", vision.get("layer_norm_eps", 1e-6)))
    return FineTunedRun(source=src, task=task, llm=llm, tokenizer=tokenizer, image_size=int(vision["image_size"]),
                        text_suffix=suffix, ln_vision_eps=float(eps), qformer_tokenizer=qtok, prompt=prompt,
                        max_txt_len=None if max_len is None else int(max_len))


def load_finetuned(run: FineTunedRun, *, dtype: Optional[torch.dtype] = None, device=None,
                   attn_implementation: Optional[str] = "auto"):
    """:class:`~blipfast.models.blip2_stage2.Blip2Stage2` of ``run`` (the ViT and LLM in ``dtype``; the trained
    Q-Former parts in float32), in eval mode."""
    from transformers import Blip2VisionConfig

    from .blip2_stage2 import Blip2Stage2

    vcfg = Blip2VisionConfig(**run.vision_config)
    model = Blip2Stage2.from_pretrained_parts(run.source.weights, run.llm, vcfg, qformer_config=run.qformer_config,
                                              dtype=dtype, device=device, attn_implementation=attn_implementation,
                                              ln_vision_eps=run.ln_vision_eps, instruct=run.instruct)
    return model.eval()
