"""``blip-retrieval``: BLIP (v1) image-text retrieval fine-tuning, :class:`blipfast.models.blip_retrieval.BlipRetrieval`
(Salesforce BLIP's ``train_retrieval.py`` with ``configs/retrieval_coco.yaml``; docs/blip-finetune.md).

Also the base of the BLIP fine-tuning tasks (:class:`BlipFinetuneTask`, shared with ``blip-caption``), which differ
from ``blip-pretrain`` (whose tokenizer, with [ENC], they share) in:

- the model configuration: the task's config class from ``PRESETS[family]`` (registered here: ``base`` is BLIP's
  recipe at 384 px, ``tiny`` the tiny BLIP's sizes), ``--model`` and what the tokenizer and ``--vision`` fix
  (``--vision`` gives the ViT's sizes and starting weights, its position embeddings interpolated to the task's
  resolution as BLIP's loader does);
- the images through BLIP's fine-tuning train transform (``--augment``, the default) or its evaluation transform at
  the model's resolution;
- ``--init``: a Salesforce BLIP ``.pth`` (a task checkpoint such as ``model_base_retrieval_coco.pth`` or the
  pre-training ``model_base.pth``), an HF folder (``BlipForImageTextRetrieval``) or a blipfast run, read by the
  model's ``load_lavis_state_dict`` as BLIP's ``load_checkpoint`` reads it (what it interpolated, replaced or left
  unused is logged);
- ``--eval-every N``: evaluation on ``--eval-data`` (or the synthetic set) at the end of every N-th epoch, logged
  to ``RUN/eval.jsonl``.

Retrieval specifics: the image ids of the annotation are BLIP's ``idx`` (required: ``--image-ids`` stays on);
``alpha`` ramps over the first epoch, ``0.4 * min(1, i / steps per epoch)`` (``train_retrieval.py``); the
evaluation is the recall@1/5/10 of ``blipfast retrieval`` (``score_matrices`` with ``k_test`` and
:func:`blipfast.retrieval.recall_at_k`). The recipe's optimiser and schedule values are the defaults (AdamW, lr
1e-5, weight decay 0.05, a cosine to 0, 6 epochs, batch 32); the trainer's cosine is per step, BLIP's per epoch, and
the trainer does not decay biases and LayerNorms, which BLIP does (docs/blip-finetune.md).
"""
from __future__ import annotations

import os

import torch

from .base import PRESETS, merge, model_config, register
from .blip_pretrain import BlipPretrainTask

PRESETS.setdefault("blip-retrieval", {"base": {}, "tiny": dict(PRESETS["blip"]["tiny"])})


