"""``blip-pretrain`` (``--model blip``): BLIP (v1) pre-training, :class:`blipfast.BlipPretrain` (Salesforce BLIP's
``BLIP_Pretrain``, docs/semantics.md); and the bases every BLIP (v1) task derives from: :class:`BlipTask` (what
pre-training and fine-tuning share) and :class:`BlipFinetuneTask` (what the fine-tuning tasks ``blip-retrieval``,
``blip-caption``, ``blip-vqa`` and ``blip-nlvr`` share; docs/blip-finetune.md).

Every BLIP (v1) task differs from BLIP-2 stage 1 (whose tokenizer handling, tokenisation and checkpoints it
shares: the defaults of :class:`~blipfast.train.tasks.base.Task`) in :class:`BlipTask`'s ways:

- the ViT is part of the model and trains: the trainer loads no frozen tower (``trains_vision``), the batches hold
  ``pixel_values`` from :meth:`~BlipTask.image_processor` (saved as ``image_processor/`` in the run folder), and
  ``--vision`` (a ``BlipVisionModel`` or BLIP folder) only gives the ViT's starting weights (a momentum copy starts
  from them too); a feature cache is refused;
- the tokenizer gets BLIP's ``[ENC]`` after ``[DEC]``; captions are cut to 30 words (BLIP's ``pre_caption(.., 30)``);
- the model config: the task's config class (:meth:`~BlipTask.model_classes`) from ``PRESETS[family]``,
  ``--model``'s fields, and what the tokenizer ([DEC], [ENC], [PAD], [SEP] and the vocabulary) and ``--vision``
  (the ViT's sizes) fix.

Pre-training specifics: ``--vision``'s own processor and resolution (``PRESETS["blip"]``: ``base`` ViT-B/16 at
224 px, BERT-base MED, queue 57600; ``tiny``); ``alpha`` ramps as in BLIP's ``pretrain.py``, ``0.4 * min(1, i / (2 *
steps per epoch))`` for micro-step i: it enters each batch as a 0-d tensor (:meth:`BlipPretrainTask.step_inputs`),
so a compiled step or a CUDA graph (a static buffer) never changes shape or recompiles for it.

Fine-tuning (:class:`BlipFinetuneTask`) specifics: the ViT at the task model's resolution (384 px, VQA 480 px;
``--vision``'s position embeddings interpolated to it as BLIP's loader does), BLIP's evaluation transform at that
size (the ``--augment`` train transform takes its size, mean and std); ``--init`` any Salesforce BLIP checkpoint (the
task's own such as ``model_base_retrieval_coco.pth``, or the pre-training ``model_base.pth``), an HF folder or a
blipfast run, through the model's ``load_lavis_state_dict`` as BLIP's ``load_checkpoint`` reads it (what it
interpolated, replaced, left out or left at its initialisation is logged); Salesforce BLIP's ``train_*.py``
optimiser and schedule (``recipe``: AdamW, weight decay 0.05, a cosine to 0 without warm-up); with ``--eval-every
N`` the task's evaluation on ``--eval-data`` (or the synthetic set) at the end of every N-th epoch, logged to
``RUN/eval.jsonl``.
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch

from ..logger import LOSSES
from .base import PRESETS, Task, merge, model_config, register


class BlipTask(Task):
    """What every BLIP (v1) task shares (see the module docstring); a subclass declares :meth:`model_classes` and
    ``family`` and implements ``step_loss``."""

    trains_vision = True
    vision_kind = "blip"  # the synthetic set's ViT
    enc_token = True  # BLIP's tokenizer: BERT with [ENC]
    max_words = 30  # BLIP's datasets: pre_caption(caption, 30)
    #: the key of the model's sizes in :data:`~blipfast.train.tasks.base.PRESETS`
    family: ClassVar[str] = "blip"
    #: the ViT runs at the model's own resolution (``--vision``'s position embeddings interpolated to it), not at
    #: ``--vision``'s
    own_resolution: ClassVar[bool] = False

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.vit = self.tok = self.processor = None

    @staticmethod
    def model_classes() -> tuple:
        """(the model class, its config class: a :class:`~blipfast.models.blip_config.BlipConfigBase`)."""
        raise NotImplementedError

    def fixed_fields(self, cfg: dict, tok) -> list:
        """``[(fields, why)]``: the model's fields besides the text model's that the tokenizer (and the task's
        options) fix. Default: [DEC] and [ENC], those of them the config has."""
        ids = {"bos_token_id": tok.bos_token_id, "enc_token_id": tok.convert_tokens_to_ids("[ENC]")}
        fields = self.model_classes()[1].FIELDS
        return [({k: v for k, v in ids.items() if k in fields}, "the tokenizer")]

    def model_config(self, cfg: dict, tok):
        """The run's model configuration: ``PRESETS[family]`` < ``--model`` < the tokenizer's ids,
        :meth:`fixed_fields` and ``--vision``'s sizes (its resolution too unless ``own_resolution``)."""
        from ...models.blip_config import TEXT_FIELDS, VISION_FIELDS

        sep = tok.sep_token_id
        text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                "sep_token_id": sep, "eos_token_id": sep}
        derived = [({"text": text}, "the tokenizer")] + self.fixed_fields(cfg, tok)
        if self.vit is not None:  # --vision fixes the ViT's sizes
            sizes = [k for k in VISION_FIELDS if not (self.own_resolution and k == "image_size")]
            derived.append(({"vision": {k: getattr(self.vit.config, k) for k in sizes}}, "--vision"))
        mcfg = model_config(self.model_classes()[1], self.family, cfg, derived,
                            nested={"text": ("BlipTextConfig", TEXT_FIELDS), "vision": ("BlipVisionConfig",
                                                                                        VISION_FIELDS)})
        if cfg["max_txt_len"] > mcfg.text.max_position_embeddings:
            raise ValueError(f"--max-txt-len {cfg['max_txt_len']} exceeds the text model's max_position_embeddings "
                             f"({mcfg.text.max_position_embeddings})")
        return mcfg

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        """The model of :meth:`model_config`; ``--vision``'s weights (position embeddings interpolated to the
        model's grid; a momentum copy starts from them), the device, train mode, ``--init`` when ``fresh``."""
        from ... import convert
        from ...models.blip_vision import fit_position_embeddings

        self.tok = tok
        mcfg = self.model_config(cfg, tok)
        model = self.model_classes()[0](mcfg)
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


