"""``blip-pretrain`` (``--model blip``): BLIP (v1) pre-training, :class:`blipfast.BlipPretrain` (Salesforce BLIP's
``BLIP_Pretrain``, docs/semantics.md).

What differs from BLIP-2 stage 1 (whose tokenizer handling, tokenisation and checkpoints it shares: the defaults
of :class:`~blipfast.train.tasks.base.Task`):

- the ViT is part of the model and trains: the trainer loads no frozen tower (``trains_vision``), the batches hold
  ``pixel_values`` from :meth:`image_processor` (``--vision``'s own, else BLIP's transform at the ViT's size, also
  saved as ``image_processor/`` in the run folder), and ``--vision`` (a ``BlipVisionModel`` or BLIP folder) only
  gives the ViT's starting weights (the momentum copy starts from them too); a feature cache is refused;
- the tokenizer gets BLIP's ``[ENC]`` after ``[DEC]``; captions are cut to 30 words (BLIP's ``pre_caption(.., 30)``);
- the model config: a :class:`blipfast.BlipPretrainConfig` from ``PRESETS["blip"]`` (``base``: ViT-B/16 at 224 px,
  BERT-base MED, queue 57600; ``tiny``), ``--model``'s fields, and what the tokenizer and ``--vision`` fix;
- ``alpha`` ramps as in BLIP's ``pretrain.py``, ``0.4 * min(1, i / (2 * steps per epoch))`` for micro-step i: it
  enters each batch as a 0-d tensor (:meth:`step_inputs`), so a compiled step or a CUDA graph (a static buffer)
  never changes shape or recompiles for it.
"""
from __future__ import annotations

import os

import torch

from ..logger import LOSSES
from .base import PRESETS, Task, merge, model_config, register


@register
class BlipPretrainTask(Task):
    """:class:`blipfast.BlipPretrain`: ITC (momentum encoders, queues) + ITM + LM (see the module docstring)."""

    name = "blip-pretrain"
    recipe = "blip-pretrain"  # Salesforce BLIP's pretrain.py
    title = "BLIP pre-training"
    losses = LOSSES
    trains_vision = True
    vision_kind = "blip"  # the synthetic set's ViT
    enc_token = True  # BLIP's tokenizer: BERT with [ENC]
    max_words = 30  # BLIP's pretrain_dataset: pre_caption(caption, 30)
    spelling = "--model blip"
    # Salesforce BLIP's configs/pretrain.yaml (ViT-B): AdamW lr 3e-4, warm-up from 1e-6 over 3000 steps, down to
    # 1e-6, weight decay 0.05, batch 75 per GPU, 20 epochs, captions of 30 tokens; no image ids (BLIP_Pretrain has none)
    defaults = {"lr": 3e-4, "warmup_lr": 1e-6, "warmup_steps": 3000, "min_lr": 1e-6, "batch_size": 75,
                "epochs": 20.0, "max_txt_len": 30, "image_ids": False}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.vit = None
        self.alpha = None

    def image_processor(self, cfg: dict, dist):
        """The processor the images go through (and, with ``--vision``, the ViT's starting weights, kept for
        :meth:`build`); rank 0 saves it in the run folder."""
        from ...data.vision import default_blip_processor, load_blip_vision

        if cfg["vision"] is not None:
            self.vit, processor = load_blip_vision(cfg["vision"])
        else:
            size = merge(PRESETS["blip"][cfg["preset"]], cfg["model"] or {}).get("vision", {}).get("image_size", 224)
            processor = default_blip_processor(size)
        if dist.main:
            processor.save_pretrained(os.path.join(cfg["out"], "image_processor"))
        return processor

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        from ... import convert
        from ...models.blip_pretrain import TEXT_FIELDS, VISION_FIELDS, BlipPretrain, BlipPretrainConfig

        sep = tok.sep_token_id
        derived = [({"bos_token_id": tok.bos_token_id, "enc_token_id": tok.convert_tokens_to_ids("[ENC]"),
                     "text": {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                              "bos_token_id": tok.bos_token_id, "sep_token_id": sep, "eos_token_id": sep}},
                    "the tokenizer")]
        if self.vit is not None:  # --vision fixes the ViT
            derived.append(({"vision": {k: getattr(self.vit.config, k) for k in VISION_FIELDS}}, "--vision"))
        mcfg = model_config(BlipPretrainConfig, "blip", cfg, derived,
                            nested={"text": ("BlipTextConfig", TEXT_FIELDS), "vision": ("BlipVisionConfig",
                                                                                        VISION_FIELDS)})
        if cfg["max_txt_len"] > mcfg.text.max_position_embeddings:
            raise ValueError(f"--max-txt-len {cfg['max_txt_len']} exceeds the text model's max_position_embeddings "
                             f"({mcfg.text.max_position_embeddings})")
        self.alpha = mcfg.alpha
        model = BlipPretrain(mcfg)
        if self.vit is not None:  # --vision: the ViT's weights; the momentum copy starts from them
            convert.load_into(model.vision_model, self.vit.state_dict(), what="--vision", into="the BLIP ViT")
            model.copy_params()
            self.vit = None
        model = model.to(device).train()
        if cfg["init"] is not None and fresh:
            self.init_weights(model, cfg["init"])
        return model, {"name": "blip", **mcfg.to_dict()}

    def step_inputs(self, micro_step: int, steps_per_epoch: float) -> dict:
        """BLIP's ``alpha = config['alpha'] * min(1, (epoch * len(loader) + i) / (2 * len(loader)))``."""
        return {"alpha": self.alpha * min(1.0, micro_step / (2.0 * steps_per_epoch))}

    def step_loss(self, model, pixel_values, inp: dict, seed):
        out = model(pixel_values, inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"],
                    image_ids=inp["image_id"] if self.image_ids else None, sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach().float()
