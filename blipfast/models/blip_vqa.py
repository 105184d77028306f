"""BLIP (v1) VQA (Salesforce BLIP ``BLIP_VQA``, ``models/blip_vqa.py``; docs/blip-finetune.md) on blipfast's fused ops.

- The question goes through the image-grounded text encoder ([ENC] replaces the first token), cross-attending to
  the ViT tokens (whose K/V are projected once per image for every layer, :meth:`BlipTextModel.image_kv`).
- The answer decoder (a ``BlipTextLMHeadModel`` of its own, [DEC] first, causal) cross-attends to the question's
  states, not to the image. BLIP repeats each question's states once per answer (training) or per candidate
  (``tile`` in ``rank_answer``) and projects them to K/V in every layer for every copy; here the decoder's K/V of
  a question are projected once and shared by its answers or candidates through ``kv_index``.
- Training (:meth:`BlipVQA.forward`): each question has several answers with weights (VQAv2: each distinct human
  answer with its share of the 10 answers; Visual Genome: one answer, weight 0.2); the loss is BLIP's
  ``sum(weight * per-answer summed label-smoothed (0.1) token loss) / number of questions`` (padding and [DEC]
  positions give no target; the weights are not normalised).
- Rank inference (:meth:`BlipVQA.rank_answers`, BLIP's ``rank_answer``): the first answer token's probabilities
  (softmax over the whole vocabulary after [DEC]) pick the ``k`` (128) candidates with the most probable first
  token; each candidate's summed label-smoothed token loss (not length-normalised, the first token's probability
  not added) picks the answer, the smallest loss winning (BLIP: the argmax of ``-loss``). The [DEC] position is
  computed once per question (its self-attention K/V reused by the candidates, its logits are the first-token
  logits), the last position of the candidates predicts nothing and is not computed, the decoder's K/V of the
  question once per question: fewer FLOPs than BLIP's, and no host synchronisation (BLIP's
  ``topk_ids[max_topk_ids >= 0, max_topk_ids]`` is a boolean index).
- Generation (:meth:`BlipVQA.generate_answers`): beam search (3 beams, at most 10 tokens, at least 1) from [DEC]
  with transformers' ``generate``; as in BLIP, the decoder attends to every question position there, padding
  included (BLIP passes ``torch.ones`` as the question mask in this mode only).

Weights use HF's ``BlipForQuestionAnswering`` names (``vision_model.*``, ``text_encoder.*``, ``text_decoder.*``);
:meth:`BlipVQA.load_lavis_state_dict` reads Salesforce BLIP VQA checkpoints (``model_base_vqa_capfilt_large.pth``,
``model_large_vqa.pth``) and pre-training checkpoints as initialisation (position embeddings interpolated to the
task's 480 px, the pre-training heads, momentum encoders and queues left out and listed);
:meth:`BlipVQA.from_hf` takes an HF ``BlipForQuestionAnswering``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput

from .. import convert
from ._checks import check_text
from .blip import BlipTextLMHeadModel, BlipTextModel
from .blip_config import TEXT_FIELDS, VISION_FIELDS, BlipTaskConfig, config_fields
from .blip_finetune import (TaskCheckpoints, TaskLoad, check_embeds, check_pixels, enc_ids, load_task_checkpoint,
                            task_vit, vision_tokens)

__all__ = ["BlipVQA", "BlipVQAConfig", "BlipVQAOutput", "PRETRAIN_EXTRAS"]

# what a pre-training checkpoint holds beyond a task model (BLIP's load_checkpoint leaves it out: strict=False)
PRETRAIN_EXTRAS = (r"vision_model_m\.", r"text_encoder_m\.", r"vision_proj", r"text_proj", r"itm_head\.", r"temp\Z",
                   r"(image|text|idx)_queue\Z", r"(queue_ptr|ptr_queue)\Z")
IGNORE = -100


class BlipVQAConfig(BlipTaskConfig):
    """:class:`~blipfast.models.blip_config.BlipTaskConfig` at BLIP's VQA resolution (480 px, ``configs/vqa.yaml``)."""

    IMAGE_SIZE = 480


@dataclass
class BlipVQAOutput(ModelOutput):
    """``loss``: BLIP's weighted answer loss; ``answer_loss`` [N]: each answer's summed label-smoothed token loss."""

    loss: Optional[torch.Tensor] = None
    answer_loss: Optional[torch.Tensor] = None


def _seq_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per row of ``logits`` [R, T, V] the summed label-smoothed cross-entropy against ``targets`` [R, T] (-100: no
    target), in float32 (float64 stays): BLIP's ``CrossEntropyLoss(reduction='none', label_smoothing=0.1)`` summed
    per sequence."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(x.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none",
                         label_smoothing=smoothing)
    return ce.view(targets.shape).sum(1)


