"""Configuration of the BLIP (v1) models (pre-training, retrieval, captioning, VQA, NLVR2, VisDial): one base class,
:class:`BlipConfigBase`, that every BLIP model's config subclasses by declaring its scalar fields;
:class:`BlipTaskConfig` is the one of the fine-tuned task models built on a stochastic-depth ViT (``BlipVQA``,
``BlipNLVR``, ``BlipVisDial``).

Each config holds ``text`` (an HF ``BlipTextConfig`` over BLIP's ``configs/med_config.json``: BERT-base with
cross-attention in every layer, [DEC] and [ENC] added, vocab 30524) and ``vision`` (an HF ``BlipVisionConfig``
over BLIP's ViT-B/16; timm's LayerNorm eps 1e-6, no dropout), given as config objects or dicts of their fields,
plus the scalar fields the subclass lists in ``FIELDS`` with their ``DEFAULTS``; ``IMAGE_SIZE`` is the ViT's default
resolution (the fine-tuned models run at 384 px, VQA at 480) and ``VISION`` overrides other ViT defaults. Every
field is validated by its kind (``KINDS``): a bad value is a
ValueError that names the config and the field; an unknown keyword is a TypeError, as for a plain signature.
``Config(**config.to_dict())`` rebuilds a config, ``Config.of(config)`` takes a config, a dict of its fields or None.

:meth:`BlipConfigBase.from_state_dict` reads the sizes of a checkpoint (HF names, :mod:`blipfast.convert`): the
ViT's width, depth, patch and image size (from its position embeddings), the text model's width, depth, vocabulary
and positions (heads of 64, as every BLIP checkpoint has them), the ITC width and the queue length.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from transformers import BlipVisionConfig

from .blip import blip_text_config

# BLIP's med_config.json (BERT-base with cross-attention, [DEC] and [ENC] added: vocab 30524), dropout on
TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12,
                     initializer_range=0.02, pad_token_id=0, bos_token_id=30522, sep_token_id=102, eos_token_id=2,
                     label_smoothing=0.1)
TEXT_FIELDS = tuple(TEXT_DEFAULTS) + ("encoder_hidden_size",)
# BLIP's ViT-B/16 at 224 px (timm's LayerNorm eps 1e-6, no dropout)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0,
                       initializer_range=0.02)
VISION_FIELDS = tuple(VISION_DEFAULTS)

# how each scalar field is checked (a subclass may add its own kinds with KINDS = {**BlipConfigBase.KINDS, ...})
KINDS = {
    "embed_dim": "count", "queue_size": "count", "k_test": "count", "num_beams": "count",
    "momentum": "unit", "alpha": "unit", "lm_label_smoothing": "unit", "top_p": "unit",
    "itm_floor": "nonneg", "repetition_penalty": "positive",
    "enc_token_id": "token", "bos_token_id": "token",
    "prompt_length": "position", "max_length": "position", "min_length": "position",
    "negative_all_rank": "bool", "vit_grad_ckpt": "bool",
    "vit_ckpt_layer": "layers", "merge_from_layer": "index", "drop_path_rate": "rate",
}


def config_fields(cfg, names) -> dict:
    """``{name: cfg.name}`` for ``names`` (the fields of an HF config that a BLIP config records)."""
    return {k: getattr(cfg, k) for k in names}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class BlipConfigBase:
    """A BLIP (v1) model configuration: ``text``, ``vision`` and the scalar ``FIELDS`` (see the module docstring)."""

    FIELDS: tuple = ()
    DEFAULTS: dict = {}
    IMAGE_SIZE: int = VISION_DEFAULTS["image_size"]  # the ViT's default resolution
    VISION: dict = {}  # other ViT defaults of this model over VISION_DEFAULTS
    KINDS: dict = KINDS

    def __init__(self, text: Any = None, vision: Any = None, **fields):
        who = type(self).__name__
        unknown = sorted(set(fields) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"{who}: unknown field(s) {unknown}; fields: {list(self.FIELDS)}")
        if isinstance(vision, BlipVisionConfig):
            vision = config_fields(vision, VISION_FIELDS)
        elif vision is not None and not isinstance(vision, dict):
            raise TypeError(f"{who}: vision must be a BlipVisionConfig or a dict, got {type(vision).__name__}")
        unknown = sorted(set(vision or {}) - set(VISION_FIELDS))
        if unknown:
            raise ValueError(f"{who}: unknown vision field(s) {unknown}; known: {list(VISION_FIELDS)}")
        self.vision = BlipVisionConfig(**{**VISION_DEFAULTS, "image_size": self.IMAGE_SIZE, **self.VISION,
                                          **(vision or {})})
        if text is not None and not isinstance(text, dict):
            text = config_fields(blip_text_config(text), TEXT_FIELDS)
        text = {**TEXT_DEFAULTS, "encoder_hidden_size": self.vision.hidden_size, **(text or {})}
        unknown = sorted(set(text) - set(TEXT_FIELDS))
        if unknown:
            raise ValueError(f"{who}: unknown text field(s) {unknown}; known: {list(TEXT_FIELDS)}")
        self.text = blip_text_config(text, is_decoder=True)  # cross-attention in every layer
        for name in self.FIELDS:
            setattr(self, name, fields.get(name, self.DEFAULTS[name]))
        self._validate()

    # ------------------------------------------------------------------------------------------
    # validation

    def _err(self, msg: str):
        raise ValueError(f"{type(self).__name__}: {msg}")

    def _check_field(self, name: str) -> None:
        v, kind = getattr(self, name), self.KINDS[name]
        if kind == "count" and not (_is_int(v) and v >= 1):
            self._err(f"{name} must be a positive int, got {v!r}")
        elif kind == "unit" and not (_is_num(v) and 0.0 <= v <= 1.0):
            self._err(f"{name} must be a float in [0, 1], got {v!r}")
        elif kind == "nonneg" and not (_is_num(v) and v >= 0):
            self._err(f"{name} must be a finite float >= 0, got {v!r}")
        elif kind == "positive" and not (_is_num(v) and v > 0):
            self._err(f"{name} must be a finite float > 0, got {v!r}")
        elif kind == "bool" and not isinstance(v, bool):
            self._err(f"{name} must be true or false, got {v!r}")
        elif kind == "token" and not (_is_int(v) and 0 <= v < self.text.vocab_size):
            self._err(f"{name} must be an int in [0, vocab_size={self.text.vocab_size}), got {v!r} (the text "
                      f"vocabulary must include [DEC] and [ENC])")
        elif kind == "position" and not (_is_int(v) and 0 <= v <= self.text.max_position_embeddings):
            self._err(f"{name} must be an int in [0, max_position_embeddings={self.text.max_position_embeddings}], "
                      f"got {v!r}")
        elif kind == "layers" and not (_is_int(v) and v >= 0):
            self._err(f"{name} must be an int >= 0 (the last blocks of the ViT; more than it has: all), got {v!r}")
        elif kind == "index" and not (_is_int(v) and v >= 0):
            self._err(f"{name} must be an int >= 0, got {v!r}")
        elif kind == "rate" and not (_is_num(v) and 0.0 <= v < 1.0):
            self._err(f"{name} must be a float in [0, 1), got {v!r}")

    def _validate(self) -> None:
        for name in self.FIELDS:
            self._check_field(name)
        if self.text.encoder_hidden_size != self.vision.hidden_size:
            self._err(f"text.encoder_hidden_size ({self.text.encoder_hidden_size}) must equal the vision width "
                      f"({self.vision.hidden_size})")
        if self.vision.hidden_size % self.vision.num_attention_heads:
            self._err(f"vision.hidden_size ({self.vision.hidden_size}) must be a multiple of "
                      f"vision.num_attention_heads ({self.vision.num_attention_heads})")

    # ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"text": config_fields(self.text, TEXT_FIELDS), "vision": config_fields(self.vision, VISION_FIELDS),
                **{k: getattr(self, k) for k in self.FIELDS}}

    def __eq__(self, other):
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    @classmethod
    def of(cls, config: Any, who: str = ""):
        """``config`` as this class: itself, a dict of its fields, or None (the defaults); a TypeError (naming
        ``who``, default the class) for anything else."""
        if isinstance(config, cls):
            return config
        if config is None:
            return cls()
        if isinstance(config, dict):
            return cls(**config)
        raise TypeError(f"{who or cls.__name__}: config must be a {cls.__name__} or a dict, got "
                        f"{type(config).__name__}")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, text_prefix: str = "text_encoder.", *, text: Any = None,
                        vision: Any = None, **fields):
        """A config whose sizes are those of ``state_dict`` (HF names: ``vision_model.*`` and the text model under
        ``text_prefix``); ``text`` / ``vision`` (dicts) and ``fields`` are set over what the weights tell (token
        ids, dropout, ...). ValueError when the weights lack the keys the sizes are read from."""
        v, t = "vision_model.", text_prefix
        need = [v + "embeddings.class_embedding", v + "embeddings.patch_embedding.weight",
                v + "embeddings.position_embedding", v + "encoder.layers.0.mlp.fc1.weight",
                t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight",
                t + "encoder.layer.0.intermediate.dense.weight"]
        missing = [k for k in need if k not in state_dict]
        if missing:
            raise ValueError(f"{cls.__name__}.from_state_dict: the weights lack {missing}")

        def layers(prefix):
            return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix))

        width = state_dict[v + "embeddings.class_embedding"].shape[-1]
        patch = state_dict[v + "embeddings.patch_embedding.weight"].shape[-1]
        grid = math.isqrt(state_dict[v + "embeddings.position_embedding"].shape[-2] - 1)
        sizes_v = dict(hidden_size=width, intermediate_size=state_dict[v + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                       num_hidden_layers=layers(v + "encoder.layers."), num_attention_heads=max(1, width // 64),
                       image_size=grid * patch, patch_size=patch)
        words = state_dict[t + "embeddings.word_embeddings.weight"]
        sizes_t = dict(vocab_size=words.shape[0], hidden_size=words.shape[1],
                       num_attention_heads=max(1, words.shape[1] // 64), num_hidden_layers=layers(t + "encoder.layer."),
                       intermediate_size=state_dict[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                       max_position_embeddings=state_dict[t + "embeddings.position_embeddings.weight"].shape[0])
        heads = {}  # the ITC width and the queue length, where the model has them
        if "embed_dim" in cls.FIELDS and "vision_proj.weight" in state_dict:
            heads["embed_dim"] = state_dict["vision_proj.weight"].shape[0]
        if "queue_size" in cls.FIELDS and "image_queue" in state_dict:
            heads["queue_size"] = state_dict["image_queue"].shape[1]
        return cls(text={**sizes_t, **(text or {})}, vision={**sizes_v, **(vision or {})}, **{**heads, **fields})


class BlipTaskConfig(BlipConfigBase):
    """Configuration of a BLIP task model on a stochastic-depth ViT (``BlipVQA``, ``BlipNLVR``, ``BlipVisDial``):
    ``text`` and ``vision`` (``image_size`` defaults to the task's :attr:`IMAGE_SIZE`), ``enc_token_id`` /
    ``bos_token_id`` ([ENC] / [DEC]) and ``drop_path_rate``, the ViT's stochastic depth (Salesforce BLIP builds the
    VQA and NLVR2 ViTs with ``create_vit(..., drop_path_rate=0.1)``, linearly increasing from 0 in the first block
    to 0.1 in the last; ViT-L always gets 0.1, ``0.1 or drop_path_rate`` in ``create_vit``). A subclass adds fields
    as any :class:`BlipConfigBase` does (``FIELDS = BlipTaskConfig.FIELDS + (...)``, their ``DEFAULTS`` and
    ``KINDS``)."""

    IMAGE_SIZE = 384
    FIELDS = ("enc_token_id", "bos_token_id", "drop_path_rate")
    DEFAULTS = dict(enc_token_id=30523, bos_token_id=30522, drop_path_rate=0.1)

    def _validate(self) -> None:
        super()._validate()
        v = self.vision
        if v.image_size % v.patch_size:
            self._err(f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size ({v.patch_size})")
