"""The frozen LLM of BLIP-2 stage 2 and generation: loading from a local folder, the feed-forward activation LAVIS
gives T5 (:func:`set_t5_activation`), the choice of its attention implementation (FlashAttention-2 when
``flash-attn`` is installed, ``pip install -e ".[flash]"``), and LAVIS' decoding settings
(:func:`decoding_settings`).

LAVIS builds its T5 (``blip2_t5.py``, ``blip2_t5_instruct.py``) with ``T5Config.from_pretrained(folder)`` and then
``t5_config.dense_act_fn = "gelu"``: the exact (erf) GELU in every feed-forward, where Flan-T5's ``config.json``
(``feed_forward_proj = "gated-gelu"``) gives transformers' ``gelu_new`` (the tanh approximation). Nothing else
changes (``is_gated_act`` stays, so Flan-T5 keeps its gated feed-forward). BLIP-2's Flan-T5 models were trained
that way, and transformers' converted BLIP-2 folders carry ``dense_act_fn = "gelu"`` in their ``text_config``.

blipfast's Q-Former never runs through transformers' attention, so the reason HF disables FlashAttention for
BLIP-2 (its fp32 Q-Former) no longer applies: the LLM may use it. ``attn_implementation="auto"`` picks
``"flash_attention_2"`` when flash-attn is usable (transformers' own check: the package, a CUDA device, a recent
enough version), the LLM class supports it, the model runs on CUDA and its dtype is fp16 or bf16; otherwise it
leaves transformers' default (SDPA). Asking for ``"flash_attention_2"`` explicitly where it cannot work is a
ValueError that says why.

Decoding (docs/blip2-stage2.md): LAVIS calls transformers' ``generate`` with the image prefix (and prompt) as
``inputs_embeds`` only. Under its pinned transformers (4.33.2) generation then starts from one token that is
counted but never fed to the model: a BOS placeholder ``input_ids = [[bos]]`` for decoder-only LLMs (OPT, Vicuna;
it is returned in front of the new tokens), the decoder start token for encoder-decoder ones (Flan-T5).
``max_length`` and ``min_length`` count that token, ``max_new_tokens`` does not, and the EOS is refused while the
sequence is shorter than ``min_length``. So for blipfast, which always passes counts of NEW tokens
(``max_new_tokens``, ``min_new_tokens``: the same in every transformers version):

- ``max_new_tokens = max_length - 1`` where LAVIS passes ``max_length`` (``Blip2OPT.generate``, the Vicuna
  InstructBLIP), ``= max_length`` where it passes ``max_new_tokens=max_length`` (``Blip2T5.generate``, every
  ``predict_answers`` of BLIP-2);
- ``min_new_tokens = max(min_length - 1, 0)`` everywhere (LAVIS always passes ``min_length``).

LAVIS' "max 30, min 8" of BLIP-2 OPT's COCO evaluation is thus at most 29 new tokens and at least 7 before the EOS;
Flan-T5's is at most 30 and at least 7; the ``min_len=1`` of VQA forbids nothing.

Named settings (:data:`SETTINGS`; :func:`decoding_settings` resolves one for an LLM kind):

- ``"caption"``: the defaults of LAVIS' ``generate`` (``Blip2OPT`` / ``Blip2T5``: beam 5, max_length 30,
  min_length 1, no prompt, repetition and length penalty 1; InstructBLIP: max_length 256, repetition penalty 1.5);
- ``"coco"``: BLIP-2's COCO caption evaluation (``lavis/projects/blip2/eval/caption_coco_*_eval.yaml``: beam 5,
  max_len 30, min_len 8; the model's prompt "a photo of", ``configs/models/blip2/blip2_caption_*.yaml``), with
  the penalties of LAVIS' ``CaptionTask`` as BLIP-2 was evaluated (it passed only the beams and lengths; since
  December 2023 it also passes ``repetition_penalty=1.15`` and ``length_penalty=0`` unless the yaml says
  otherwise: give them explicitly to reproduce that version);
- ``"vqa"``: zero-shot VQA, ``predict_answers`` as LAVIS' VQA task calls it (``vqav2_zeroshot_*_eval.yaml``: beam
  5, max_len 10, min_len 1, prompt "Question: {} Short answer:"; the task passes no length penalty, so
  ``predict_answers``' own: -1 for Flan-T5, 0 for OPT and Vicuna; InstructBLIP's go through its ``generate``, so
  with its repetition penalty 1.5).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

FLASH = "flash_attention_2"
LAVIS_T5_ACTIVATION = "gelu"  # blip2_t5.py: t5_config.dense_act_fn = "gelu"
_T5_FFN = ("T5DenseActDense", "T5DenseGatedActDense")
ATTN_IMPLEMENTATIONS = ("auto", FLASH, "sdpa", "eager")


def flash_attn_unavailable_reason() -> Optional[str]:
    """None when FlashAttention-2 can be used through transformers here, else why not (for skip messages)."""
    if importlib.util.find_spec("flash_attn") is None:
        return 'flash-attn is not installed (pip install -e ".[flash]")'
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "flash-attn is installed but transformers cannot use it here (no CUDA device, or flash-attn < 2.3.3)"
    return None


def flash_attn_available() -> bool:
    return flash_attn_unavailable_reason() is None


def _lm_class(config):
    """The concrete transformers class of a causal (decoder-only) or seq2seq LM config."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING)

    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if config.is_encoder_decoder else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        kind = "seq2seq" if config.is_encoder_decoder else "causal"
        raise ValueError(f"llm: {type(config).__name__} has no {kind} LM class in transformers") from None


