"""``blipfast train --model blip``: BLIP (v1) pre-training (:class:`blipfast.BlipPretrain`, Salesforce BLIP's
``BLIP_Pretrain``, SPEC.md section 5) through the generic trainer.

What differs from BLIP-2 stage 1 (:class:`blipfast.train.adapters.Stage1`, whose tokenizer handling, tokenisation
and checkpoints it shares):

- the ViT is part of the model and trains: the trainer loads no frozen tower (``trains_vision``), the batches hold
  ``pixel_values`` from :meth:`image_processor` (``--vision``'s own, else BLIP's transform at the ViT's size, also
  saved as ``image_processor/`` in the run folder), and ``--vision`` (a ``BlipVisionModel`` or BLIP folder) only
  gives the ViT's starting weights (the momentum copy starts from them too); a feature cache is refused;
- the tokenizer gets BLIP's ``[ENC]`` after ``[DEC]``; captions are cut to 30 words (BLIP's ``pre_caption(.., 30)``);
- the model config: a :class:`blipfast.BlipPretrainConfig` from the preset (``base``: ViT-B/16 at 224 px, BERT-base
  MED, queue 57600; ``tiny``), ``--model``'s fields, and what the tokenizer and ``--vision`` fix;
- ``alpha`` ramps as in BLIP's ``pretrain.py``, ``0.4 * min(1, i / (2 * steps per epoch))`` for micro-step i: it
  enters each batch as a 0-d tensor (:meth:`step_inputs`), so a compiled step or a CUDA graph (a static buffer)
  never changes shape or recompiles for it.
"""
from __future__ import annotations

import os

import torch

from .adapters import Stage1, merge

PRESETS = {
    "base": {},  # BlipPretrainConfig defaults: ViT-B/16 at 224 px, BERT-base MED, queue 57600
    "tiny": {"embed_dim": 64, "queue_size": 1024,
             "text": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256, "num_hidden_layers": 2,
                      "max_position_embeddings": 64},
             "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "image_size": 32, "patch_size": 8}},
}


def _check_derived(user: dict, derived: dict, why: str, where: str = "") -> None:
    for key, value in derived.items():
        if isinstance(value, dict):
            _check_derived(user.get(key) or {}, value, why, f"{where}{key}.")
        elif user.get(key) is not None and user[key] != value:
            raise ValueError(f"--model: {where}{key}={user[key]!r} contradicts {why} ({value!r}); leave it out")


def model_config(cfg: dict, tokenizer, vision_config=None):
    """The BlipPretrainConfig of the run: preset < ``model`` < the fields the tokenizer and ``--vision`` fix."""
    from ..models.blip_pretrain import TEXT_FIELDS, VISION_FIELDS, BlipPretrainConfig

    user = {k: v for k, v in (cfg["model"] or {}).items() if k != "name"}
    unknown = sorted(set(user) - set(BlipPretrainConfig.FIELDS) - {"text", "vision"})
    unknown += sorted(f"text.{k}" for k in set(user.get("text") or {}) - set(TEXT_FIELDS))
    unknown += sorted(f"vision.{k}" for k in set(user.get("vision") or {}) - set(VISION_FIELDS))
    if unknown:
        raise ValueError(f"--model: unknown field(s) {unknown}; BlipPretrainConfig has {list(BlipPretrainConfig.FIELDS)}"
                         f", text (BlipTextConfig: {list(TEXT_FIELDS)}) and vision (BlipVisionConfig: "
                         f"{list(VISION_FIELDS)})")
    sep = tokenizer.sep_token_id
    from_tok = {"bos_token_id": tokenizer.bos_token_id, "enc_token_id": tokenizer.convert_tokens_to_ids("[ENC]"),
                "text": {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                         "bos_token_id": tokenizer.bos_token_id, "sep_token_id": sep, "eos_token_id": sep}}
    _check_derived(user, from_tok, "the tokenizer")
    derived = dict(from_tok)
    if vision_config is not None:  # --vision fixes the ViT
        derived["vision"] = {k: getattr(vision_config, k) for k in VISION_FIELDS}
        _check_derived({"vision": user.get("vision") or {}}, {"vision": derived["vision"]}, "--vision")
    try:
        mcfg = BlipPretrainConfig(**merge(merge(PRESETS[cfg["preset"]], user), derived))
    except TypeError as exc:
        raise ValueError(f"--model: {exc}") from None
    if cfg["max_txt_len"] > mcfg.text.max_position_embeddings:
        raise ValueError(f"--max-txt-len {cfg['max_txt_len']} exceeds the text model's max_position_embeddings "
                         f"({mcfg.text.max_position_embeddings})")
    return mcfg


class BlipPretrainAdapter(Stage1):
    """:class:`blipfast.BlipPretrain`: ITC (momentum encoders, queues) + ITM + LM (see the module docstring)."""

    title = "BLIP pre-training"
    trains_vision = True
    vision_kind = "blip"  # the synthetic set's ViT
    max_words = 30  # BLIP's pretrain_dataset: pre_caption(caption, 30)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.vit = None
        self.alpha = None

    def image_processor(self, cfg: dict, dist):
        """The processor the images go through (and, with ``--vision``, the ViT's starting weights, kept for
        :meth:`build`); rank 0 saves it in the run folder."""
        from ..data.vision import default_blip_processor, load_blip_vision

        if cfg["vision"] is not None:
            self.vit, processor = load_blip_vision(cfg["vision"])
        else:
            size = merge(PRESETS[cfg["preset"]], cfg["model"] or {}).get("vision", {}).get("image_size", 224)
            processor = default_blip_processor(size)
        if dist.main:
            processor.save_pretrained(os.path.join(cfg["out"], "image_processor"))
        return processor

    def tokenizer(self, cfg: dict, ann, dist):
        from ..data.tokenizer import add_enc_token

        trained = cfg["tokenizer"] is None
        tok = add_enc_token(super().tokenizer(cfg, ann, dist))
        if trained and dist.main:  # the run's tokenizer folder with [ENC], as the model knows it
            tok.save_pretrained(cfg["tokenizer"])
        return tok

    def build(self, cfg: dict, tok, width, device, fresh: bool):
        from ..models.blip_pretrain import BlipPretrain
        from . import checkpoint as ckpt

        mcfg = model_config(cfg, tok, None if self.vit is None else self.vit.config)
        cfg["model"] = {"name": "blip", **mcfg.to_dict()}
        self.alpha = mcfg.alpha
        model = BlipPretrain(mcfg)
        if self.vit is not None:  # --vision: the ViT's weights; the momentum copy starts from them
            missing, unexpected = model.vision_model.load_state_dict(self.vit.state_dict(), strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(f"--vision: the weights do not fit the BLIP ViT (missing {missing[:8]}, unexpected "
                                 f"{unexpected[:8]})")
            model.copy_params()
            self.vit = None
        model = model.to(device).train()
        if cfg["init"] is not None and fresh:
            ckpt.load_init_weights(cfg["init"], model)
        return model

    def step_inputs(self, micro_step: int, steps_per_epoch: float) -> dict:
        """BLIP's ``alpha = config['alpha'] * min(1, (epoch * len(loader) + i) / (2 * len(loader)))``."""
        return {"alpha": self.alpha * min(1.0, micro_step / (2.0 * steps_per_epoch))}

    def step_loss(self, model, pixel_values, inp: dict, seed):
        out = model(pixel_values, inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"],
                    image_ids=inp["image_id"] if self.image_ids else None, sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach().float()
