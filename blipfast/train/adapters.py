"""What ``blipfast train`` trains: one adapter per stage between the generic trainer (data, optimizer, schedule,
steps, checkpoints, DDP, logs) and a model.

An adapter gives the trainer

- ``losses``: the names of the logged losses (the first is the one optimised);
- ``tokenizer(cfg, ann, dist)``: the tokenizer of the captions; ``build(cfg, tok, width, device, fresh)``: the
  model on ``device`` (its frozen parts frozen), from ``--init`` when ``fresh`` (not resuming);
  ``tokenize(model, tok, captions, cfg)``: every caption's fixed-width token tensors, one dict of [P, ...];
- ``step_loss(model, embeds, inp, seed)``: (loss to back-propagate, detached float32 losses [len(losses)]) of one
  micro-batch on the device (``embeds``: the ViT tokens before ``ln_vision``), without a host sync;
- ``save(model, folder, step, lavis)`` / ``load(model, folder)``: the weights of a checkpoint (the trained ones).

:class:`Stage1` trains :class:`blipfast.Blip2Stage1` (ITC + ITM + ITG); ``--model blip`` trains
:class:`blipfast.BlipPretrain` through :class:`blipfast.train.adapter_blip.BlipPretrainAdapter`. :class:`Stage2` trains
:class:`blipfast.Blip2Stage2` (SPEC.md section 4): the stage-1 Q-Former, queries and ``ln_vision`` (from
``--init``) with a fresh ``language_projection`` into the frozen LLM of ``--llm``, on the LM loss of the captions
(decoder-only: ``prompt + caption + suffix`` with -100 on the prompt's tokens and padding; seq2seq: the prompt in
the encoder, the caption the decoder target). The ViT is the trainer's frozen tower (or the feature cache), so the
model is built features-only. Its checkpoints hold only the trained tensors (HF names: ``qformer.*``,
``query_tokens``, ``vision_model.post_layernorm.*``, ``language_projection.*``) with a ``config.json`` holding
the Q-Former's config, so a checkpoint folder is itself a ``stage1=`` of
:meth:`blipfast.Blip2Stage2.from_pretrained_parts`.
"""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt
from .config import PRESETS, read_config_file
from .logger import LOSSES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_adapter(cfg: dict):
    from .config import model_name

    if model_name(cfg["model"]) == "blip":  # BLIP (v1) pre-training
        from .adapter_blip import BlipPretrainAdapter

        return BlipPretrainAdapter(cfg)
    return Stage2(cfg) if cfg["stage"] == 2 else Stage1(cfg)


# ----------------------------------------------------------------------------------------------
# stage 1


def model_config(cfg: dict, tokenizer, width: int):
    """The Blip2Stage1Config of the run: preset < ``model`` < the fields the tokenizer and vision model fix."""
    from ..models.blip2 import Blip2Stage1Config
    from ..models.qformer import _DEFAULTS as QF_FIELDS

    user = {k: v for k, v in (cfg["model"] or {}).items() if k != "name"}  # name: blip2 (--model blip2)
    unknown = sorted(set(user) - set(Blip2Stage1Config.FIELDS) - {"qformer"})
    unknown += sorted(f"qformer.{k}" for k in set(user.get("qformer") or {}) - set(QF_FIELDS))
    if unknown:
        raise ValueError(f"--model: unknown field(s) {unknown}; Blip2Stage1Config has {list(Blip2Stage1Config.FIELDS)} "
                         f"and qformer (QFormerConfig: {sorted(QF_FIELDS)})")
    derived = {"max_txt_len": cfg["max_txt_len"], "bos_token_id": tokenizer.bos_token_id,
               "qformer": {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                           "encoder_hidden_size": width}}
    why = {"max_txt_len": "--max-txt-len", "bos_token_id": "the tokenizer's [DEC]", "vocab_size": "the tokenizer",
           "pad_token_id": "the tokenizer", "encoder_hidden_size": "the vision model's width"}
    for key, value in [(k, v) for k, v in derived.items() if k != "qformer"] + list(derived["qformer"].items()):
        got = (user.get("qformer") or {}).get(key) if key in derived["qformer"] else user.get(key)
        if got is not None and got != value:
            raise ValueError(f"--model: {key}={got!r} contradicts {why[key]} ({value!r}); leave it out")
    try:
        return Blip2Stage1Config(**merge(merge(PRESETS[cfg["preset"]], user), derived))
    except TypeError as exc:
        raise ValueError(f"--model: {exc}") from None