def select_attn_implementation(requested: Optional[str], config, *, device=None, dtype=None) -> Optional[str]:
    """The ``attn_implementation`` to load the LLM of ``config`` with (None: transformers' default).

    ``requested``: "auto" (or None), "flash_attention_2", "sdpa" or "eager". ``device`` / ``dtype``: where and in
    what precision the LLM will run (FlashAttention needs CUDA and fp16/bf16)."""
    requested = "auto" if requested is None else requested
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    if requested in ("sdpa", "eager"):
        return requested
    cls = _lm_class(config)
    why = flash_attn_unavailable_reason()
    if why is None and not getattr(cls, "_supports_flash_attn", False):
        why = f"{cls.__name__} does not support FlashAttention-2 in transformers"
    if why is None and device is not None and torch.device(device).type != "cuda":
        why = f"FlashAttention-2 needs a CUDA device, the LLM runs on {device}"
    if why is None and dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        why = f"FlashAttention-2 needs fp16 or bf16, the LLM runs in {dtype}"
    if requested == FLASH:
        if why is not None:
            raise ValueError(f"attn_implementation='flash_attention_2': {why}")
        return FLASH
    return FLASH if why is None else None


def _t5_activation_change(config, activation: Optional[str]) -> Optional[str]:
    """The activation to give a T5 config's feed-forward, or None to leave it: only T5 (``model_type`` "t5", as
    Flan-T5) whose activation is a GELU other than ``activation`` (a ReLU T5 keeps its ReLU)."""
    from transformers.activations import ACT2FN

    if activation is not None and activation not in ACT2FN:
        raise ValueError(f"t5_activation must be None or one of transformers' ACT2FN names, got {activation!r}")
    if activation is None or getattr(config, "model_type", None) != "t5":
        return None
    current = getattr(config, "dense_act_fn", None)
    if not isinstance(current, str) or not current.startswith("gelu") or current == activation:
        return None
    return activation


def set_t5_activation(llm: nn.Module, activation: str = LAVIS_T5_ACTIVATION) -> bool:
    """Give a loaded T5 LM's feed-forwards ``activation`` (default LAVIS' exact ``"gelu"``) in place, config
    included (so ``save_pretrained`` keeps it). Only a T5 whose activation is a GELU is changed (see the module
    docstring); returns whether anything changed."""
    from transformers.activations import ACT2FN

    new = _t5_activation_change(getattr(llm, "config", None), activation)
    if new is None:
        return False
    for m in llm.modules():
        if type(m).__name__ in _T5_FFN:
            m.act = ACT2FN[new]
    llm.config.dense_act_fn = new
    return True


