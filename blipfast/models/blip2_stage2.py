"""Stage-2 BLIP-2 (docs/blip2-stage2.md): the stage-1 Q-Former bridged to a frozen LLM, on blipfast's Q-Former.

:class:`Blip2Stage2` wraps a Hugging Face ``Blip2ForConditionalGeneration`` (or
``InstructBlipForConditionalGeneration``) whose Q-Former :func:`blipfast.apply_blipfast_to_blip2` swapped for
blipfast's (same parameters, same keys):

- image tokens: ``pixel_values`` through the HF ViT, or ``image_embeds`` = the ViT's tokens BEFORE ``ln_vision``
  (HF's ``vision_model.post_layernorm``), as a feature cache stores them; both then go through ``ln_vision``;
- the Q-Former turns the learned queries (plus, for InstructBLIP, the instruction) into Q outputs,
  ``language_projection`` maps them to the LLM's width and they are prepended to the text embeddings (attention
  mask ones for them);
- decoder-only LLMs (OPT, ...): one LM loss over [queries | prompt + text], labels -100 on query and prompt
  positions (and padding); seq2seq LLMs (Flan-T5, ...): queries + prompt go to the encoder, the text is the
  decoder target;
- the LLM and the ViT are frozen (``requires_grad=False``; the ViT also stays in eval mode); the Q-Former, the
  queries, ``language_projection`` and (as in LAVIS) ``ln_vision`` are trained.

Built with :meth:`Blip2Stage2.from_pretrained_parts` (a stage-1 checkpoint + a local LLM folder [+ a ViT]) or
:meth:`Blip2Stage2.from_hf` (an HF BLIP-2 / InstructBLIP model or folder). For a trainer: ``loss(batch)``,
``trainable_parameters()``, ``trainable_state_dict()`` / ``load_trainable_state_dict()``, ``make_text_batch()``.
The step adds no host synchronisation of its own (the HF LLM's eager mask checks do sync; under
``torch.compile`` they are skipped). Generation: ``generate(...)`` runs transformers' ``generate`` on the LLM with
the image prefix as ``inputs_embeds`` (LAVIS' way, no image placeholder tokens needed in the prompt);
``generate(..., settings="coco")`` decodes with LAVIS' settings (:meth:`Blip2Stage2.decoding_settings`, its
lengths as new-token counts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import ModelOutput

from .. import convert
from .hf_swap import apply_blipfast_to_blip2
from .instructblip import InstructBlipQFormer, blip2_names, instruct_qformer
from .llm import LAVIS_T5_ACTIVATION, DecodingSettings, configure_attention, decoding_settings, load_llm

_LN = "vision_model.post_layernorm."
_TEXT_FFN = r"encoder\.layer\.\d+\.(intermediate|output)\."  # the stage-1 text FFN: no part of stage 2
_BATCH_KEYS = frozenset({"pixel_values", "image_embeds", "input_ids", "attention_mask", "labels", "decoder_input_ids",
                         "decoder_attention_mask", "qformer_input_ids", "qformer_attention_mask"})
IGNORE_INDEX = -100


@dataclass
class Stage2Output(ModelOutput):
    """``loss`` (with labels) and the LLM's ``logits`` (decoder-only: over [queries | text])."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


