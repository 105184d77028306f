"""The models ``blipfast train`` can train, as a registry: what the trainer needs to know about each.

``--model`` names one (``blip2``, the default: BLIP-2 stage 1, ``Blip2Stage1`` on a frozen vision tower; ``blip``:
BLIP v1 pre-training, ``BlipPretrain`` with its trainable ViT) or is a JSON mapping of the model's config fields,
with ``"name"`` saying which (absent: ``blip2``). A :class:`ModelKind` gives the trainer

- the option defaults of the model's reference recipe (over the built-in ones, under the synthetic set's);
- whether images may come from a feature cache (a frozen tower) or must go through a trainable ViT;
- the model's config from the run's options, the tokenizer and the vision model (``--vision`` / presets);
- the model itself, with ``--vision`` weights loaded where the ViT is part of it;
- per-micro-step scalars for ``forward`` (BLIP's ``alpha``, ramped over the first two epochs), which the steppers
  feed as device tensors (a static buffer under CUDA graphs), so a compiled step never recompiles for them.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ModelKind:
    name = ""
    trains_vision = False  # True: images go through the model's own (trainable) ViT; no feature cache
    max_words = 50  # caption words kept by the annotation reader (pre_caption)
    PRESETS: dict = {}
    DEFAULTS: dict = {}  # option defaults of the model's recipe

    def user_config(self, cfg: dict) -> dict:
        user = dict(cfg["model"] or {})
        user.pop("name", None)
        return user

    def step_scalars(self, micro_step: int, steps_per_epoch: float, mcfg) -> dict:
        return {}


class Blip2Kind(ModelKind):
    """BLIP-2 stage 1 (LAVIS' recipe, SPEC.md section 3)."""

    name = "blip2"
    PRESETS = {
        "base": {},  # Blip2Stage1Config defaults: LAVIS stage 1
        "tiny": {"num_query_tokens": 8, "embed_dim": 64,
                 "qformer": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256,
                             "num_hidden_layers": 2, "max_position_embeddings": 64}},
    }

    def model_config(self, cfg: dict, tokenizer, width: int, vision_config=None):
        """The Blip2Stage1Config of the run: preset < ``model`` < the fields the tokenizer and vision model fix."""
        from ..models.blip2 import Blip2Stage1Config
        from ..models.qformer import _DEFAULTS as QF_FIELDS

        user = self.user_config(cfg)
        unknown = sorted(set(user) - set(Blip2Stage1Config.FIELDS) - {"qformer"})
        unknown += sorted(f"qformer.{k}" for k in set(user.get("qformer") or {}) - set(QF_FIELDS))
        if unknown:
            raise ValueError(f"--model: unknown field(s) {unknown}; Blip2Stage1Config has "
                             f"{list(Blip2Stage1Config.FIELDS)} and qformer (QFormerConfig: {sorted(QF_FIELDS)})")
        derived = {"max_txt_len": cfg["max_txt_len"], "bos_token_id": tokenizer.bos_token_id,
                   "qformer": {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                               "encoder_hidden_size": width}}
        _check_derived(user, derived, "qformer")
        try:
            return Blip2Stage1Config(**_merge(_merge(self.PRESETS[cfg["preset"]], user), derived))
        except TypeError as exc:
            raise ValueError(f"--model: {exc}") from None

    def build(self, mcfg, vision_model=None):
        from ..models.blip2 import Blip2Stage1

        return Blip2Stage1(mcfg)

    def prepare_tokenizer(self, tok):
        return tok