class BlipVQA(TaskCheckpoints, nn.Module):
    """BLIP's VQA model (see the module docstring)."""

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = BlipVQAConfig.of(config)
        self.config = cfg
        self.vision_model = task_vit(cfg.vision, cfg.drop_path_rate)
        self.text_encoder = BlipTextModel(cfg.text, add_pooling_layer=False)
        # BLIP's decoder config is med_config.json as is: its cross-attention reads the text width (the question)
        self.text_decoder = BlipTextLMHeadModel(cfg.text, encoder_hidden_size=cfg.text.hidden_size)

    # ------------------------------------------------------------------------------------------
    # the pieces

    def _check_question(self, image_embeds, question_ids, question_mask):
        check_embeds("BlipVQA", image_embeds, self.config.vision.hidden_size)
        check_text("BlipVQA", question_ids, question_mask, image_embeds.shape[0],
                   self.config.text.max_position_embeddings, image_embeds.device, "the image input")

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT tokens [B, N, width] of ``pixel_values`` [B, 3, S, S]."""
        check_pixels("BlipVQA", pixel_values, self.config.vision.image_size)
        return vision_tokens(self.vision_model, pixel_values)

    def question_states(self, image_embeds: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                        image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The image-grounded encoder's states [B, Tq, d] of the questions (``question_ids`` [B, Tq] BERT-tokenised,
        [CLS] first: BLIP's [ENC] replaces it) over ``image_embeds`` [M, N, width] (video: the frames' tokens
        concatenated); ``image_index`` [B]: the image of each question when M != B (several questions of one
        image share its K/V)."""
        if image_index is None:
            self._check_question(image_embeds, question_ids, question_mask)
        else:
            check_embeds("BlipVQA", image_embeds, self.config.vision.hidden_size)
            check_text("BlipVQA", question_ids, question_mask, question_ids.shape[0],
                       self.config.text.max_position_embeddings, image_embeds.device, "the image input")
        te = self.text_encoder
        kv = te.image_kv(image_embeds)
        return te(enc_ids(question_ids, self.config.enc_token_id), attention_mask=question_mask != 0,
                  encoder_kv=kv, kv_index=image_index).last_hidden_state

    def _image(self, pixel_values, image_embeds):
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("BlipVQA: give pixel_values or image_embeds (one of them)")
        return self.image_embeds(pixel_values) if image_embeds is None else image_embeds

    def _answers(self, answer_ids, answer_mask, answer_weight, answer_index, b: int, dev):
        """(ids [N, Ta] with [DEC] first, mask bool [N, Ta], weight [N], question index [N]) of the answers."""
        if not isinstance(answer_ids, torch.Tensor) or answer_ids.dim() not in (2, 3):
            raise ValueError("BlipVQA: answer_ids must be [N, Ta] (with answer_index) or [B, A, Ta] (A answer slots "
                             "per question)")
        if answer_ids.dim() == 3:
            if answer_index is not None:
                raise ValueError("BlipVQA: answer_index goes with flat answer_ids [N, Ta], not [B, A, Ta]")
            if answer_ids.shape[0] != b:
                raise ValueError(f"BlipVQA: answer_ids [B, A, Ta] needs B = {b} (the questions), got "
                                 f"{list(answer_ids.shape)}")
            a = answer_ids.shape[1]
            for name, t, dims in (("answer_mask", answer_mask, 3), ("answer_weight", answer_weight, 2)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(answer_ids.shape[:dims]):
                    raise ValueError(f"BlipVQA: {name} must be {list(answer_ids.shape[:dims])} with answer_ids "
                                     f"[B, A, Ta], got {list(t.shape) if isinstance(t, torch.Tensor) else t!r}")
            answer_index = torch.arange(b * a, device=dev) // a
            answer_ids, answer_mask, answer_weight = answer_ids.flatten(0, 1), answer_mask.flatten(0, 1), \
                answer_weight.flatten()
        n = answer_ids.shape[0]
        check_text("BlipVQA", answer_ids, answer_mask, n, self.config.text.max_position_embeddings, dev,
                   "the image input")
        if answer_ids.shape[1] < 2:
            raise ValueError("BlipVQA: answers need at least 2 tokens ([DEC] and one to predict)")
        if not isinstance(answer_weight, torch.Tensor) or answer_weight.shape != (n,) \
                or not answer_weight.is_floating_point() or answer_weight.device != dev:
            raise ValueError(f"BlipVQA: answer_weight must be a float tensor [{n}] on {dev}")
        if answer_index is None:
            if n != b:
                raise ValueError(f"BlipVQA: {n} answers for {b} questions: pass answer_index (long [{n}]: the "
                                 f"question of each answer)")
            answer_index = torch.arange(n, device=dev)
        elif not isinstance(answer_index, torch.Tensor) or answer_index.shape != (n,) \
                or answer_index.dtype not in (torch.int64, torch.int32) or answer_index.device != dev:
            raise ValueError(f"BlipVQA: answer_index must be an int64 tensor [{n}] on {dev}")
        ids = torch.cat([torch.full_like(answer_ids[:, :1], self.config.bos_token_id), answer_ids[:, 1:]], 1).long()
        return ids, answer_mask != 0, answer_weight, answer_index.long()

    def _targets(self, ids: torch.Tensor) -> torch.Tensor:
        pad = self.config.text.pad_token_id
        return ids if pad is None else ids.masked_fill(ids == pad, IGNORE)

    # ------------------------------------------------------------------------------------------
    # training

    def forward(self, pixel_values: Optional[torch.Tensor] = None, question_ids: Optional[torch.Tensor] = None,
                question_mask: Optional[torch.Tensor] = None, answer_ids: Optional[torch.Tensor] = None,
                answer_mask: Optional[torch.Tensor] = None, answer_weight: Optional[torch.Tensor] = None,
                answer_index: Optional[torch.Tensor] = None, *, image_embeds: Optional[torch.Tensor] = None
                ) -> BlipVQAOutput:
        """BLIP's training loss. ``pixel_values`` [B, 3, S, S] (or ``image_embeds`` [B, N, width]); ``question_ids``
        / ``question_mask`` [B, Tq]; the answers either flat, ``answer_ids`` / ``answer_mask`` [N, Ta] with
        ``answer_weight`` [N] and ``answer_index`` [N] (the question of each answer; BLIP's ``n`` counts), or in
        fixed slots, ``answer_ids`` [B, A, Ta] with ``answer_weight`` [B, A] (an unused slot: weight 0, no token
        after the first). The first answer token becomes [DEC]; [PAD] positions are no targets."""
        embeds = self._image(pixel_values, image_embeds)
        b, dev = embeds.shape[0], embeds.device
        q = self.question_states(embeds, question_ids, question_mask)
        ids, mask, weight, index = self._answers(answer_ids, answer_mask, answer_weight, answer_index, b, dev)
        dec = self.text_decoder
        kv = dec.bert.image_kv(q, question_mask)
        h = dec.bert(ids, attention_mask=mask, encoder_kv=kv, kv_index=index, is_decoder=True,
                     use_cache=False).last_hidden_state
        per_answer = _seq_loss(dec.logits(h[:, :-1]), self._targets(ids)[:, 1:], dec.label_smoothing)
        loss = (weight.to(per_answer.dtype) * per_answer).sum() / b
        return BlipVQAOutput(loss=loss, answer_loss=per_answer)

    # ------------------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def rank_answers(self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                     answer_mask: torch.Tensor, k: int = 128, *, chunk: int = 4096) -> tuple:
        """BLIP's ``rank_answer`` (see the module docstring): ``question_states`` [Q, Tq, d] and ``question_mask``
        [Q, Tq] (from :meth:`question_states`), the candidate list ``answer_ids`` / ``answer_mask`` [C, Ta]
        (tokenised with padding to the longest, [CLS] first: [DEC] replaces it). Returns (the chosen candidate
        of each question [Q] long, the candidates considered [Q, k], their summed token losses [Q, k]).
        ``k`` is capped at C; ``chunk``: rows of logits made at a time."""
        qn, tq = question_states.shape[:2]
        dev = question_states.device
        c, ta = answer_ids.shape
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"BlipVQA.rank_answers: k must be a positive int, got {k!r}")
        if ta < 2 or answer_mask.shape != answer_ids.shape:
            raise ValueError("BlipVQA.rank_answers: answer_ids [C, Ta >= 2] with answer_mask of its shape")
        k = min(k, c)
        dec = self.text_decoder
        eps = dec.label_smoothing
        ids = torch.cat([torch.full_like(answer_ids[:, :1], self.config.bos_token_id), answer_ids[:, 1:]], 1).long()
        targets = self._targets(ids)
        kv = dec.bert.image_kv(question_states, question_mask)

        # [DEC] once per question: its logits pick the candidates, its self-attention K/V serve them all
        cache = DynamicCache()
        bos = ids[:1, :1].expand(qn, 1)
        h0 = dec.bert(bos, attention_mask=torch.ones(qn, 1, dtype=torch.bool, device=dev), encoder_kv=kv,
                      is_decoder=True, cache=cache, use_cache=False).last_hidden_state
        logits0 = dec.logits(h0[:, 0])
        logits0 = logits0 if logits0.dtype == torch.float64 else logits0.float()
        prob_first = F.softmax(logits0, dim=1).index_select(1, ids[:, 1])  # [Q, C]
        top_ids = prob_first.topk(k, dim=1).indices  # [Q, k]
        # the first target's loss, from the [DEC] logits
        logp = F.log_softmax(logits0, dim=1)
        first = targets[:, 1][top_ids]  # [Q, k]
        nll = -logp.gather(1, first.clamp_min(0))
        loss = torch.where(first != IGNORE, (1.0 - eps) * nll - eps * logp.mean(1, keepdim=True), 0.0)

        if ta > 2:  # positions 1 .. Ta-2 predict targets 2 .. Ta-1 (position Ta-1 predicts nothing)
            rows = top_ids.flatten()
            qidx = torch.arange(qn * k, device=dev) // k
            past = DynamicCache()
            for i, layer in enumerate(cache.layers):
                past.update(layer.keys.index_select(0, qidx), layer.values.index_select(0, qidx), i)
            cand = ids.index_select(0, rows)[:, 1:ta - 1]
            mask = torch.cat([torch.ones(qn * k, 1, dtype=torch.bool, device=dev),
                              answer_mask.index_select(0, rows)[:, 1:ta - 1] != 0], 1)
            h = dec.bert(cand, attention_mask=mask, encoder_kv=kv, kv_index=qidx, is_decoder=True, cache=past,
                         use_cache=False).last_hidden_state
            tgt = targets.index_select(0, rows)[:, 2:]
            rest = torch.cat([_seq_loss(dec.logits(h[r:r + chunk]), tgt[r:r + chunk], eps)
                              for r in range(0, qn * k, chunk)])
            loss = loss + rest.view(qn, k).to(loss.dtype)
        best = (-loss).argmax(dim=1)
        return top_ids.gather(1, best[:, None]).squeeze(1), top_ids, loss

    @torch.no_grad()
    def generate_answers(self, question_states: torch.Tensor, *, num_beams: int = 3, max_length: int = 10,
                         min_length: int = 1, **kwargs) -> torch.Tensor:
        """Beam search from [DEC] over ``question_states`` [Q, Tq, d] (BLIP: 3 beams, at most 10 tokens, at
        least 1, [SEP] ends an answer; every question position attended, padding included, as BLIP); the token ids
        [Q, L] ([DEC] first; decode with ``skip_special_tokens=True``)."""
        cfg = self.config.text
        qn, dev = question_states.shape[0], question_states.device
        bos = torch.full((qn, 1), self.config.bos_token_id, dtype=torch.long, device=dev)
        return self.text_decoder.generate(
            input_ids=bos, attention_mask=torch.ones_like(bos), encoder_hidden_states=question_states,
            encoder_attention_mask=torch.ones(question_states.shape[:2], dtype=torch.long, device=dev),
            num_beams=num_beams, max_length=max_length, min_length=min_length, eos_token_id=cfg.sep_token_id,
            pad_token_id=cfg.pad_token_id, **kwargs)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def load_lavis_state_dict(self, state_dict, what: str = "BlipVQA.load_lavis_state_dict") -> TaskLoad:
        """A Salesforce BLIP VQA checkpoint, or a pre-training one as initialisation (BLIP's ``load_checkpoint``:
        see :func:`~blipfast.models.blip_finetune.load_task_checkpoint`); HF names work too."""
        return load_task_checkpoint(self, state_dict, drop=PRETRAIN_EXTRAS, what=what)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, **config) -> "BlipVQA":
        """A BlipVQA with the weights of an HF ``BlipForQuestionAnswering`` (its text and vision configs; [DEC] is the
        text config's ``bos_token_id`` and [ENC] the next id, as in BLIP's tokenizer; ``config``:
        :class:`BlipVQAConfig` fields over these, e.g. ``enc_token_id``)."""
        c = hf_model.config
        text = {k: v for k, v in config_fields(c.text_config, TEXT_FIELDS).items() if v is not None}
        bos = c.text_config.bos_token_id
        ids = {"bos_token_id": bos, "enc_token_id": bos + 1} if isinstance(bos, int) else {}
        model = cls(BlipVQAConfig(text=text, vision=config_fields(c.vision_config, VISION_FIELDS),
                                  **{"drop_path_rate": 0.0, **ids, **config}))
        w = hf_model.text_encoder.embeddings.word_embeddings.weight
        model.to(device=w.device, dtype=w.dtype)
        convert.load_into(model, hf_model.state_dict(), what="BlipVQA.from_hf")
        return model.train(hf_model.training)