class Blip2Stage2(nn.Module):
    """BLIP-2 stage 2 over an HF ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``
    (patched in place; reachable as ``.model``). See the module docstring."""

    vision_trained = False  # the ViT body trains (set_vision_trainable)

    def __init__(self, model: nn.Module, *, train_ln_vision: bool = True):
        super().__init__()
        for attr in ("vision_model", "qformer", "query_tokens", "language_projection", "language_model"):
            if not hasattr(model, attr):
                raise TypeError(f"Blip2Stage2: expected an HF Blip2ForConditionalGeneration or "
                                f"InstructBlipForConditionalGeneration, got {type(model).__name__} (no `{attr}`)")
        apply_blipfast_to_blip2(model)
        self.model = model
        self.train_ln_vision = bool(train_ln_vision)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in [*model.qformer.parameters(), model.query_tokens, *model.language_projection.parameters()]:
            p.requires_grad_(True)
        for p in model.vision_model.post_layernorm.parameters():
            p.requires_grad_(self.train_ln_vision)
        self.train(model.training)

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_hf(cls, model: Union[str, Path, nn.Module], *, dtype: Optional[torch.dtype] = None,
                attn_implementation: Optional[str] = "auto", device=None, train_ln_vision: bool = True):
        """From an HF BLIP-2 / InstructBLIP conditional-generation model, or a local folder holding one
        (``save_pretrained``); the LLM gets the attention :func:`blipfast.models.llm.select_attn_implementation`
        picks (FlashAttention-2 when usable). The model's configuration is kept as it is (transformers' converted
        BLIP-2 Flan-T5 folders already say LAVIS' ``dense_act_fn = "gelu"``), but for the ``ln_vision`` epsilon a
        ``blipfast export`` folder records in ``config.blipfast``."""
        if not isinstance(model, nn.Module):
            model = load_hf_generation_model(model, dtype=dtype)
        eps = (getattr(model.config, "blipfast", None) or {}).get("ln_vision_eps")
        if eps is not None:  # an exported blipfast run: LAVIS' ln_vision epsilon, which transformers cannot say
            model.vision_model.post_layernorm.eps = float(eps)
        if device is not None:
            model.to(device)
        configure_attention(model.language_model, attn_implementation, device=device, dtype=dtype)
        return cls(model, train_ln_vision=train_ln_vision)

    @classmethod
    def from_pretrained_parts(cls, stage1, llm, vision=None, *, qformer_config=None,
                              dtype: Optional[torch.dtype] = None, attn_implementation: Optional[str] = "auto",
                              device=None, train_ln_vision: bool = True, ln_vision_eps: Optional[float] = None,
                              t5_activation: Optional[str] = LAVIS_T5_ACTIVATION, instruct: bool = False):
        """Stage 2 from a stage-1 checkpoint and a local LLM.

        - ``stage1``: a LAVIS ``.pth`` (``{"model": state_dict}``), an HF/blipfast-named safetensors file or folder,
          a state dict or a module with ``state_dict()``; it must hold the Q-Former (``qformer.*`` /
          ``Qformer.bert.*``), ``query_tokens`` and ``ln_vision`` (``vision_model.post_layernorm.*`` /
          ``ln_vision.*``); a ``language_projection`` (``opt_proj`` / ``t5_proj``) in it is used, else a fresh
          ``nn.Linear`` (PyTorch's init, as LAVIS). The stage-1 text FFN, embeddings and ITC/ITM/LM heads are not
          used in stage 2.
        - ``llm``: a local folder (``AutoModelForCausalLM`` or ``AutoModelForSeq2SeqLM`` after its config) or a model.
          A T5 (Flan-T5) gets LAVIS' exact GELU in its feed-forwards (``t5_activation="gelu"``, LAVIS'
          ``dense_act_fn``, where Flan-T5's config says ``gelu_new``; a module is changed in place; None keeps the
          config's; :func:`blipfast.models.llm.set_t5_activation`). :meth:`from_hf` keeps the model's config.
        - ``vision``: None (features only: ``image_embeds`` in, no ViT), a ``Blip2VisionModel`` folder or module, or a
          ``Blip2VisionConfig`` whose weights the checkpoint holds (LAVIS ``visual_encoder.*``). Modules given for
          ``llm`` / ``vision`` are used, not copied: they get frozen, and the ViT gets the checkpoint's ln_vision.
        - ``qformer_config``: an HF ``Blip2QFormerConfig`` / ``Blip2Config`` / dict / ``QFormerConfig``; default: the
          ``config.json`` beside the checkpoint, else read from the weights' shapes with 64-wide heads (BERT's).
        - ``dtype``: of the frozen LLM and ViT (the trained parts stay fp32); ``ln_vision_eps`` (default, with a ViT:
          the ViT's ``layer_norm_eps``; without one: a ``Blip2Stage1``'s own; 1e-5 (LAVIS') for LAVIS- and
          blipfast-named checkpoints, 1e-6 for HF-named ones, HF's default).
        - ``instruct``: the InstructBLIP form (text beside the queries), the Q-Former's text half from ``stage1``
          (:func:`blipfast.models.instructblip.instruct_qformer`).
        """
        from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerModel, InstructBlipConfig,
                                  InstructBlipForConditionalGeneration)

        sd, qcfg_hint, eps_hint = read_stage1(stage1)
        qcfg = stage2_qformer_config(qformer_config if qformer_config is not None else qcfg_hint, sd)
        lm = load_llm(llm, dtype=dtype, attn_implementation=attn_implementation, device=device,
                      t5_activation=t5_activation)
        vm = _vision_model(vision, sd, dtype)
        ln_w = sd[_LN + "weight"]
        if vm is not None and vm.config.hidden_size != ln_w.shape[0]:
            raise ValueError(f"vision: width {vm.config.hidden_size} != the checkpoint's ln_vision width "
                             f"{ln_w.shape[0]}")
        if ln_w.shape[0] != qcfg.encoder_hidden_size:
            raise ValueError(f"stage1: ln_vision width {ln_w.shape[0]} != the Q-Former's encoder_hidden_size "
                             f"{qcfg.encoder_hidden_size}")
        if vm is not None:
            vcfg = vm.config
        else:
            from transformers import Blip2VisionConfig

            eps = ln_vision_eps if ln_vision_eps is not None else eps_hint
            width = ln_w.shape[0]  # the config of an absent ViT: its width and ln_vision, no layers
            vcfg = Blip2VisionConfig(hidden_size=width, layer_norm_eps=eps, num_hidden_layers=0,
                                     num_attention_heads=16 if width % 16 == 0 else 1)
        num_query = sd["query_tokens"].shape[1]
        if instruct:  # the Q-Former's text half from the checkpoint too
            shell, qformer = InstructBlipForConditionalGeneration, instruct_qformer(qcfg, sd)
            config = InstructBlipConfig(vision_config={**vcfg.to_dict(), "model_type": "instructblip_vision_model"},
                                        qformer_config=qformer.config, text_config=lm.config, num_query_tokens=num_query)
        else:
            shell, qformer = Blip2ForConditionalGeneration, Blip2QFormerModel(qcfg)
            convert.load_into(qformer, sd, prefix="qformer.", ignore=(_TEXT_FFN,), what="stage1",
                              into=f"qformer_config ({qcfg.hidden_size} wide, {qcfg.num_hidden_layers} layers)")
            config = Blip2Config(vision_config=vcfg, qformer_config=qcfg, text_config=lm.config,
                                 num_query_tokens=num_query)
        with torch.device("meta"):  # only the shell: every part is replaced below, nothing is initialised twice
            model = shell(config)
        model.language_model = lm
        if vm is None:  # features only: keep ln_vision, drop the ViT body (pixel_values are refused)
            vm = model.vision_model
            vm.embeddings = None
            vm.encoder = None
        eps = ln_vision_eps if ln_vision_eps is not None else vcfg.layer_norm_eps
        vm.post_layernorm = nn.LayerNorm(ln_w.shape[0], eps=eps)
        vm.post_layernorm.load_state_dict({"weight": ln_w, "bias": sd[_LN + "bias"]})
        model.vision_model = vm
        model.qformer = qformer
        model.query_tokens = nn.Parameter(sd["query_tokens"].detach().clone().float())
        model.language_projection = nn.Linear(qcfg.hidden_size, lm.get_input_embeddings().embedding_dim)
        if "language_projection.weight" in sd:
            model.language_projection.load_state_dict({"weight": sd["language_projection.weight"],
                                                       "bias": sd["language_projection.bias"]})
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"from_pretrained_parts: parts left unmaterialised: {meta[:5]}")
        if device is not None:
            model.to(device)
        return cls(model.train(), train_ln_vision=train_ln_vision)

    # ------------------------------------------------------------------------------------------
    # properties and modes

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.language_model.config.is_encoder_decoder)

    @property
    def is_instructblip(self) -> bool:
        return isinstance(self.model.qformer, InstructBlipQFormer)

    @property
    def has_vision(self) -> bool:
        return getattr(self.model.vision_model, "encoder", None) is not None

    @property
    def num_query_tokens(self) -> int:
        return self.model.query_tokens.shape[1]

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.vision_trained:
            self.model.vision_model.eval()  # frozen ViT: always in eval mode (LAVIS); the LLM follows `mode`, as LAVIS
        return self

    def set_vision_trainable(self, flag: bool = True) -> "Blip2Stage2":
        """Train the ViT body too (LAVIS' ``freeze_vit: False``: the fine-tuning recipes) or freeze it again: its
        parameters' ``requires_grad``, and its mode then follows :meth:`train`. Returns the model."""
        if not self.has_vision:
            raise ValueError("set_vision_trainable: this model was built without a ViT (features only)")
        vm = self.model.vision_model
        for mod in (vm.embeddings, vm.encoder):
            for p in mod.parameters():
                p.requires_grad_(bool(flag))
        self.vision_trained = bool(flag)
        return self.train(self.training)

    # ------------------------------------------------------------------------------------------
    # image -> LLM input embeddings

    def vision_tokens(self, pixel_values: torch.Tensor, *, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The ViT's output tokens BEFORE ``ln_vision`` [B, L, W]: what a feature cache stores as ``image_embeds``."""
        if not self.has_vision:
            raise ValueError("pixel_values: this model was built without a ViT (features only); pass image_embeds")
        vm = self.model.vision_model
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {_shape(pixel_values)}")
        px = pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)
        emb = vm.embeddings(px, interpolate_pos_encoding=interpolate_pos_encoding)
        return vm.encoder(inputs_embeds=emb).last_hidden_state

    def query_output(self, *, pixel_values=None, image_embeds=None, qformer_input_ids=None,
                     qformer_attention_mask=None, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The Q-Former's query outputs [B, Q, d] for images given as pixels or as pre-``ln_vision`` tokens."""
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("give exactly one of pixel_values and image_embeds")
        if pixel_values is not None:
            x = self.vision_tokens(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        else:
            x = image_embeds
        ln = self.model.vision_model.post_layernorm
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != ln.normalized_shape[0] \
                or not x.is_floating_point():
            raise ValueError(f"image_embeds must be floating [B, L, {ln.normalized_shape[0]}] (ViT tokens before "
                             f"ln_vision), got {_shape(x)}")
        x = F.layer_norm(x.to(ln.weight.dtype), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        bsz = x.shape[0]
        queries = self.model.query_tokens.expand(bsz, -1, -1)
        if self.is_instructblip:
            if qformer_input_ids is None:
                raise ValueError("qformer_input_ids: InstructBLIP needs the instruction for its Q-Former")
            _check_ids("qformer_input_ids", qformer_input_ids, bsz)
            mask = qformer_attention_mask if qformer_attention_mask is not None else torch.ones_like(qformer_input_ids)
            _check_like("qformer_attention_mask", mask, qformer_input_ids)
            mask = torch.cat([mask.new_ones(bsz, queries.shape[1]), mask], dim=1)
            out = self.model.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=queries,
                                     encoder_hidden_states=x).last_hidden_state[:, :queries.shape[1]]
        else:
            if qformer_input_ids is not None or qformer_attention_mask is not None:
                raise ValueError("qformer_input_ids: only InstructBLIP's Q-Former takes an instruction")
            out = self.model.qformer(query_embeds=queries, encoder_hidden_states=x).last_hidden_state
        return out

    def language_inputs(self, **image) -> torch.Tensor:
        """``language_projection`` of :meth:`query_output` [B, Q, LLM width], in the LLM's embedding dtype."""
        out = self.query_output(**image)
        proj = self.model.language_projection
        emb_dtype = self.model.language_model.get_input_embeddings().weight.dtype
        return proj(out.to(proj.weight.dtype)).to(emb_dtype)

    def _prefixed(self, input_ids, attention_mask, image: dict):
        prefix = self.language_inputs(**image)
        bsz, nq = prefix.shape[:2]
        if input_ids is None:  # generation without a prompt: BOS for decoder-only LLMs (as HF), else nothing
            if attention_mask is not None:
                raise ValueError("attention_mask given without input_ids")
            bos = None if self.is_encoder_decoder else getattr(self.model.language_model.config, "bos_token_id", None)
            width = 1 if bos is not None else 0
            input_ids = torch.full((bsz, width), bos if width else 0, dtype=torch.long, device=prefix.device)
        _check_ids("input_ids", input_ids, bsz)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        _check_like("attention_mask", mask, input_ids)
        embeds = self.model.language_model.get_input_embeddings()(input_ids)
        return (torch.cat([prefix.to(embeds.dtype), embeds], dim=1),
                torch.cat([mask.new_ones(bsz, nq), mask], dim=1), nq)

    # ------------------------------------------------------------------------------------------
    # training

    def forward(self, *, input_ids: Optional[torch.Tensor] = None, attention_mask=None, labels=None,
                pixel_values=None, image_embeds=None, decoder_input_ids=None, decoder_attention_mask=None,
                qformer_input_ids=None, qformer_attention_mask=None,
                interpolate_pos_encoding: bool = False) -> Stage2Output:
        """Loss and logits. Decoder-only: ``input_ids`` / ``attention_mask`` / ``labels`` [B, T] are prompt + text
        (labels -100 on prompt and padding; the queries' -100 are added here). Seq2seq: ``input_ids`` is the
        encoder's prompt, ``labels`` [B, T'] the decoder target (-100 on padding), ``decoder_attention_mask``
        optional (``decoder_input_ids`` default: the labels shifted right, as transformers does). See
        :meth:`make_text_batch`."""
        image = dict(pixel_values=pixel_values, image_embeds=image_embeds, qformer_input_ids=qformer_input_ids,
                     qformer_attention_mask=qformer_attention_mask, interpolate_pos_encoding=interpolate_pos_encoding)
        if input_ids is None:
            raise ValueError("input_ids: the prompt/text ids are required (an empty [B, 0] tensor for none)")
        embeds, mask, nq = self._prefixed(input_ids, attention_mask, image)
        lm = self.model.language_model
        if self.is_encoder_decoder:
            if labels is not None:
                _check_ids("labels", labels, input_ids.shape[0])
            out = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_input_ids=decoder_input_ids,
                     decoder_attention_mask=decoder_attention_mask, use_cache=False)
        else:
            if decoder_attention_mask is not None or decoder_input_ids is not None:
                raise ValueError("decoder_input_ids / decoder_attention_mask: only for seq2seq LLMs")
            if labels is not None:
                _check_like("labels", labels, input_ids)
                labels = torch.cat([labels.new_full((labels.shape[0], nq), IGNORE_INDEX), labels], dim=1)
            out = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
        return Stage2Output(loss=out.loss, logits=out.logits)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch dict (keys of :meth:`forward`; ``labels`` required)."""
        unknown = sorted(set(batch) - _BATCH_KEYS)
        if unknown:
            raise TypeError(f"batch: unknown key(s) {unknown}; known: {sorted(_BATCH_KEYS)}")
        if batch.get("labels") is None:
            raise ValueError("batch: 'labels' is required for the loss")
        return self(**batch).loss

    def trainable_parameters(self) -> list:
        """(name, parameter) of every trained parameter, in HF key names (no ``model.`` prefix)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict:
        """The trained tensors (Q-Former, queries, projection, ln_vision when trained) under HF names;
        ``blipfast.convert.hf_to_lavis`` gives LAVIS names."""
        names = {n for n, _ in self.trainable_parameters()}
        return {k: v.detach() for k, v in self.model.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> list:
        """Copy trained tensors in place (HF or LAVIS names; the parameter objects stay, so an optimizer stays
        valid). ``strict``: the keys must be exactly :meth:`trainable_state_dict`'s. Returns the keys loaded."""
        sd = convert.to_hf(state_dict)[0].state_dict
        params = dict(self.trainable_parameters())
        missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
        if strict and (missing or unexpected):
            raise ValueError(f"load_trainable_state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
        loaded = []
        with torch.no_grad():
            for name, t in sd.items():
                if name in params:
                    if tuple(t.shape) != tuple(params[name].shape):
                        raise ValueError(f"load_trainable_state_dict: {name} has shape {list(t.shape)}, the model "
                                         f"{list(params[name].shape)}")
                    params[name].copy_(t)
                    loaded.append(name)
        return loaded

    def save_pretrained(self, path, tokenizer=None, image_processor=None) -> None:
        """Write an HF folder (``Blip2ForConditionalGeneration.from_pretrained`` and ``blipfast caption --model``
        read it), with the tokenizer / image processor when given. Needs the ViT."""
        if not self.has_vision:
            raise ValueError("save_pretrained: this model has no ViT (features only); an HF folder needs one")
        self.model.save_pretrained(path)
        for extra in (tokenizer, image_processor):
            if extra is not None:
                extra.save_pretrained(path)

    def make_text_batch(self, tokenizer, texts: Sequence[str], prompts=None, *, max_length: int = 32,
                        suffix: Optional[str] = None) -> dict:
        """Tokenise a batch as LAVIS does (host-side data preparation, not part of the step).

        Decoder-only: ``prompt + text + suffix`` (suffix default: the tokenizer's EOS; LAVIS uses "\\n" for OPT),
        right-padded, truncated to ``max_length``; labels = ids with -100 on padding and on the tokens the prompt
        contributes to that full text (:func:`prompt_token_counts`: LAVIS' ``prompt_length``, also with byte-level
        BPE tokenizers, where a trailing space joins the caption's first word). Seq2seq: the prompts (default "")
        are the encoder's input, the texts the labels (-100 on padding) with their ``decoder_attention_mask``.
        ``prompts``: None, one string or one per text."""
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty sequence of strings")
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or ""] * len(texts)
        prompts = list(prompts)
        if len(prompts) != len(texts) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: one string per text ({len(texts)}), got {len(prompts)}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            kw = dict(padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
            if self.is_encoder_decoder:
                enc, dec = tokenizer(prompts, **kw), tokenizer(texts, **kw)
                return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                        "labels": dec.input_ids.masked_fill(dec.attention_mask == 0, IGNORE_INDEX),
                        "decoder_attention_mask": dec.attention_mask}
            end = tokenizer.eos_token if suffix is None else suffix
            full = [p + t + end for p, t in zip(prompts, texts)]
            offsets = bool(getattr(tokenizer, "is_fast", False)) and any(prompts)
            enc = tokenizer(full, **kw, **({"return_offsets_mapping": True} if offsets else {}))
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, IGNORE_INDEX)
            if any(prompts):
                counts = prompt_token_counts(tokenizer, prompts, enc)
                labels = labels.masked_fill(torch.arange(labels.shape[1]) < counts[:, None], IGNORE_INDEX)
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
        finally:
            tokenizer.padding_side = side

    # ------------------------------------------------------------------------------------------
    # generation

    def decoding_settings(self, name: str = "caption") -> DecodingSettings:
        """LAVIS' decoding settings ``name`` ("caption": its ``generate`` defaults, "coco": BLIP-2's COCO caption
        evaluation, "vqa": zero-shot VQA) for this model's LLM kind, with the prompt to put in ``input_ids``
        (:func:`blipfast.models.llm.decoding_settings`); ``.generate_kwargs()`` are arguments of :meth:`generate`."""
        return decoding_settings(name, is_encoder_decoder=self.is_encoder_decoder,
                                 is_instructblip=self.is_instructblip)

    @torch.no_grad()
    def generate(self, *, pixel_values=None, image_embeds=None, input_ids=None, attention_mask=None,
                 qformer_input_ids=None, qformer_attention_mask=None, interpolate_pos_encoding: bool = False,
                 settings: Optional[Union[str, DecodingSettings]] = None, **generate_kwargs) -> torch.Tensor:
        """transformers' ``generate`` on the LLM with [image prefix | prompt] as ``inputs_embeds``. ``input_ids``:
        the prompt (decoder-only: left-padded; default: the BOS token), ``generate_kwargs`` go to transformers
        (``num_beams``, ``max_new_tokens``, ...). ``settings``: LAVIS' decoding (a name of
        :meth:`decoding_settings` or a :class:`~blipfast.models.llm.DecodingSettings`): its beams,
        penalties and its lengths as new-token counts by LAVIS' rule (its ``max_length=30`` is at most 29 new tokens
        for a decoder-only LLM); ``generate_kwargs`` win over it, and its ``prompt`` is the caller's to tokenise.
        Returns the generated tokens: decoder-only, the new tokens only; seq2seq, the decoder sequence (starting
        with its start token), as transformers returns them."""
        if settings is not None:
            if isinstance(settings, str):
                settings = self.decoding_settings(settings)
            if not isinstance(settings, DecodingSettings):
                raise TypeError(f"settings must be a name or a DecodingSettings, got {type(settings).__name__}")
            generate_kwargs = {**settings.generate_kwargs(), **generate_kwargs}
        image = dict(pixel_values=pixel_values, image_embeds=image_embeds, qformer_input_ids=qformer_input_ids,
                     qformer_attention_mask=qformer_attention_mask, interpolate_pos_encoding=interpolate_pos_encoding)
        embeds, mask, _ = self._prefixed(input_ids, attention_mask, image)
        return self.model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)