class BlipKind(ModelKind):
    """BLIP (v1) pre-training (Salesforce BLIP's ``configs/pretrain.yaml`` recipe, SPEC.md section 5)."""

    name = "blip"
    trains_vision = True
    max_words = 30  # BLIP's pretrain_dataset: pre_caption(caption, 30)
    PRESETS = {
        "base": {},  # BlipPretrainConfig defaults: ViT-B/16 at 224 px, BERT-base MED, queue 57600
        "tiny": {"embed_dim": 64, "queue_size": 1024,
                 "text": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256, "num_hidden_layers": 2,
                          "max_position_embeddings": 64},
                 "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "image_size": 32, "patch_size": 8}},
    }
    # configs/pretrain.yaml (ViT-B): AdamW lr 3e-4, warm-up from 1e-6 over 3000 steps, down to 1e-6, wd 0.05, batch
    # 75 per GPU, 20 epochs, captions of 30 tokens; no image ids (BLIP_Pretrain has none)
    DEFAULTS = {"lr": 3e-4, "warmup_lr": 1e-6, "warmup_steps": 3000, "min_lr": 1e-6, "batch_size": 75, "epochs": 20.0,
                "max_txt_len": 30, "image_ids": False}

    def model_config(self, cfg: dict, tokenizer, width: Optional[int], vision_config=None):
        """The BlipPretrainConfig of the run: preset < ``model`` < the fields the tokenizer and ``--vision`` fix."""
        from ..models.blip_pretrain import TEXT_FIELDS, VISION_FIELDS, BlipPretrainConfig

        user = self.user_config(cfg)
        unknown = sorted(set(user) - set(BlipPretrainConfig.FIELDS) - {"text", "vision"})
        unknown += sorted(f"text.{k}" for k in set(user.get("text") or {}) - set(TEXT_FIELDS))
        unknown += sorted(f"vision.{k}" for k in set(user.get("vision") or {}) - set(VISION_FIELDS))
        if unknown:
            raise ValueError(f"--model: unknown field(s) {unknown}; BlipPretrainConfig has "
                             f"{list(BlipPretrainConfig.FIELDS)}, text (BlipTextConfig: {list(TEXT_FIELDS)}) and "
                             f"vision (BlipVisionConfig: {list(VISION_FIELDS)})")
        enc = tokenizer.convert_tokens_to_ids("[ENC]")
        derived = {"bos_token_id": tokenizer.bos_token_id, "enc_token_id": enc,
                   "text": {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                            "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
                            "eos_token_id": tokenizer.sep_token_id}}
        if vision_config is not None:  # --vision fixes the ViT
            derived["vision"] = {k: getattr(vision_config, k) for k in VISION_FIELDS}
        _check_derived(user, derived, "text")
        if "vision" in derived:
            _check_derived(user.get("vision") or {}, derived["vision"], None, where="vision.")
        merged = _merge(_merge(self.PRESETS[cfg["preset"]], user), derived)
        try:
            mcfg = BlipPretrainConfig(**merged)
        except TypeError as exc:
            raise ValueError(f"--model: {exc}") from None
        if cfg["max_txt_len"] > mcfg.text.max_position_embeddings:
            raise ValueError(f"--max-txt-len {cfg['max_txt_len']} exceeds the text model's max_position_embeddings "
                             f"({mcfg.text.max_position_embeddings})")
        return mcfg

    def build(self, mcfg, vision_model=None):
        from ..models.blip_pretrain import BlipPretrain

        model = BlipPretrain(mcfg)
        if vision_model is not None:  # --vision: the ViT's weights, and the momentum copy starts from them
            missing, unexpected = model.vision_model.load_state_dict(vision_model.state_dict(), strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(f"--vision: the weights do not fit the BLIP ViT (missing {missing[:8]}, unexpected "
                                 f"{unexpected[:8]})")
            model.copy_params()
        return model

    def prepare_tokenizer(self, tok):
        """BLIP's ``init_tokenizer``: [DEC] as bos (already added) and [ENC] as an additional special token."""
        if tok.convert_tokens_to_ids("[ENC]") in (None, tok.unk_token_id):
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tok

    def step_scalars(self, micro_step: int, steps_per_epoch: float, mcfg) -> dict:
        """BLIP's ``alpha = config['alpha'] * min(1, (epoch * len(loader) + i) / (2 * len(loader)))``."""
        return {"alpha": mcfg.alpha * min(1.0, micro_step / (2.0 * steps_per_epoch))}


def _check_derived(user: dict, derived: dict, nested: Optional[str], where: str = "") -> None:
    why = "the tokenizer" if where == "" else "--vision"
    items = [(k, v, user.get(k)) for k, v in derived.items() if k != nested and not isinstance(v, dict)]
    if nested:
        items += [(k, v, (user.get(nested) or {}).get(k)) for k, v in derived[nested].items()]
    for key, value, got in items:
        if got is not None and got != value:
            raise ValueError(f"--model: {where}{key}={got!r} contradicts {why} ({value!r}); leave it out")


MODELS = {"blip2": Blip2Kind(), "blip": BlipKind()}


def model_kind(model: Optional[dict]) -> ModelKind:
    """The :class:`ModelKind` of the ``model`` option (a mapping, maybe with "name"; None: BLIP-2 stage 1)."""
    name = (model or {}).get("name", "blip2")
    if name not in MODELS:
        raise ValueError(f"--model: unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def load_blip_vision(path: str):
    """(BlipVisionModel, image processor) of a local folder: a ``BlipVisionModel`` or any BLIP (v1) checkpoint
    (``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``, ...: its ``vision_model.*`` weights)."""
    from transformers import AutoConfig, AutoImageProcessor, BlipVisionModel

    from ..data.vision import _load_prefixed, quiet_transformers

    if not os.path.isdir(path):
        raise ValueError(f"--vision: {path!r} is not a folder (a local BlipVisionModel or BLIP model folder)")
    with quiet_transformers():
        try:
            cfg = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise ValueError(f"--vision: cannot read the model config in {path!r}: {exc}") from None
        if cfg.model_type == "blip_vision_model":
            model = BlipVisionModel.from_pretrained(path)
        elif cfg.model_type == "blip":
            model = BlipVisionModel(cfg.vision_config)
            _load_prefixed(model, path, "vision_model.")
        else:
            raise ValueError(f"--vision: BLIP trains its own ViT, a BlipVisionModel; {path!r} holds a "
                             f"{cfg.model_type!r} model (give a BlipVisionModel or BLIP folder, or none: a fresh ViT "
                             f"of the preset)")
        try:
            processor = AutoImageProcessor.from_pretrained(path)
        except Exception:  # no preprocessor_config.json: BLIP's own transform at the ViT's size
            processor = default_blip_processor(model.config.image_size)
    return model, processor


def default_blip_processor(size: int):
    """BLIP's evaluation transform as an HF image processor: bicubic resize to size x size, CLIP's mean/std."""
    from transformers import BlipImageProcessor

    from ..data.vision import quiet_transformers

    with quiet_transformers():
        return BlipImageProcessor(size={"height": size, "width": size})
