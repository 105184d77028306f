"""The frozen LLM of BLIP-2 stage 2 and generation: loading from a local folder, the feed-forward activation LAVIS
gives T5 (:func:`set_t5_activation`), and the choice of its attention implementation (FlashAttention-2 when
``flash-attn`` is installed, ``pip install -e ".[flash]"``).

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
"""
from __future__ import annotations

import importlib.util
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
