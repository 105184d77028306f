"""``blip2-stage1`` (the default of ``blipfast train``): BLIP-2 stage 1, :class:`blipfast.Blip2Stage1` (ITC + ITM +
ITG of the Q-Former) on the tokens of a frozen vision encoder (the trainer's tower, or a feature cache), with a
BERT-style tokenizer (trained on the captions by default). The model configuration: ``PRESETS["blip2"]`` <
``--model`` (:class:`blipfast.Blip2Stage1Config` fields, a nested ``qformer`` of :class:`blipfast.QFormerConfig`
fields) < ``--max-txt-len``, the tokenizer and the vision width."""
from __future__ import annotations

import torch

from ..logger import LOSSES
from .base import Task, model_config, qformer_fields, register


@register
class Blip2Stage1Task(Task):
    """:class:`blipfast.Blip2Stage1`: ITC + ITM + ITG (see the module docstring)."""

    name = "blip2-stage1"
    recipe = "blip2-stage1"  # train/schedules.py, train/param_groups.py: LAVIS' pretrain_stage1.yaml
    title = "stage 1"
    losses = LOSSES

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        from ...models.blip2 import Blip2Stage1, Blip2Stage1Config

        mcfg = model_config(Blip2Stage1Config, "blip2", cfg, [
            ({"max_txt_len": cfg["max_txt_len"]}, "--max-txt-len"),
            ({"bos_token_id": tok.bos_token_id}, "the tokenizer's [DEC]"),
            ({"qformer": {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}}, "the tokenizer"),
            ({"qformer": {"encoder_hidden_size": width}}, "the vision model's width")],
            nested={"qformer": qformer_fields()})
        model = Blip2Stage1(mcfg).to(device).train()
        if cfg["init"] is not None and fresh:
            self.init_weights(model, cfg["init"])
        return model, mcfg.to_dict()

    def step_loss(self, model, embeds, inp: dict, seed):
        out = model(embeds, inp["input_ids"], inp["attention_mask"],
                    image_ids=inp["image_id"] if self.image_ids else None, sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach().float()
