"""``blip-nlvr``: BLIP (v1) NLVR2 fine-tuning, :class:`blipfast.BlipNLVR` (Salesforce BLIP's ``train_nlvr.py`` with
``configs/nlvr.yaml``; docs/blip-finetune.md).

- Data (:mod:`blipfast.data.nlvr2`): BLIP's NLVR2 lists (``nlvr_train.json``: two images, a sentence, a label);
  the batches hold both images (``pixel_values`` [B, 2, 3, S, S]) and the sentence tokenised twice, as written and
  with ``left`` / ``right`` swapped.
- BLIP's augmentation: each example's two images are swapped with probability 0.5, and the sentence's left and
  right with them. The draw happens in the step, on the device: a Philox draw keyed by the step's seed and the
  example's index (deterministic, identical after ``--resume``, no host synchronisation).
- The recipe (``configs/nlvr.yaml``): 384 px, batch 16, AdamW lr 3e-5 with weight decay 0.05, a cosine to 0 per
  epoch without warm-up, 15 epochs; the ViT trains (stochastic depth 0.1); ``--init`` a Salesforce BLIP
  pre-training checkpoint (its cross-attention copied into both branches) or ``model_base_nlvr.pth``.
- Evaluation (:meth:`BlipNLVRTask.score_split`): NLVR2 accuracy (and consistency) of an evaluation list, without the
  swap; during training after every epoch (``--eval-every 1``, as ``train_nlvr.py``) on ``--eval-data`` or the
  synthetic set's ``nlvr2_eval.json``.
"""
from __future__ import annotations

import torch

from ...ops._philox import philox_u32
from .base import register
from .blip_pretrain import BlipFinetuneTask


@register
class BlipNLVRTask(BlipFinetuneTask):
    """:class:`blipfast.BlipNLVR` fine-tuning (see the module docstring)."""

    name = "blip-nlvr"
    title = "BLIP NLVR2 fine-tuning"
    spelling = "--task blip-nlvr"
    max_words = 40  # BLIP's nlvr_dataset: pre_caption(sentence, 40)
    # Salesforce BLIP configs/nlvr.yaml and train_nlvr.py (BLIP tokenises without truncation: 40 words fit 64 tokens;
    # train_nlvr.py evaluates the val and test splits after every epoch)
    defaults = {**BlipFinetuneTask.defaults, "lr": 3e-5, "warmup_lr": 3e-5, "batch_size": 16, "epochs": 15.0,
                "max_txt_len": 64, "eval_every": 1}
    streams = False  # image pairs with a sentence: annotation files, not image-caption streams
    synthetic_eval = "nlvr2_eval.json"  # make_synthetic_nlvr2's evaluation pairs

    @staticmethod
    def model_classes() -> tuple:
        from ...models.blip_nlvr import BlipNLVR, BlipNLVRConfig

        return BlipNLVR, BlipNLVRConfig

    def synthetic(self, folder: str, size: int, seed: int) -> dict:
        from ...data.nlvr2 import make_synthetic_nlvr2

        paths = make_synthetic_nlvr2(folder, size, seed)
        return {"data": paths["data"], "images": paths["images"]}

    def read_data(self, cfg: dict, features: bool):
        from ...data.nlvr2 import read_nlvr2

        self.ann = read_nlvr2(cfg["data"], cfg["images"], check_images=not features, max_words=self.max_words)
        return self.ann

    def dataset(self, ann, images, processor, text, report_path, augment=None):
        from ...data.nlvr2 import Nlvr2Dataset

        return Nlvr2Dataset(ann, images, processor, text, report_path=report_path, augment=augment)

    def tokenize(self, model, tok, captions: list, cfg: dict) -> dict:
        """The sentences as written and with left / right swapped (``input_ids`` / ``attention_mask`` and
        ``swapped_ids`` / ``swapped_mask`` [P, --max-txt-len])."""
        from ...data import tokenize
        from ...data.nlvr2 import swapped_sentence

        ids, mask = tokenize(tok, captions, cfg["max_txt_len"])
        sw_ids, sw_mask = tokenize(tok, [swapped_sentence(c) for c in captions], cfg["max_txt_len"])
        return {"input_ids": ids, "attention_mask": mask, "swapped_ids": sw_ids, "swapped_mask": sw_mask}

    @staticmethod
    def swap(inp: dict, seed: torch.Tensor) -> tuple:
        """BLIP's random left/right swap of a batch: (pixel_values, input_ids, attention_mask), each example swapped
        when the top bit of Philox(seed, its index) is set."""
        swap = (philox_u32(seed, inp["image_id"]) >> 31) == 1
        px = inp["pixel_values"]
        px = torch.where(swap.view(-1, 1, 1, 1, 1), px.flip(1), px)
        ids = torch.where(swap[:, None], inp["swapped_ids"], inp["input_ids"])
        mask = torch.where(swap[:, None], inp["swapped_mask"], inp["attention_mask"])
        return px, ids, mask

    def step_loss(self, model, pixel_values, inp: dict, seed):
        px, ids, mask = self.swap({**inp, "pixel_values": pixel_values}, seed)
        out = model(px, ids, mask, inp["label"])
        return out.loss, out.loss.detach().float().reshape(1)

    def score_split(self, model, tok, data: str, images: str, *, batch_size: int = 64, max_txt_len: int = 64) -> dict:
        """NLVR2 accuracy (and consistency with NLVR2 identifiers) of the examples of ``data``."""
        from ...data.nlvr2 import read_nlvr2
        from ...data.vision import default_blip_processor
        from ...vqa_nlvr import predict_nlvr2, score_nlvr2

        ann = read_nlvr2(data, images)
        unwrapped = getattr(model, "module", model)
        proc = default_blip_processor(unwrapped.config.vision.image_size)
        return score_nlvr2(predict_nlvr2(unwrapped, tok, ann, images, proc, batch_size=batch_size,
                                         max_txt_len=max_txt_len), ann)
