"""``blip-retrieval``: BLIP (v1) image-text retrieval fine-tuning, :class:`blipfast.models.blip_retrieval.BlipRetrieval`
(Salesforce BLIP's ``train_retrieval.py`` with ``configs/retrieval_coco.yaml``; docs/blip-finetune.md).

What the BLIP fine-tuning tasks share (BLIP's tokenizer with [ENC], the model configuration from the presets,
``--model``, the tokenizer and ``--vision``, BLIP's transform at the model's resolution, ``--init`` from any BLIP
checkpoint, ``--eval-every``) is :class:`~blipfast.train.tasks.blip_pretrain.BlipFinetuneTask`'s.

Retrieval specifics: the image ids of the annotation are BLIP's ``idx`` (required: ``--image-ids`` stays on);
``alpha`` ramps over the first epoch, ``0.4 * min(1, i / steps per epoch)`` (``train_retrieval.py``); the
evaluation is the recall@1/5/10 of ``blipfast retrieval`` (``score_matrices`` with ``k_test`` and
:func:`blipfast.retrieval.recall_at_k`). The recipe's optimiser and schedule values are the defaults (AdamW, lr
1e-5, weight decay 0.05, a cosine to 0, 6 epochs, batch 32); the trainer's cosine is per step, BLIP's per epoch, and
the trainer does not decay biases and LayerNorms, which BLIP does (docs/blip-finetune.md).
"""
from __future__ import annotations

import torch

from .base import register
from .blip_pretrain import BlipFinetuneTask


@register
class BlipRetrievalTask(BlipFinetuneTask):
    """:class:`blipfast.models.blip_retrieval.BlipRetrieval` (see the module docstring)."""

    name = "blip-retrieval"
    title = "BLIP retrieval fine-tuning"
    losses = ("loss", "loss_itc", "loss_itm")
    spelling = "--task blip-retrieval"
    # configs/retrieval_coco.yaml (ViT-B): AdamW lr 1e-5, weight decay 0.05, cosine to 0 over 6 epochs, batch 32 per
    # GPU; coco_karpathy_train: pre_caption(caption, 30), tokens padded to 35; image ids required
    defaults = {**BlipFinetuneTask.defaults, "lr": 1e-5, "warmup_lr": 1e-5, "eval_every": 1, "batch_size": 32,
                "epochs": 6.0, "max_txt_len": 35, "image_ids": True}
    family = "blip-retrieval"
    alpha = None  # the model's ITC alpha, set by build

    @staticmethod
    def model_classes() -> tuple:
        from ...models.blip_retrieval import BlipRetrieval, BlipRetrievalConfig

        return BlipRetrieval, BlipRetrievalConfig

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        super().check_options(cfg)
        if not cfg["image_ids"]:
            raise ValueError("--no-image-ids cannot be used with --task blip-retrieval: BLIP_Retrieval's ITC targets "
                             "and negatives are defined by the image ids")

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        model, mcfg = super().build(cfg, tok, width, device, fresh)
        self.alpha = model.config.alpha
        return model, mcfg

    def step_inputs(self, micro_step: int, steps_per_epoch: float) -> dict:
        """``train_retrieval.py``: ``alpha * min(1, i / len(loader))`` in epoch 0, then ``alpha``."""
        return {"alpha": self.alpha * min(1.0, micro_step / steps_per_epoch)}

    def step_loss(self, model, pixel_values, inp: dict, seed):
        out = model(pixel_values, inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"],
                    image_ids=inp["image_id"], sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm]).detach().float()

    def evaluate(self, model, cfg: dict, dist, epoch: int):
        """Recall@1/5/10 of the evaluation gallery (rank 0; None on the others and without an evaluation set)."""
        from ...retrieval import evaluate, read_annotations

        data = self.eval_data(cfg)
        if data is None or not dist.main:
            return None
        gallery = read_annotations(data, max_words=self.max_words)
        with self.evaluating(cfg, model):
            res = evaluate(model, gallery, self.tok, images=cfg["images"], k=model.config.k_test,
                           max_txt_len=cfg["max_txt_len"], workers=0, processor=self.processor,
                           image_batch_size=cfg["batch_size"])
        return {k: round(v, 4) for k, v in res["metrics"].items()}