class Stage1:
    """:class:`blipfast.Blip2Stage1`: ITC + ITM + ITG, a BERT-style tokenizer (trained on the captions by default)."""

    losses = LOSSES

    def __init__(self, cfg: dict):
        self.image_ids = cfg["image_ids"]

    def tokenizer(self, cfg: dict, ann, dist):
        from ..data import load_tokenizer, train_wordpiece

        if cfg["tokenizer"] is not None:
            return load_tokenizer(cfg["tokenizer"])
        tok_dir = os.path.join(cfg["out"], "tokenizer")
        if dist.main:
            train_wordpiece(ann.captions, cfg["vocab_size"]).save_pretrained(tok_dir)
        dist.barrier()
        cfg["tokenizer"] = tok_dir
        return load_tokenizer(tok_dir)

    def build(self, cfg: dict, tok, width: int, device, fresh: bool):
        from ..models.blip2 import Blip2Stage1

        mcfg = model_config(cfg, tok, width)
        cfg["model"] = mcfg.to_dict()
        model = Blip2Stage1(mcfg).to(device).train()
        if cfg["init"] is not None and fresh:
            ckpt.load_init_weights(cfg["init"], model)
        return model

    def tokenize(self, model, tok, captions, cfg: dict) -> dict:
        from ..data import tokenize

        ids, mask = tokenize(tok, captions, cfg["max_txt_len"])
        return {"input_ids": ids, "attention_mask": mask}

    def step_loss(self, model, embeds, inp: dict, seed):
        out = model(embeds, inp["input_ids"], inp["attention_mask"],
                    image_ids=inp["image_id"] if self.image_ids else None, sample_seed=seed)
        return out.loss, torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach().float()

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        from safetensors.torch import save_model

        save_model(model, os.path.join(folder, "model.safetensors"), metadata={"step": str(step), "format": "blipfast"})
        if lavis:
            torch.save({"model": model.to_lavis_state_dict(), "step": step}, os.path.join(folder, "lavis.pth"))

    def load(self, model, folder: str) -> None:
        from safetensors.torch import load_model

        missing, unexpected = load_model(model, os.path.join(folder, "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"--resume: {folder!r} does not fit the model (missing {sorted(missing)[:8]}, unexpected "
                             f"{sorted(unexpected)[:8]})")


# ----------------------------------------------------------------------------------------------
# stage 2


def stage1_weights(path: str) -> str:
    """The weights file/folder of ``--init`` in stage 2: a blipfast run folder gives its last checkpoint's
    ``model.safetensors``, a checkpoint folder its ``model.safetensors``; anything else is passed on as it is."""
    if not os.path.exists(path):
        raise ValueError(f"--init: {path!r} does not exist")
    if os.path.isdir(path):
        found = ckpt.list_checkpoints(path)
        if found:
            return os.path.join(found[-1], "model.safetensors")
        if os.path.isfile(os.path.join(path, "state.pt")):
            return os.path.join(path, "model.safetensors")
    return path


def _run_config_of(weights: str):
    """The ``config.yaml`` of the blipfast run a checkpoint's weights file belongs to, or None."""
    folder = os.path.dirname(os.path.abspath(weights))
    run = os.path.dirname(folder)
    if os.path.basename(weights) == "model.safetensors" and os.path.isfile(os.path.join(folder, "state.pt")) \
            and os.path.isfile(os.path.join(run, "config.yaml")):
        return read_config_file(os.path.join(run, "config.yaml"))
    return None


class Stage2:
    """:class:`blipfast.Blip2Stage2`: the LM loss of the captions through the frozen LLM (see the module docstring)."""

    losses = ("loss",)
    PAD_VALUES = {"labels": -100}  # padding of the other keys: 0, or the pad token for ids

    def __init__(self, cfg: dict):
        self.keys: tuple = ()

    def tokenizer(self, cfg: dict, ann, dist):
        from transformers import AutoTokenizer

        from ..data.vision import quiet_transformers

        path = cfg["tokenizer"] or cfg["llm"]
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many kinds for a folder it cannot read
            raise ValueError(f"--{'tokenizer' if cfg['tokenizer'] else 'llm'}: cannot load a tokenizer from "
                             f"{path!r}: {exc}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # as Blip2Stage2.make_text_batch (OPT/Llama-style tokenizers)
        if tok.pad_token is None:
            raise ValueError(f"--llm: the tokenizer of {path!r} has neither a pad nor an EOS token")
        cfg["tokenizer"] = path
        return tok

    def _qformer_config(self, cfg: dict, weights: str):
        """(Q-Former config or None, ln_vision epsilon or None): the init's run config.yaml < ``--model``."""
        from ..models.blip2 import Blip2Stage1Config
        from ..models.qformer import _DEFAULTS as QF_FIELDS
        from ..models.qformer import QFormerConfig

        user = cfg["model"] or {}
        unknown = sorted(set(user) - {"qformer", "ln_vision_eps"})
        unknown += sorted(f"qformer.{k}" for k in set(user.get("qformer") or {}) - set(QF_FIELDS))
        if unknown:
            raise ValueError(f"--model: unknown field(s) {unknown}; stage 2 takes qformer (QFormerConfig: "
                             f"{sorted(QF_FIELDS)}) and ln_vision_eps")
        derived: dict = {}
        run = _run_config_of(weights)
        hf = os.path.join(weights if os.path.isdir(weights) else os.path.dirname(weights), "config.json")
        if run is not None and run.get("model"):
            if run.get("stage", 1) == 2:
                derived = dict(run["model"])
            else:
                s1 = Blip2Stage1Config(**run["model"])
                derived = {"qformer": s1.qformer.to_dict(), "ln_vision_eps": s1.ln_vision_eps}
        elif user.get("qformer") and os.path.isfile(hf):  # a partial --model over an HF-style config.json
            with open(hf) as fh:
                meta = json.load(fh)
            if meta.get("model_type") in ("blip-2", "instructblip") and meta.get("qformer_config"):
                derived = {"qformer": QFormerConfig(meta["qformer_config"]).to_dict()}
        spec = merge(derived, user)
        return spec.get("qformer"), spec.get("ln_vision_eps")

    def build(self, cfg: dict, tok, width: int, device, fresh: bool):
        from ..data.vision import quiet_transformers
        from ..models.blip2_stage2 import Blip2Stage2
        from ..models.qformer import QFormerConfig

        weights = stage1_weights(cfg["init"])
        qcfg, eps = self._qformer_config(cfg, weights)
        name = cfg["llm_dtype"]
        dtype = DTYPES[name] if name != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            with quiet_transformers():
                model = Blip2Stage2.from_pretrained_parts(weights, cfg["llm"], None, qformer_config=qcfg, dtype=dtype,
                                                          device=device, ln_vision_eps=eps)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise ValueError(f"--stage 2: cannot build the model from --init {cfg['init']!r} and --llm "
                             f"{cfg['llm']!r}: {exc}") from None
        ln = model.model.vision_model.post_layernorm
        if ln.normalized_shape[0] != width:
            raise ValueError(f"--init: the checkpoint's ln_vision is {ln.normalized_shape[0]} wide, the vision "
                             f"features {width} (--vision / --features)")
        n_emb = model.language_model.get_input_embeddings().num_embeddings
        if len(tok) > n_emb:
            raise ValueError(f"--tokenizer: {len(tok)} tokens, more than the LLM's {n_emb} embeddings")
        cfg["model"] = {"qformer": QFormerConfig(model.model.config.qformer_config).to_dict(), "ln_vision_eps": ln.eps}
        self.llm = cfg["llm"]
        return model.train()

    def tokenize(self, model, tok, captions, cfg: dict) -> dict:
        """Every caption as Blip2Stage2.make_text_batch tokenises it, each key padded to one width (the texts to
        ``--max-txt-len``): fixed shapes for every step."""
        prompt = cfg["prompt"] or ""
        if prompt and not model.is_encoder_decoder and not prompt[-1].isspace():
            prompt += " "
        pad = {"input_ids": tok.pad_token_id, **self.PAD_VALUES}
        parts: dict = {}
        chunk = 4096
        for s in range(0, len(captions), chunk):
            b = model.make_text_batch(tok, captions[s:s + chunk], prompt, max_length=cfg["max_txt_len"],
                                      suffix=cfg["text_suffix"])
            for k, v in b.items():
                parts.setdefault(k, []).append(v)
        out = {}
        for k, vs in parts.items():
            width = cfg["max_txt_len"] if k in ("labels", "decoder_attention_mask") or not model.is_encoder_decoder \
                else max(v.shape[1] for v in vs)
            t = torch.full((len(captions), width), pad.get(k, 0), dtype=torch.int32)
            row = 0
            for v in vs:
                t[row:row + v.shape[0], :v.shape[1]] = v
                row += v.shape[0]
            out[k] = t
        self.keys = tuple(out)
        return out

    def step_loss(self, model, embeds, inp: dict, seed):
        loss = model(image_embeds=embeds, **{k: inp[k] for k in self.keys}).loss
        return loss, loss.detach().float().reshape(1)

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        from safetensors.torch import save_file

        from .. import convert

        sd = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"step": str(step), "format": "blipfast"})
        ln = model.model.vision_model.post_layernorm
        meta = {"model_type": "blip-2", "qformer_config": model.model.config.qformer_config.to_dict(),
                "vision_config": {"hidden_size": ln.normalized_shape[0], "layer_norm_eps": ln.eps},
                "num_query_tokens": model.num_query_tokens,
                "blipfast": {"stage": 2, "step": step, "llm": self.llm,
                             "note": "the trained parts of a BLIP-2 stage-2 model; the LLM and the ViT are not here"}}
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        if lavis:
            proj = "t5_proj" if model.is_encoder_decoder else "opt_proj"
            torch.save({"model": convert.hf_to_lavis(sd, language_projection=proj).state_dict, "step": step},
                       os.path.join(folder, "lavis.pth"))

    def load(self, model, folder: str) -> None:
        from safetensors.torch import load_file

        try:
            model.load_trainable_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
        except ValueError as exc:
            raise ValueError(f"--resume: {folder!r} does not fit the model: {exc}") from None