def load_llm(llm: Union[str, Path, nn.Module], *, dtype: Optional[torch.dtype] = None,
             attn_implementation: Optional[str] = "auto", device=None,
             t5_activation: Optional[str] = None) -> nn.Module:
    """An HF causal or seq2seq LM from a local folder (``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``
    after the folder's config), in ``dtype``, with the attention :func:`select_attn_implementation` picks for
    ``device``. A model instance is returned as it is (its attention switched when one is asked for).
    ``t5_activation``: the feed-forward activation a T5 whose config says a GELU gets (:func:`set_t5_activation`;
    LAVIS: ``"gelu"``); None keeps the config's."""
    if isinstance(llm, nn.Module):
        if t5_activation is not None:
            set_t5_activation(llm, t5_activation)
        configure_attention(llm, attn_implementation, device=device, dtype=dtype)
        return llm
    if not isinstance(llm, (str, Path)) or not Path(llm).is_dir():
        raise ValueError(f"llm must be a local folder with an HF model (config.json + weights) or a model, got {llm!r}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(llm)
    act = _t5_activation_change(config, t5_activation)
    if act is not None:  # before the model is built: transformers picks the activation modules from the config
        config.dense_act_fn = act
    impl = select_attn_implementation(attn_implementation, config, device=device, dtype=dtype)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if impl is not None:
        kwargs["attn_implementation"] = impl
    return auto.from_pretrained(llm, config=config, **kwargs)


def configure_attention(language_model: nn.Module, attn_implementation: Optional[str] = "auto", *, device=None,
                        dtype=None) -> Optional[str]:
    """Switch an already loaded LLM to the attention :func:`select_attn_implementation` picks ("auto" keeps what
    it has unless FlashAttention-2 can be used); returns the implementation set, or None if unchanged."""
    if dtype is None:
        dtype = next(language_model.parameters()).dtype
    if device is None:
        device = next(language_model.parameters()).device
    impl = select_attn_implementation(attn_implementation, language_model.config, device=device, dtype=dtype)
    if impl is None or impl == getattr(language_model.config, "_attn_implementation", None):
        return None
    language_model.set_attn_implementation(impl)
    return impl


# ----------------------------------------------------------------------------------------------
# decoding

SETTINGS = ("caption", "coco", "vqa")
VQA_PROMPT = "Question: {} Short answer:"


def new_token_counts(max_length: int, min_length: int, *, max_counts_start: bool) -> tuple:
    """(max_new_tokens, min_new_tokens) of a LAVIS call with ``max_length`` (or ``max_new_tokens`` when
    ``max_counts_start`` is False) and ``min_length``: the first token LAVIS' transformers counts is no new token
    (see the module docstring)."""
    for name, v, low in (("max_length", max_length, 1 + bool(max_counts_start)), ("min_length", min_length, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return max_length - 1 if max_counts_start else max_length, max(min_length - 1, 0)


@dataclass(frozen=True)
class DecodingSettings:
    """One LAVIS decoding call in LAVIS' own terms. ``prompt``: the text before the caption (for VQA a template
    with ``{}`` for the question); ``max_length`` / ``min_length`` as LAVIS passes them, ``max_counts_start`` when
    its ``max_length`` counts the start token (see :func:`new_token_counts`); ``source``: where LAVIS says so."""

    name: str
    prompt: str
    num_beams: int
    max_length: int
    min_length: int
    length_penalty: float
    repetition_penalty: float
    max_counts_start: bool
    source: str

    def generate_kwargs(self) -> dict:
        """The arguments of transformers' ``generate`` (and :meth:`blipfast.Blip2Stage2.generate`) that reproduce
        this call: beam search, new-token counts by LAVIS' rule, the penalties."""
        max_new, min_new = new_token_counts(self.max_length, self.min_length, max_counts_start=self.max_counts_start)
        return {"do_sample": False, "num_beams": self.num_beams, "max_new_tokens": max_new, "min_new_tokens": min_new,
                "length_penalty": float(self.length_penalty), "repetition_penalty": float(self.repetition_penalty)}


def decoding_settings(name: str, *, is_encoder_decoder: bool, is_instructblip: bool = False) -> DecodingSettings:
    """LAVIS' settings ``name`` (one of :data:`SETTINGS`) for an LLM of this kind: encoder-decoder (Flan-T5) or
    decoder-only (OPT; Vicuna for InstructBLIP)."""
    if name not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {name!r}")
    seq2seq = bool(is_encoder_decoder)
    family = ("blip2_t5_instruct.py" if seq2seq else "blip2_vicuna_instruct.py") if is_instructblip else \
        ("blip2_t5.py" if seq2seq else "blip2_opt.py")
    where = f"lavis/models/blip2_models/{family}"
    # decoder-only `generate` passes max_length (the BOS placeholder counts); T5's passes max_new_tokens=max_length
    generate_counts_start = not seq2seq
    if name == "vqa":
        # BLIP-2's predict_answers pass max_new_tokens=max_len; InstructBLIP's call their generate(max_length=max_len)
        # and so get its repetition penalty 1.5
        return DecodingSettings(name, VQA_PROMPT, 5, 10, 1, -1.0 if seq2seq else 0.0, 1.5 if is_instructblip else 1.0,
                                generate_counts_start and is_instructblip,
                                f"{where} (predict_answers), lavis/projects/blip2/eval/vqav2_zeroshot_*_eval.yaml")
    if name == "coco":
        return DecodingSettings(name, "a photo of", 5, 30, 8, 1.0, 1.0, generate_counts_start,
                                f"{where} (generate), lavis/projects/blip2/eval/caption_coco_*_eval.yaml, "
                                f"lavis/configs/models/blip2/blip2_caption_*.yaml")
    if is_instructblip:
        return DecodingSettings(name, "", 5, 256, 1, 1.0, 1.5, generate_counts_start, f"{where} (generate)")
    return DecodingSettings(name, "", 5, 30, 1, 1.0, 1.0, generate_counts_start, f"{where} (generate)")
