"""``blip2-stage2`` (``--stage 2``): BLIP-2 stage 2, :class:`blipfast.Blip2Stage2` (docs/semantics.md): the
stage-1 Q-Former, queries and ``ln_vision`` (from ``--init``) with a fresh ``language_projection`` into the frozen
LLM of ``--llm``, on the LM loss of the captions (decoder-only: ``prompt + caption + suffix`` with -100 on the
prompt's tokens and padding; seq2seq: the prompt in the encoder, the caption the decoder target). The ViT is the
trainer's frozen tower (or the feature cache), so the model is built features-only.

The Q-Former's configuration: the ``--init`` run's ``config.yaml`` (a blipfast run or checkpoint: stage 1, stage 2,
or a fine-tuning run of the stage-2 model such as ``blip2-caption``, whose ViT is not used here), else a
``config.json`` beside the weights when ``--model`` gives some Q-Former fields, else what
:meth:`blipfast.Blip2Stage2.from_pretrained_parts` reads from the weights; ``--model`` (``{"qformer": {...},
"ln_vision_eps": x}``) goes over it. Checkpoints hold only the trained tensors (HF names: ``qformer.*``,
``query_tokens``, ``vision_model.post_layernorm.*``, ``language_projection.*``) with a ``config.json`` holding the
Q-Former's config, so a checkpoint folder is itself a ``stage1=`` of ``from_pretrained_parts``.
"""
from __future__ import annotations

import json
import os

import torch

from .base import Task, _need, check_model_fields, merge, qformer_fields, register


@register
class Blip2Stage2Task(Task):
    """:class:`blipfast.Blip2Stage2`: the LM loss of the captions through the frozen LLM (see the module docstring)."""

    name = "blip2-stage2"
    recipe = "blip2-stage2"  # LAVIS' pretrain_stage2.yaml
    title = "stage 2"
    losses = ("loss",)
    stage = 2
    spelling = "--stage 2"
    # LAVIS' stage-2 recipe (lavis/projects/blip2/train/pretrain_stage2.yaml): lr 1e-4 -> 1e-5 cosine, warm-up from
    # 1e-6 over 2000 steps, weight decay 0.05, batch 64 per GPU; the other defaults are stage 1's
    defaults = {"batch_size": 64, "warmup_steps": 2000}
    PAD_VALUES = {"labels": -100}  # padding of the other keys: 0, or the pad token for ids

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.keys: tuple = ()
        self.llm = cfg["llm"]

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        cls.check_image_options(cfg)
        _need(cfg["llm"] is not None, "--stage 2 needs --llm LLM_DIR (a local Hugging Face LLM folder)")
        _need(os.path.isdir(cfg["llm"]), f"--llm: {cfg['llm']!r} is not a folder (a local Hugging Face LLM folder)")
        _need(cfg["init"] is not None, "--stage 2 needs --init STAGE1_CKPT (the stage-1 Q-Former, queries and "
              "ln_vision)")
        _need(not cfg["cuda_graph"], "--cuda-graph is for stage 1 (the HF LLM's mask checks synchronise with the "
              "host); use --compile")

    def tokenizer(self, cfg: dict, ann, dist):
        from transformers import AutoTokenizer

        from ...data.vision import quiet_transformers

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
        return tok, path

    def _qformer_config(self, cfg: dict, src):
        """(Q-Former config or None, ln_vision epsilon or None): the init's run config.yaml < ``--model``."""
        from ...models.blip2 import Blip2Stage1Config
        from ...models.qformer import QFormerConfig

        user = cfg["model"] or {}
        check_model_fields(user, ("ln_vision_eps",), {"qformer": qformer_fields()}, "stage 2")
        derived: dict = {}
        run, meta = src.run_config, src.hf_config or {}
        if run is not None and run.get("model"):
            if run.get("stage", 1) == 2 or (meta.get("blipfast") or {}).get("stage") == 2:  # a stage-2 model's run
                # (blip2-stage2, or a task of its family such as blip2-caption: its checkpoint says stage 2)
                derived = {k: v for k, v in run["model"].items() if k in ("qformer", "ln_vision_eps")}
            else:
                s1 = Blip2Stage1Config(**run["model"])
                derived = {"qformer": s1.qformer.to_dict(), "ln_vision_eps": s1.ln_vision_eps}
        elif user.get("qformer") and meta.get("model_type") in ("blip-2", "instructblip") \
                and meta.get("qformer_config"):  # a partial --model over an HF-style config.json
            derived = {"qformer": QFormerConfig(meta["qformer_config"]).to_dict()}
        spec = merge(derived, user)
        return spec.get("qformer"), spec.get("ln_vision_eps")

    def build(self, cfg: dict, tok, width: int, device, fresh: bool):
        from ... import convert
        from ...data.vision import quiet_transformers
        from ...models.blip2_stage2 import Blip2Stage2
        from ...models.qformer import QFormerConfig
        from ...options import resolve_dtype

        src = convert.resolve_source(cfg["init"], what="--init")
        qcfg, eps = self._qformer_config(cfg, src)
        dtype = resolve_dtype(cfg["llm_dtype"], device, flag="--llm-dtype")
        try:
            with quiet_transformers():
                model = Blip2Stage2.from_pretrained_parts(src.weights, cfg["llm"], None, qformer_config=qcfg,
                                                          dtype=dtype, device=device, ln_vision_eps=eps)
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
        record = {"qformer": QFormerConfig(model.model.config.qformer_config).to_dict(), "ln_vision_eps": ln.eps}
        # the keys tokenize gives (set here: a stream tokenises in its loader workers, whose state stays there)
        self.keys = ("input_ids", "attention_mask", "labels") + (("decoder_attention_mask",)
                                                                 if model.is_encoder_decoder else ())
        return model.train(), record

    def tokenize(self, model, tok, captions, cfg: dict) -> dict:
        """The captions as Blip2Stage2.make_text_batch tokenises them, each key padded to one width (the texts to
        ``--max-txt-len``; a seq2seq LLM's encoder input, the prompt, to the prompt's length): fixed shapes for every
        step, whatever the batch."""
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
        return out

    def step_loss(self, model, embeds, inp: dict, seed):
        loss = model(image_embeds=embeds, **{k: inp[k] for k in self.keys}).loss
        return loss, loss.detach().float().reshape(1)

    def save(self, model, folder: str, step: int, lavis: bool) -> None:
        from safetensors.torch import save_file

        from ... import convert
        from ...models.instructblip import blip2_names  # (an InstructBLIP Q-Former's embeddings: LAVIS' names)

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
            torch.save({"model": convert.hf_to_lavis(blip2_names(sd), language_projection=proj).state_dict,
                        "step": step},
                       os.path.join(folder, "lavis.pth"))

    def load(self, model, folder: str) -> None:
        from ... import convert

        try:
            model.load_trainable_state_dict(convert.load_state_dict(os.path.join(folder, "model.safetensors")),
                                            strict=True)
        except ValueError as exc:
            raise ValueError(f"--resume: {folder!r} does not fit the model: {exc}") from None
