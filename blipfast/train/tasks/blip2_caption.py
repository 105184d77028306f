"""``blip2-caption``: BLIP-2 caption fine-tuning with the ViT trained (LAVIS ``projects/blip2/train/caption_coco_ft.yaml``
with ``Blip2OPT``'s model config ``caption_coco_opt2.7b``; docs/blip2-finetune.md).

The stage-2 model (:class:`blipfast.Blip2Stage2`, the frozen OPT or Flan-T5 of ``--llm``) with the ViT, ``ln_vision``,
the Q-Former, the queries and the projection trained (``freeze_vit: False``), on the LM loss of "a photo of " +
caption (the stage-2 task's tokenisation: the prompt's tokens get no loss; OPT's captions end with "\\n" as
``Blip2OPT.forward`` appends; a Flan-T5 reads the prompt in its encoder). What differs from ``blip2-stage2``:

- the ViT is the model's (``trains_vision``: the batches hold pixels, a feature cache is refused): blipfast's fused
  pre-LN blocks (:func:`blipfast.models.blip2_vision.fuse_blip2_vision_model`), every block checkpointed by default
  (the recipe's ``use_grad_checkpoint: True``), in float32 master weights under the run's autocast
  (LAVIS' ``vit_precision: fp32``); ``--model {"vit_checkpoint": ...}``: ``"all"`` / true, every k-th block (k), or
  false;
- its weights, as LAVIS builds them: ``--vision`` (a ``Blip2VisionModel`` folder: LAVIS' ``eva_vit_g.pth``, loaded
  by ``create_eva_vit_g``) with the ViT weights ``--init`` holds over them (LAVIS' ``load_from_pretrained``; their
  position table interpolated to the training resolution); without ``--vision``, the ViT of ``--init`` alone (an
  HF BLIP-2 folder, a blipfast ``blip2-caption`` run, a LAVIS ``.pth`` with ``visual_encoder.*``: EVA ViT-g's
  sizes from its shapes);
- 364 px (``--model {"image_size": N}``; default: the ViT's grid scaled by LAVIS' 364 / 224, i.e. 364 px for
  ViT-g/14 at 224 px; a ``blip2-caption`` run as ``--init`` keeps its own): the position table is interpolated once
  at build time
  (:func:`blipfast.models.blip2_vision.resize_position_embedding`, LAVIS' ``interpolate_pos_embed``) and trained;
  the images go through LAVIS' ``blip2_image_train`` (``--augment``) or ``blip_image_eval`` at that size;
- LAVIS' recipe as the defaults (below) with the ``blip2-finetune`` recipe's schedule (``linear_warmup_cosine_lr``)
  and parameter groups (``Blip2Base.get_optimizer_params``);
- ``--eval-every N``: every image of ``--eval-data`` (or the synthetic set) captioned with LAVIS' COCO decoding
  (prompt "a photo of", beam 5, max 30, min 8; :meth:`blipfast.Blip2Stage2.decoding_settings`) and scored with the
  COCO caption toolkit (:func:`blipfast.evaluation.score_captions`), captions in ``RUN/captions-epoch<N>.jsonl``.

Checkpoints hold every trained tensor (the ViT included, HF names) with a ``config.json`` (the ViT's and the
Q-Former's configs), so a checkpoint is itself an ``--init``; ``--save-lavis`` adds LAVIS names.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from ._vit import VIT_FIELDS as _VIT_FIELDS
from ._vit import TrainableViT
from .base import _need, check_model_fields, qformer_fields, register
from .blip2_stage2 import Blip2Stage2Task


@register
class Blip2CaptionTask(TrainableViT, Blip2Stage2Task):
    """The stage-2 model with its ViT trained on captions (see the module docstring)."""

    name = "blip2-caption"
    recipe = "blip2-finetune"  # LAVIS' caption_coco_ft.yaml: linear_warmup_cosine_lr, Blip2Base's groups
    title = "BLIP-2 caption fine-tuning (ViT trained)"
    spelling = "--task blip2-caption"
    stage = 1  # (--stage 2 names blip2-stage2; the recorded stage only tells the older spellings apart)
    trains_vision = True
    streams = True  # WebDataset shards: their images through the task's processor / --augment, as image files
    qformer_text_input = False  # LAVIS' flag: the Q-Former takes text beside the queries (InstructBLIP's)
    # caption_coco_ft.yaml: init_lr 1e-5, warmup_lr 1e-8 over 1000 steps, min_lr 0, weight decay 0.05, 5 epochs,
    # batch 16 per GPU, evaluation every epoch; Blip2OPT: max_txt_len 32, "\n" after the caption; the text processor's
    # prompt "a photo of "
    defaults = {"batch_size": 16, "epochs": 5.0, "lr": 1e-5, "warmup_lr": 1e-8, "warmup_steps": 1000, "min_lr": 0.0,
                "weight_decay": 0.05, "max_txt_len": 32, "prompt": "a photo of ", "text_suffix": "\n",
                "eval_every": 1}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.parts = None
        self.processor = self.tok = None
        self.ends = {"text_suffix": cfg["text_suffix"], "tokenizer": cfg["tokenizer"]}  # config.json: a whole model

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        cls.check_image_options(cfg)
        cls.check_stream_options(cfg)
        _need(cfg["llm"] is not None, f"{cls.spelling} needs --llm LLM_DIR (a local Hugging Face OPT or Flan-T5 "
              "folder; frozen)")
        _need(os.path.isdir(cfg["llm"]), f"--llm: {cfg['llm']!r} is not a folder (a local Hugging Face LLM folder)")
        _need(cfg["init"] is not None, f"{cls.spelling} needs --init CKPT (a BLIP-2 stage-1/2 checkpoint: a "
              "LAVIS .pth, a blipfast run or an HF BLIP-2 folder)")
        _need(not cfg["cuda_graph"], "--cuda-graph is for stage 1 (the HF LLM's mask checks synchronise with the "
              "host); use --compile")
        check_model_fields(cfg["model"] or {}, ("ln_vision_eps",) + _VIT_FIELDS, {"qformer": qformer_fields()},
                           cls.name)

    # ------------------------------------------------------------------------------------------
    # the parts (--init's weights, the ViT's source and resolution: TrainableViT._parts)

    def _qformer_config(self, cfg: dict, src):
        """The stage-2 rule, with a ``blip2-caption`` run as --init read like a stage-2 run."""
        run = src.run_config
        if run is not None and run.get("task") == self.name and run.get("model"):
            keep = {k: v for k, v in run["model"].items() if k in ("qformer", "ln_vision_eps")}
            src = dataclasses.replace(src, run_config={**run, "stage": 2, "model": keep})
        elif run is None and not (src.hf_config or {}).get("qformer_config"):  # a --model over the weights' config
            from ...models.blip2_stage2 import stage2_qformer_config

            parts = self._parts(cfg)
            qcfg = stage2_qformer_config(parts["qhint"], parts["sd"]).to_dict()
            src = dataclasses.replace(src, hf_config={"model_type": "blip-2", "qformer_config": qcfg})
        user = {k: v for k, v in (cfg["model"] or {}).items() if k not in _VIT_FIELDS}
        return super()._qformer_config({**cfg, "model": user}, src)

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        from ...data.vision import quiet_transformers
        from ...models.blip2_stage2 import Blip2Stage2
        from ...models.qformer import QFormerConfig
        from ...options import resolve_dtype

        self.tok = tok
        parts = self._parts(cfg)
        qcfg, eps = self._qformer_config(cfg, parts["src"])
        eps = eps if eps is not None else parts["eps"]
        dtype = resolve_dtype(cfg["llm_dtype"], device, flag="--llm-dtype")
        try:
            with quiet_transformers():
                vit = self.load_vision_model(parts)  # float32: it trains
                model = Blip2Stage2.from_pretrained_parts(parts["sd"], cfg["llm"], None, dtype=dtype, device=device,
                                                          qformer_config=qcfg if qcfg is not None else parts["qhint"],
                                                          ln_vision_eps=eps, instruct=self.qformer_text_input)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise ValueError(f"{self.spelling}: cannot build the model from --init {cfg['init']!r}, --llm "
                             f"{cfg['llm']!r} and the ViT: {exc}") from None
        ln = model.model.vision_model.post_layernorm
        vit = self.vision_model(vit, ln, parts)  # ln_vision as its post_layernorm, 364 px, --init's ViT, fused
        model.model.vision_model = vit.to(device)
        model.model.config.vision_config = vit.config
        model.set_vision_trainable(True)
        n_emb = model.language_model.get_input_embeddings().num_embeddings
        if len(tok) > n_emb:
            raise ValueError(f"--tokenizer: {len(tok)} tokens, more than the LLM's {n_emb} embeddings")
        self.keys = ("input_ids", "attention_mask", "labels") + (("decoder_attention_mask",)
                                                                 if model.is_encoder_decoder else ())
        record = {"qformer": QFormerConfig(model.model.config.qformer_config).to_dict(), "ln_vision_eps": ln.eps,
                  "image_size": parts["image_size"], "vit_checkpoint": parts["vit_checkpoint"]}
        self.parts = dict(parts, sd=None)  # the weights are in the model now
        return model.train(), record

    def step_loss(self, model, pixel_values, inp: dict, seed):
        loss = model(pixel_values=pixel_values, **{k: inp[k] for k in self.keys}).loss
        return loss, loss.detach().float().reshape(1)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        """The stage-2 checkpoint (every trained tensor, the ViT's included) with the ViT's whole config."""
        super().save(model, folder, step, lavis)
        path = os.path.join(folder, "config.json")
        with open(path) as fh:
            meta = json.load(fh)
        meta["vision_config"] = model.model.vision_model.config.to_dict()
        meta["blipfast"].update(task=self.name, ln_vision_eps=model.model.vision_model.post_layernorm.eps, **self.ends,
                                note="the trained parts of a BLIP-2 caption fine-tuning run (the ViT included); "
                                     "the LLM is not here")
        with open(path, "w") as fh:
            json.dump(meta, fh, indent=1)

    # ------------------------------------------------------------------------------------------
    # evaluation

    def evaluate(self, model, cfg: dict, dist, epoch: int):
        """LAVIS' COCO decoding of every image of the evaluation file, scored against its references (rank 0)."""
        from .blip_caption import caption_and_score

        return caption_and_score(self, model, cfg, dist, epoch, lambda px: self.captions(model, px, cfg))

    def captions(self, model, pixel_values: torch.Tensor, cfg: dict) -> list:
        """The captions of ``pixel_values`` with LAVIS' COCO decoding (``Blip2OPT`` / ``Blip2T5.generate``: its
        prompt "a photo of", decoder-only LLMs left-padded and stopping at the caption's end token: "\\n" when
        the run appends it, as LAVIS' ``eos_token_id``)."""
        tok = self.tok
        settings = model.decoding_settings("coco")
        dev = next(model.parameters()).device
        extra = {}
        side = tok.padding_side
        tok.padding_side = "right" if model.is_encoder_decoder else "left"
        try:
            enc = tok([settings.prompt] * pixel_values.shape[0], padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        suffix = cfg["text_suffix"]
        if not model.is_encoder_decoder and suffix:
            end = tok(suffix, add_special_tokens=False)["input_ids"]
            if end:
                extra["eos_token_id"] = end[0]
        out = model.generate(pixel_values=pixel_values.to(dev), input_ids=enc["input_ids"].to(dev),
                             attention_mask=enc["attention_mask"].to(dev), settings=settings, **extra)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

