"""blipfast's drop-in for Hugging Face's ``InstructBlipQFormerModel``: the InstructBLIP Q-Former, whose text
(the instruction) enters beside the learned queries.

InstructBLIP's Q-Former is BLIP-2's with the instruction tokens appended to the queries: one self-attention over
[queries | instruction] (bidirectional, instruction padding masked), cross-attention on the query rows only, the
query FFN on the queries and the text FFN on the instruction. HF keeps the word/position embeddings and the
embedding LayerNorm inside the Q-Former (``embeddings.{word_embeddings, position_embeddings, layernorm}``); in
blipfast those are :class:`QFormerEmbeddings` (word + position) and :class:`QFormer`'s own ``layernorm``.
:class:`InstructBlipQFormer` holds a ``QFormer`` and a ``QFormerEmbeddings`` whose modules ARE its own (the same
``nn.Module`` and ``nn.Parameter`` objects under HF's key names), so ``load_state_dict(hf.state_dict(),
strict=True)`` works and :func:`blipfast.apply_blipfast_to_blip2` can swap it into an HF
``InstructBlipForConditionalGeneration`` with shared parameters.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from .. import convert
from .qformer import QFormer, QFormerConfig, QFormerEmbeddings


class _Embeddings(nn.Module):  # HF InstructBlipQFormerEmbeddings: word_embeddings, position_embeddings, layernorm
    def __init__(self, text: QFormerEmbeddings, layernorm: nn.LayerNorm):
        super().__init__()
        self.word_embeddings = text.word_embeddings
        self.position_embeddings = text.position_embeddings
        self.layernorm = layernorm


class InstructBlipQFormer(nn.Module):
    """Drop-in for HF ``InstructBlipQFormerModel`` (same config, state_dict keys, forward and outputs) on
    blipfast's fused Q-Former. Differences from HF are QFormer's (true masks, no ``output_attentions``)."""

    def __init__(self, config, *, init_weights: bool = True):
        """``config``: an HF ``InstructBlipQFormerConfig`` (or anything :class:`QFormerConfig` accepts); the text
        FFN is always built, as in HF. ``init_weights=False`` leaves the Q-Former layers uninitialised."""
        super().__init__()
        cfg = QFormerConfig(config, use_qformer_text_input=True)
        qformer = QFormer(cfg, init_weights=init_weights)
        text = QFormerEmbeddings(cfg)
        self.config = cfg
        self.embeddings = _Embeddings(text, qformer.layernorm)
        self.encoder = qformer.encoder
        # the same modules, reached through the blipfast classes; not submodules (no duplicate state_dict keys)
        object.__setattr__(self, "_qformer", qformer)
        object.__setattr__(self, "_text", text)
        self._qformer.train(self.training)

    @classmethod
    def from_hf(cls, hf_qformer: nn.Module) -> "InstructBlipQFormer":
        """A copy with the config, weights, dtype and device of an HF ``InstructBlipQFormerModel``."""
        w = hf_qformer.embeddings.layernorm.weight
        with torch.device(w.device):
            model = cls(hf_qformer.config, init_weights=False).to(dtype=w.dtype)
        model.load_state_dict(hf_qformer.state_dict(), strict=True)
        return model.train(hf_qformer.training)

    def train(self, mode: bool = True):
        super().train(mode)
        self._qformer.train(mode)  # QFormer.forward reads its own flag (dropout)
        self._text.train(mode)
        return self

    @property
    def qformer(self) -> QFormer:
        """The blipfast :class:`QFormer` over this module's layers (for its extras: ``image_kv``, modes)."""
        return self._qformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, query_embeds: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """HF's forward: ``query_embeds`` [B, Q, d] (the learned queries) and/or ``input_ids`` [B, T] (the
        instruction, positions 0..T-1 unless ``position_ids``); ``attention_mask`` [B, Q + T] (1 = attend);
        ``encoder_hidden_states`` [B, Lk, encoder_hidden_size] for the cross-attention of the query rows. Other
        keywords (``return_dict``, ``output_hidden_states``, ...) go to :meth:`QFormer.forward`."""
        if input_ids is None and query_embeds is None:
            raise ValueError("InstructBlipQFormer: give query_embeds, input_ids or both")
        if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
            got = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"InstructBlipQFormer: input_ids must be [B, T], got {got}")
        num_query = 0 if query_embeds is None else query_embeds.shape[1]
        embeds = self._text(input_ids, position_ids=position_ids, query_embeds=query_embeds)
        return self._qformer(embeds, query_length=num_query, attention_mask=attention_mask,
                             encoder_hidden_states=encoder_hidden_states if num_query else None,
                             encoder_attention_mask=encoder_attention_mask if num_query else None, **kwargs)


_INSTRUCT_EMB = (("qformer.embeddings.layernorm.", "qformer.layernorm."),
                 ("qformer.embeddings.word_embeddings.", "embeddings.word_embeddings."),
                 ("qformer.embeddings.position_embeddings.", "embeddings.position_embeddings."))


def blip2_names(sd: dict) -> dict:
    """An HF InstructBLIP state dict's Q-Former embeddings under BLIP-2's HF names (``qformer.layernorm.*``,
    ``embeddings.*``, as a stage-1 checkpoint has them); other state dicts unchanged."""
    if _INSTRUCT_EMB[0][0] + "weight" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        for a, b in _INSTRUCT_EMB:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = v
    return out


def instruct_qformer(qcfg, sd: Mapping) -> nn.Module:
    """HF ``InstructBlipQFormerModel`` of the stage-2 Q-Former config ``qcfg`` with its text half (word/position
    embeddings, the text FFN) from a stage-1 checkpoint ``sd`` (BLIP-2 HF names), as LAVIS' ``Blip2T5Instruct``
    takes them from BLIP-2's stage-1 ``blip2_pretrained.pth``."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    need = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "qformer.encoder.layer.0.intermediate.dense.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"stage1: an InstructBLIP Q-Former needs the stage-1 text embeddings and text FFN, the "
                         f"checkpoint lacks {missing} (a stage-2 checkpoint drops them: give a stage-1 checkpoint, "
                         f"LAVIS' blip2_pretrained.pth, or an InstructBLIP one)")
    spec = {k: v for k, v in qcfg.to_dict().items() if k not in ("model_type", "transformers_version",
                                                                   "architectures", "use_qformer_text_input")}
    spec.update(vocab_size=sd[need[0]].shape[0], max_position_embeddings=sd[need[1]].shape[0])
    icfg = InstructBlipQFormerConfig(**spec)
    qformer = InstructBlipQFormerModel(icfg)
    qsd = {}
    for k, v in sd.items():
        if k.startswith("qformer.layernorm."):
            qsd["embeddings.layernorm." + k[len("qformer.layernorm."):]] = v
        elif k.startswith("qformer."):
            qsd[k[len("qformer."):]] = v
        elif k.startswith("embeddings.") and k.endswith("_embeddings.weight"):
            qsd[k] = v
    convert.load_into(qformer, qsd, what="stage1", into=f"an InstructBLIP Q-Former ({icfg.hidden_size} wide, "
                      f"{icfg.num_hidden_layers} layers)")
    return qformer