# ----------------------------------------------------------------------------------------------
# helpers


def _check_ids(name: str, ids, bsz: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"{name} must be an integer tensor [B, T], got {_shape(ids)}"
                         + (f" of {ids.dtype}" if isinstance(ids, torch.Tensor) else ""))
    if ids.shape[0] != bsz:
        raise ValueError(f"{name} has {ids.shape[0]} rows for {bsz} images")


def _check_like(name: str, t, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of its ids {list(ref.shape)}, got {_shape(t)}")


def prompt_token_counts(tokenizer, prompts: Sequence[str], encoding) -> torch.Tensor:
    """How many leading tokens of each tokenised ``prompt + text`` row the prompt contributes [B] (0 for an empty
    prompt): LAVIS' ``prompt_length``, the tokens of its model prompt ("a photo of", special tokens included)
    while its text processor puts "a photo of " in front of the caption.

    With a fast tokenizer (``encoding`` holds ``offset_mapping``): the leading tokens whose characters start
    inside the prompt without its trailing whitespace, so a byte-level BPE's "Ġa" (the space joined to the
    caption's first word) is the caption's, for every tokenizer kind; otherwise LAVIS' own count, the length of
    ``tokenizer(prompt.rstrip())``."""
    ends = torch.tensor([len(p.rstrip()) for p in prompts])
    if "offset_mapping" in encoding:
        starts = encoding["offset_mapping"][..., 0]
        inside = (starts < ends[:, None]) & (encoding["attention_mask"] == 1)
        counts = inside.long().cumprod(1).sum(1)
    else:
        lengths = {p: len(tokenizer(p.rstrip()).input_ids) for p in set(prompts)}  # once per distinct prompt
        counts = torch.tensor([lengths[p] for p in prompts])
    return counts.masked_fill(ends == 0, 0)


def read_stage1(stage1) -> tuple:
    """(state dict in HF names, a Q-Former config hint or None, the default ``ln_vision`` epsilon) of a stage-1
    checkpoint given as a path, a state dict or a module (a :class:`blipfast.Blip2Stage1` gives its own config).
    The epsilon: the module's, else the ``vision_config.layer_norm_eps`` of a ``config.json`` beside the weights,
    else 1e-5 (LAVIS', also blipfast's Blip2Stage1 default) for LAVIS names and blipfast's ``ln_vision.*``, 1e-6
    (HF's default) for HF's ``vision_model.post_layernorm.*``."""
    qcfg_hint = eps_hint = None
    if isinstance(stage1, nn.Module):
        sd = dict(stage1.state_dict())
        cfg = getattr(stage1, "config", None)
        qcfg_hint = getattr(cfg, "qformer", None)  # Blip2Stage1Config
        eps_hint = getattr(cfg, "ln_vision_eps", None)
    elif isinstance(stage1, Mapping):
        sd = dict(stage1)
    elif isinstance(stage1, (str, Path)):
        src = convert.resolve_source(stage1, what="stage1")
        sd = convert.load_state_dict(src.weights)
        cfg = src.hf_config or {}
        if cfg.get("model_type") in ("blip-2", "instructblip"):
            qcfg_hint = cfg.get("qformer_config")
            eps_hint = (cfg.get("vision_config") or {}).get("layer_norm_eps")
    else:
        raise TypeError(f"stage1 must be a path, a state dict or a module, got {type(stage1).__name__}")
    if eps_hint is None:
        hf_named = _LN + "weight" in sd and not any(k.startswith(("Qformer.", "visual_encoder.")) for k in sd)
        eps_hint = 1e-6 if hf_named else 1e-5
    sd = blip2_names(convert.to_hf(sd)[0].state_dict)
    missing = [k for k in ("query_tokens", _LN + "weight", _LN + "bias", "qformer.layernorm.weight") if k not in sd]
    if missing:
        raise ValueError(f"stage1: the checkpoint lacks {missing} (needs the Q-Former, query_tokens and ln_vision)")
    return sd, qcfg_hint, eps_hint


def stage2_qformer_config(spec, sd: Mapping):
    """The HF ``Blip2QFormerConfig`` of the stage-2 Q-Former (no text FFN) from a config-like ``spec`` or, when
    None, from the shapes of ``qformer.*`` in ``sd`` (heads of width 64, BERT's)."""
    from transformers import Blip2QFormerConfig

    from .qformer import QFormerConfig

    if spec is None:
        q = {k[8:]: v for k, v in sd.items() if k.startswith("qformer.")}
        hidden = q["layernorm.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in q if k.startswith("encoder.layer."))
        cross = [i for i in range(layers) if f"encoder.layer.{i}.crossattention.attention.key.weight" in q]
        freq = cross[1] - cross[0] if len(cross) > 1 else layers
        if not cross or cross != list(range(0, layers, freq)):
            raise ValueError(f"stage1: cross-attention in layers {cross} is not every k-th layer from 0; pass "
                             f"qformer_config")
        if hidden % 64:
            raise ValueError(f"stage1: hidden size {hidden} is not a multiple of 64; pass qformer_config")
        spec = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                    intermediate_size=q["encoder.layer.0.intermediate_query.dense.weight"].shape[0],
                    cross_attention_frequency=freq,
                    encoder_hidden_size=q[f"encoder.layer.{cross[0]}.crossattention.attention.key.weight"].shape[1])
    if isinstance(spec, QFormerConfig):
        spec = spec.to_dict()
    elif hasattr(spec, "qformer_config"):  # a Blip2Config
        spec = spec.qformer_config
    if not isinstance(spec, dict):
        if not hasattr(spec, "to_dict"):
            raise TypeError(f"qformer_config: expected an HF config, a dict or a QFormerConfig, got "
                            f"{type(spec).__name__}")
        spec = spec.to_dict()
    spec = {k: v for k, v in spec.items() if k not in ("model_type", "transformers_version", "architectures")}
    spec["use_qformer_text_input"] = False  # stage 2 drops the text path
    return Blip2QFormerConfig(**spec)


def _vision_model(vision, sd: Mapping, dtype) -> Optional[nn.Module]:
    if vision is None:
        return None
    from transformers import Blip2VisionModel

    if isinstance(vision, (str, Path)):
        cfg_file = Path(vision) / "config.json"
        kind = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None
        if kind != "blip_2_vision_model":
            raise ValueError(f"vision: {vision} is not a Blip2VisionModel folder (config.json model_type "
                             f"'blip_2_vision_model', e.g. `model.vision_model.save_pretrained(dir)`), got {kind!r}")
        vm = Blip2VisionModel.from_pretrained(vision, **({"dtype": dtype} if dtype is not None else {}))
    elif isinstance(vision, nn.Module):
        if not all(hasattr(vision, a) for a in ("embeddings", "encoder", "post_layernorm", "config")):
            raise TypeError(f"vision: expected an HF Blip2VisionModel, got {type(vision).__name__}")
        vm = vision
    elif hasattr(vision, "patch_size") and hasattr(vision, "hidden_size"):  # a Blip2VisionConfig
        if not any(k.startswith("vision_model.") and not k.startswith(_LN) for k in sd):
            raise ValueError("vision: a config was given but the checkpoint holds no ViT weights; pass a folder")
        vm = Blip2VisionModel(vision)
        vsd = {k: v for k, v in sd.items() if not k.startswith(_LN)}  # ln_vision is set by the caller
        convert.load_into(vm, vsd, prefix="vision_model.", ignore=(r"post_layernorm\.",), what="vision",
                          into="the vision config")
    else:
        raise TypeError(f"vision must be None, a folder, a Blip2VisionModel or a Blip2VisionConfig, got "
                        f"{type(vision).__name__}")
    if dtype is not None:
        vm.to(dtype)
    return vm


def load_hf_generation_model(path, *, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration`` from a local folder."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model: {path} is not a folder with an HF config.json")
    kind = json.loads(cfg_file.read_text()).get("model_type")
    import transformers

    classes = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}
    if kind not in classes:
        raise ValueError(f"model: {path} holds a {kind!r} model, expected one of {sorted(classes)}")
    return getattr(transformers, classes[kind]).from_pretrained(path, **({"dtype": dtype} if dtype else {}))