class BlipFinetuneTask(BlipPretrainTask):
    """What the BLIP fine-tuning tasks share (see the module docstring); a subclass sets ``family``,
    ``config_class()`` and ``build_model``."""

    family = "blip-retrieval"
    recipe = "blip-finetune"  # Salesforce BLIP's train_*.py
    defaults = {"lr": 1e-5, "warmup_lr": 1e-5, "warmup_steps": 0, "min_lr": 0.0, "weight_decay": 0.05,
                "eval_every": 1}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.tok = self.processor = None

    @staticmethod
    def config_class():
        from ...models.blip_retrieval import BlipRetrievalConfig

        return BlipRetrievalConfig

    def image_size(self, cfg: dict) -> int:
        vision = merge(PRESETS[self.family][cfg["preset"]], cfg["model"] or {}).get("vision", {})
        return vision.get("image_size", self.config_class().VISION["image_size"])

    def image_processor(self, cfg: dict, dist):
        """BLIP's evaluation transform at the model's resolution (``--vision``: the ViT's weights only, kept for
        :meth:`build`); rank 0 saves it in the run folder."""
        from ...data.vision import default_blip_processor, load_blip_vision

        if cfg["vision"] is not None:
            self.vit, _ = load_blip_vision(cfg["vision"])
        self.processor = default_blip_processor(self.image_size(cfg))
        if dist.main:
            self.processor.save_pretrained(os.path.join(cfg["out"], "image_processor"))
        return self.processor

    def model_config(self, cfg: dict, tok, derived: list):
        """The run's model configuration (``PRESETS[family]`` < ``--model`` < the tokenizer's ids and ``--vision``'s
        sizes, ``derived`` added)."""
        from ...models.blip_config import TEXT_FIELDS, VISION_FIELDS

        sep = tok.sep_token_id
        derived = [({"text": {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                              "sep_token_id": sep, "eos_token_id": sep}}, "the tokenizer")] + derived
        if self.vit is not None:  # --vision fixes the ViT's sizes (its resolution stays the task's)
            derived.append(({"vision": {k: getattr(self.vit.config, k) for k in VISION_FIELDS if k != "image_size"}},
                            "--vision"))
        mcfg = model_config(self.config_class(), self.family, cfg, derived,
                            nested={"text": ("BlipTextConfig", TEXT_FIELDS), "vision": ("BlipVisionConfig",
                                                                                        VISION_FIELDS)})
        if cfg["max_txt_len"] > mcfg.text.max_position_embeddings:
            raise ValueError(f"--max-txt-len {cfg['max_txt_len']} exceeds the text model's max_position_embeddings "
                             f"({mcfg.text.max_position_embeddings})")
        return mcfg

    def finish_build(self, model, mcfg, cfg: dict, device, fresh: bool):
        """``--vision``'s weights (position embeddings interpolated), the device, train mode, ``--init``; the
        (model, recorded config) pair :meth:`build` returns."""
        from ... import convert
        from ...models.blip_vision import fit_position_embeddings

        if self.vit is not None:
            sd = dict(self.vit.state_dict())
            fit_position_embeddings(sd, model.vision_model)
            convert.load_into(model.vision_model, sd, what="--vision", into="the BLIP ViT")
            if hasattr(model, "copy_params"):
                model.copy_params()
            self.vit = None
        model = model.to(device).train()
        if cfg["init"] is not None and fresh:
            self.init_weights(model, cfg["init"])
        return model, mcfg.to_dict()  # (no "name": the run's task says which model it is)

    def init_weights(self, model, path: str) -> None:
        """``--init``: any BLIP checkpoint through the model's ``load_lavis_state_dict`` (see the module
        docstring); its notes are printed."""
        from ... import convert

        src = convert.resolve_source(path, what="--init")
        for note in model.load_lavis_state_dict(convert.load_state_dict(src.weights)):
            print(f"blipfast train: --init: {note}", flush=True)


@register
class BlipRetrievalTask(BlipFinetuneTask):
    """:class:`blipfast.models.blip_retrieval.BlipRetrieval` (see the module docstring)."""

    name = "blip-retrieval"
    title = "BLIP retrieval fine-tuning"
    losses = ("loss", "loss_itc", "loss_itm")
    spelling = "--task blip-retrieval"
    # configs/retrieval_coco.yaml (ViT-B): AdamW lr 1e-5, weight decay 0.05, cosine to 0 over 6 epochs, batch 32 per
    # GPU; coco_karpathy_train: pre_caption(caption, 30), tokens padded to 35; image ids required
    defaults = {**BlipFinetuneTask.defaults, "batch_size": 32, "epochs": 6.0, "max_txt_len": 35, "image_ids": True}

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        super().check_options(cfg)
        if not cfg["image_ids"]:
            raise ValueError("--no-image-ids cannot be used with --task blip-retrieval: BLIP_Retrieval's ITC targets "
                             "and negatives are defined by the image ids")

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        from ...models.blip_retrieval import BlipRetrieval

        self.tok = tok
        mcfg = self.model_config(cfg, tok, [({"enc_token_id": tok.convert_tokens_to_ids("[ENC]")}, "the tokenizer")])
        self.alpha = mcfg.alpha
        return self.finish_build(BlipRetrieval(mcfg), mcfg, cfg, device, fresh)

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