@register
class BlipPretrainTask(BlipTask):
    """:class:`blipfast.BlipPretrain`: ITC (momentum encoders, queues) + ITM + LM (see the module docstring)."""

    name = "blip-pretrain"
    recipe = "blip-pretrain"  # Salesforce BLIP's pretrain.py
    title = "BLIP pre-training"
    losses = LOSSES
    spelling = "--model blip"
    # Salesforce BLIP's configs/pretrain.yaml (ViT-B): AdamW lr 3e-4, warm-up from 1e-6 over 3000 steps, down to
    # 1e-6, weight decay 0.05, batch 75 per GPU, 20 epochs, captions of 30 tokens; no image ids (BLIP_Pretrain has none)
    defaults = {"lr": 3e-4, "warmup_lr": 1e-6, "warmup_steps": 3000, "min_lr": 1e-6, "batch_size": 75,
                "epochs": 20.0, "max_txt_len": 30, "image_ids": False}
    alpha = None  # the model's ITC alpha, set by build

    @staticmethod
    def model_classes() -> tuple:
        from ...models.blip_pretrain import BlipPretrain, BlipPretrainConfig

        return BlipPretrain, BlipPretrainConfig

    def image_processor(self, cfg: dict, dist):
        """The processor the images go through: ``--vision``'s own (the ViT's weights kept for :meth:`build`), else
        BLIP's transform at the ViT's size; rank 0 saves it in the run folder."""
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
        model, mcfg = super().build(cfg, tok, width, device, fresh)
        self.alpha = model.config.alpha
        return model, {"name": "blip", **mcfg}

    def step_inputs(self, micro_step: int, steps_per_epoch: float) -> dict:
        """BLIP's ``alpha = config['alpha'] * min(1, (epoch * len(loader) + i) / (2 * len(loader)))``."""
        return {"alpha": self.alpha * min(1.0, micro_step / (2.0 * steps_per_epoch))}

    def step_loss(self, model, pixel_values, inp: dict, seed):
        out = model(pixel_values, inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"],
                    image_ids=inp["image_id"] if self.image_ids else None, sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach().float()


class BlipFinetuneTask(BlipTask):
    """What the BLIP fine-tuning tasks share (see the module docstring): a task declares :meth:`model_classes`,
    ``family``, its data hooks, ``step_loss``, and its evaluation (default: :meth:`evaluate` scores
    ``score_split`` of the evaluation file)."""

    family = "blip-task"
    own_resolution = True
    recipe = "blip-finetune"  # train/schedules.py, train/param_groups.py: Salesforce BLIP's train_*.py recipes
    # Salesforce BLIP's train_*.py: AdamW, weight decay 0.05, a cosine down to 0 per epoch, no warm-up
    defaults = {"warmup_steps": 0, "min_lr": 0.0, "weight_decay": 0.05, "image_ids": False}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.ann = None

    def image_size(self, cfg: dict) -> int:
        """The ViT's resolution: ``PRESETS[family]`` < ``--model``, else the config class's ``IMAGE_SIZE``."""
        vision = merge(PRESETS[self.family][cfg["preset"]], cfg["model"] or {}).get("vision", {})
        return vision.get("image_size", self.model_classes()[1].IMAGE_SIZE)

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

    def init_weights(self, model, path: str) -> None:
        """``--init``: any BLIP checkpoint through the model's ``load_lavis_state_dict`` (see the module docstring);
        its notes are printed."""
        from ... import convert
        from ...models.blip_finetune import TaskLoad

        src = convert.resolve_source(path, what="--init")
        rep = model.load_lavis_state_dict(convert.load_state_dict(src.weights), what="--init")
        for note in rep.notes() if isinstance(rep, TaskLoad) else rep:
            print(f"blipfast train: --init {path}: {note}", flush=True)

    def evaluate(self, model, cfg: dict, dist, epoch: int):
        """The task's ``score_split`` of the evaluation file (:meth:`Task.eval_data`) under :meth:`Task.evaluating`,
        flattened by :meth:`metrics` (rank 0; None on the others and without an evaluation file)."""
        data = self.eval_data(cfg)
        if data is None or not dist.main:
            return None
        with self.evaluating(cfg, model):
            res = self.score_split(model, self.tok, data, cfg["images"], batch_size=cfg["batch_size"],
                                   max_txt_len=cfg["max_txt_len"], **self.score_options(cfg))
        return self.metrics(res)

    def score_split(self, model, tok, data: str, images: str, **options) -> dict:
        """The task's scores of the evaluation file ``data`` (the images under ``images``)."""
        raise NotImplementedError(f"{type(self).__name__}.score_split")

    def score_options(self, cfg: dict) -> dict:
        """The task's own keyword arguments of ``score_split`` in :meth:`evaluate` (default: none)."""
        return {}

    def metrics(self, result: dict) -> dict:
        """The numbers of a ``score_split`` result, one flat dict (nested tables joined by ``_``)."""
        out = {}
        for key, value in result.items():
            if isinstance(value, dict):
                out.update({f"{key}_{k}": v for k, v in value.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)):
                out[key] = value
        return out
