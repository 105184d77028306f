"""``blip-caption``: BLIP (v1) captioning fine-tuning, :class:`blipfast.models.blip_caption.BlipCaptioner` (Salesforce
BLIP's ``train_caption.py`` with ``configs/caption_coco.yaml``; docs/blip-finetune.md).

What the BLIP fine-tuning tasks share (tokenizer with [DEC] and [ENC], model configuration, BLIP's transform at the
model's resolution, ``--init`` from any BLIP checkpoint, ``--eval-every``) is
:class:`~blipfast.train.tasks.blip_pretrain.BlipFinetuneTask`'s. Captioning specifics:

- ``--prompt`` (default BLIP's "a picture of ") is put before every processed caption (``coco_karpathy_train``:
  ``prompt + pre_caption(caption, 30)``), the text tokenised to ``--max-txt-len`` 40 tokens; the prompt's tokens
  and [DEC] get no loss (``prompt_length = len(tokenizer(prompt).input_ids) - 1``, fixed by the tokenizer);
- the evaluation generates one caption per image of ``--eval-data`` with BLIP's decoding (beam 3, max 20, min 5,
  the prompt counted and cut) and scores them against the file's reference captions with the COCO caption toolkit
  (:func:`blipfast.evaluation.score_captions`: BLEU, METEOR, ROUGE-L, CIDEr; a missing Java runtime or
  pycocoevalcap is logged instead); the captions are written to ``RUN/captions-epoch<N>.jsonl``.
"""
from __future__ import annotations

import json
import os

import torch

from .base import _need, register
from .blip_pretrain import BlipFinetuneTask


@register
class BlipCaptionTask(BlipFinetuneTask):
    """:class:`blipfast.models.blip_caption.BlipCaptioner` (see the module docstring)."""

    name = "blip-caption"
    title = "BLIP captioning fine-tuning"
    losses = ("loss",)
    family = "blip-caption"
    spelling = "--task blip-caption"
    # configs/caption_coco.yaml (ViT-B): AdamW lr 1e-5, weight decay 0.05, cosine to 0 over 5 epochs, batch 32 per
    # GPU, prompt 'a picture of '; BLIP_Decoder: tokens truncated at 40
    defaults = {**BlipFinetuneTask.defaults, "lr": 1e-5, "warmup_lr": 1e-5, "eval_every": 1, "batch_size": 32,
                "epochs": 5.0, "max_txt_len": 40, "prompt": "a picture of "}

    @staticmethod
    def model_classes() -> tuple:
        from ...models.blip_caption import BlipCaptioner, BlipCaptionConfig

        return BlipCaptioner, BlipCaptionConfig

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        """As the other BLIP tasks, but ``--prompt`` is the captioning prompt."""
        cls.check_image_options(cfg)
        cls.check_stream_options(cfg)
        _need(cfg["llm"] is None and cfg["text_suffix"] is None, "--llm and --text-suffix are options of --stage 2")

    def prompt_length(self, tok, prompt: str) -> int:
        """BLIP's ``len(tokenizer(prompt).input_ids) - 1``: [DEC] and the prompt's tokens."""
        return len(tok(prompt)["input_ids"]) - 1 if prompt else 0

    def fixed_fields(self, cfg: dict, tok) -> list:
        """[DEC] and the prompt's length."""
        fixed = {"bos_token_id": tok.bos_token_id, "prompt_length": self.prompt_length(tok, cfg["prompt"])}
        return [(fixed, "the tokenizer and --prompt")]

    def tokenize(self, model, tok, captions: list, cfg: dict) -> dict:
        """``prompt + caption`` tokenised to ``--max-txt-len`` ([CLS] first: the model puts [DEC] there)."""
        return super().tokenize(model, tok, [cfg["prompt"] + c for c in captions], cfg)

    def step_loss(self, model, pixel_values, inp: dict, seed):
        loss = model(pixel_values, inp["input_ids"], inp["attention_mask"]).loss
        return loss, loss.detach().float().reshape(1)

    def evaluate(self, model, cfg: dict, dist, epoch: int):
        """BLIP's decoding of every image of the evaluation file, scored against its references (rank 0)."""
        return caption_and_score(self, model, cfg, dist, epoch,
                                 lambda px: model.caption(px, self.tok, prompt=cfg["prompt"]))


def caption_and_score(task, model, cfg: dict, dist, epoch: int, captions) -> dict | None:
    """A caption task's ``--eval-every`` (rank 0): every image of the evaluation file once, in the file's order,
    through ``task.processor`` in batches of ``--batch-size`` and ``captions`` (pixel_values -> list of str), the
    captions written to ``RUN/captions-epoch{epoch}.jsonl`` and scored against the file's references (the COCO
    toolkit; "unavailable" with the reason when it cannot run)."""
    from ...data.vision import load_image, preprocess
    from ...evaluation import ScorerUnavailableError, read_caption_references, score_captions

    data = task.eval_data(cfg)
    if data is None or not dist.main:
        return None
    refs = read_caption_references(data)
    paths = list(dict.fromkeys(_image_paths(data)))  # the evaluation images, each once, in the file's order
    keys = [refs.names.get(os.path.basename(p)) for p in paths]
    if None in keys:
        raise ValueError(f"--eval-data: cannot tell the image id of {paths[keys.index(None)]!r} (two images of one "
                         f"file name?)")
    preds, b = {}, cfg["batch_size"]
    with task.evaluating(cfg, model):
        for i in range(0, len(paths), b):
            px = torch.stack([preprocess(task.processor, load_image(os.path.join(cfg["images"], p)))
                              for p in paths[i:i + b]])
            preds.update(zip(keys[i:i + b], captions(px)))
    with open(os.path.join(cfg["out"], f"captions-epoch{epoch}.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"image_id": k, "caption": c}) + "\n" for k, c in preds.items())
    try:
        scores = score_captions(preds, refs, spice=False)
    except ScorerUnavailableError as exc:
        return {"captions": len(preds), "scores": f"unavailable: {exc}"}
    return {"captions": len(preds), **{k: round(v, 4) for k, v in scores.metrics.items()}}


def _image_paths(path: str) -> list:
    """The image paths of an annotation file, in its order (the evaluation set's images)."""
    from ...data.annotations import read_gallery

    return read_gallery(path).images
