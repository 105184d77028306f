"""Q-Former-only captioning with the stage-1 LM head (LAVIS ``Blip2Qformer.generate``, docs/semantics.md#generation).

LAVIS decodes with the Q-Former's BERT LM head through transformers' ``generate``: the sequence starts with
[DEC], the first step runs [queries | [DEC]] under the ``causal`` mask (queries see the queries and cross-attend
the image, text sees the queries and its prefix), [SEP] ends a caption; beam 3, max 30, min 10 by default, or
nucleus sampling (one sequence per image, top-p 0.9, transformers 4.x' default top-k 50).

Here transformers' ``generate`` runs the search (beam, greedy, sampling, length penalty, min/max length: its own
code), over :class:`QFormerCaptioner`, a small generation model whose forward returns the next-token logits of
the last position. Transformers sees a model without a cache (``use_cache=False``: each call receives the whole
sequences); the captioner keeps its own:

- the image: ``ln_vision`` and every cross layer's K/V once per image, then the query rows' self-attention K/V of
  every layer once per image (a query row never sees text, so they are the same at every step and for every
  beam); beams and sampled sequences point at their image with an index;
- the text: every layer's self-attention K/V of the tokens so far ([queries | tokens], per row), extended by
  the new token at each step through ``QFormer.forward(past_query_kv=..., return_query_kv=True)``: a step runs
  the Q-Former over ONE token per sequence.

Each call's rows extend the previous call's rows by one token (beam search reorders them): the cache of a row is
the cache of a previous row of the same image with the same prefix, found by comparing the token ids on the
device (one host sync per step to confirm that every row found its prefix; transformers' stopping check syncs
every step anyway). When a row has no such prefix (the first call, or a generation strategy that edits the
sequences) the captioner recomputes its cache from the queries' K/V, so the answer never depends on how
transformers drives the model. ``use_cache=False`` is the uncached loop: the full [queries | tokens] pass with
the image's K/V at every step (the tests check the two give the same tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

# BERT's [SEP] and [PAD] (bert-base-uncased), the Q-Former tokenizer's EOS and padding
SEP_TOKEN_ID = 102


class QFormerCaptioner(PreTrainedModel, GenerationMixin):
    """A generation model over a :class:`~blipfast.Blip2Stage1` and a batch of images (see the module doc).

    ``forward(input_ids [N, t], image_index [N])`` returns the logits [N, 1, vocab] of the next token of each
    sequence; ``image_index`` says which image of the batch a sequence describes (transformers expands it with
    the beams). Built by :func:`generate`; it holds no parameters of its own (``model`` is not a submodule).
    """

    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(self, model, image_embeds: torch.Tensor, use_cache: bool = True, eos_token_id: int = SEP_TOKEN_ID):
        qc = model.config.qformer
        cfg = PretrainedConfig(vocab_size=qc.vocab_size, bos_token_id=model.config.bos_token_id,
                               eos_token_id=eos_token_id, pad_token_id=qc.pad_token_id, is_encoder_decoder=False)
        super().__init__(cfg)
        w = model.query_tokens
        # transformers reads device and dtype from the parameters: an empty anchor on the model's device
        self._anchor = nn.Parameter(torch.empty(0, device=w.device, dtype=w.dtype), requires_grad=False)
        self._model = (model,)  # a tuple: not registered as a submodule
        self.use_cache = use_cache
        b = self.num_images = image_embeds.shape[0]
        self.num_query = model.config.num_query_tokens
        self._image_kv = model.image_kv(image_embeds)
        if use_cache:
            out = model.qformer(model.query_embeds(None, b), encoder_kv=self._image_kv, mode="causal",
                                return_query_kv=True)
            self._query_kv = out.query_kv  # per layer (k, v) [B, Q, H, D], once per image
            self._image_kv = None  # only the queries' K/V are needed from here on
        self._ids: Optional[torch.Tensor] = None  # the rows of the previous call [N', t - 1] ...
        self._index: Optional[torch.Tensor] = None  # ... their images [N'] ...
        self._cache = None  # ... and their per-layer (k, v) [N', Q + t - 1, H, D]
        self.prefills = 0  # how many calls recomputed the text cache from the queries (tests, diagnostics)

    @property
    def stage1(self):
        return self._model[0]

    def prepare_inputs_for_generation(self, input_ids, image_index=None, **kwargs):
        return {"input_ids": input_ids, "image_index": image_index}

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.stage1.qformer_lm_head(hidden)
        return logits if logits.dtype == torch.float64 else logits.float()

    def forward(self, input_ids: torch.LongTensor, image_index: Optional[torch.Tensor] = None, **kwargs):
        model = self.stage1
        n, t = input_ids.shape
        if image_index is None or image_index.shape != (n,):
            raise ValueError(f"QFormerCaptioner: image_index must be a long tensor [{n}] (one image per sequence)")
        if not self.use_cache:  # the uncached loop: [queries | tokens] under the causal mask, image K/V per row
            emb = model.query_embeds(input_ids, n)
            h = model.qformer(emb, query_length=self.num_query, encoder_kv=self._image_kv, kv_index=image_index,
                              mode="causal").last_hidden_state
            return CausalLMOutput(logits=self._logits(h[:, -1:]))
        src = self._prefix_rows(input_ids, image_index)
        if src is None:  # recompute every row's text cache from its image's query K/V
            self.prefills += 1
            past = [(k.index_select(0, image_index), v.index_select(0, image_index)) for k, v in self._query_kv]
            new_ids, start = input_ids, 0
        else:
            past = [(k.index_select(0, src), v.index_select(0, src)) for k, v in self._cache]
            new_ids, start = input_ids[:, -1:], t - 1
        pos = torch.arange(start, t, device=input_ids.device)[None]
        out = model.qformer(model.embeddings(new_ids, position_ids=pos), past_query_kv=past, return_query_kv=True)
        self._ids, self._index, self._cache = input_ids, image_index, out.query_kv
        return CausalLMOutput(logits=self._logits(out.last_hidden_state[:, -1:]))

    def _prefix_rows(self, input_ids: torch.Tensor, image_index: torch.Tensor) -> Optional[torch.Tensor]:
        """For each row, a row of the previous call with the same image and the same ids but the last (the rows
        of one prefix all hold the same cache); None when some row has none (one host sync). Transformers
        expands the images by a whole factor g (beams, returned sequences) with ``repeat_interleave``, so the
        candidates of a row are the g rows of its block; any other layout finds no prefix and recomputes."""
        prev = self._ids
        n, t = input_ids.shape
        b = self.num_images
        if prev is None or prev.shape != (n, t - 1) or n % b:
            return None
        g = n // b
        cur = input_ids[:, :-1].view(b, g, 1, t - 1)
        same = (cur == prev.view(b, 1, g, t - 1)).all(-1)  # [B, g (new row), g (previous row)]
        same &= (image_index.view(b, g, 1) == self._index.view(b, 1, g))
        if not bool(same.any(-1).all()):
            return None
        base = torch.arange(0, n, g, device=input_ids.device).view(b, 1)
        return (same.to(torch.int8).argmax(-1) + base).view(n)


def _check_image_embeds(model, image_embeds) -> None:
    width = model.config.qformer.encoder_hidden_size
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != width \
            or not image_embeds.is_floating_point() or image_embeds.shape[0] == 0 or image_embeds.shape[1] == 0:
        got = (f"{list(image_embeds.shape)} {image_embeds.dtype}" if isinstance(image_embeds, torch.Tensor)
               else type(image_embeds).__name__)
        raise ValueError(f"Blip2Stage1.generate: image_embeds must be a non-empty float tensor [B, N, {width}] (ViT "
                         f"tokens before ln_vision), got {got}")
    if image_embeds.device != model.query_tokens.device:
        raise ValueError(f"Blip2Stage1.generate: image_embeds is on {image_embeds.device} but the model on "
                         f"{model.query_tokens.device}")


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"Blip2Stage1.generate: {name} must be an int >= {low}, got {v!r}")


@torch.no_grad()
def generate(model, image_embeds: torch.Tensor, *, num_beams: int = 3, max_length: int = 30, min_length: int = 10,
             top_p: Optional[float] = None, top_k: int = 50, repetition_penalty: float = 1.0,
             eos_token_id: int = SEP_TOKEN_ID, use_cache: bool = True, **generate_kwargs) -> torch.LongTensor:
    """Captions of B images as token ids [B, L] starting with [DEC] (``bos_token_id``), [SEP]-terminated and
    [PAD]-filled after it (decode with the BERT tokenizer, ``skip_special_tokens=True``).

    ``image_embeds`` [B, N, vision width]: ViT tokens before ``ln_vision``. Beam search with ``num_beams`` (LAVIS:
    3), ``max_length`` / ``min_length`` counting the [DEC] start (LAVIS: 30 / 10); ``top_p`` switches to nucleus
    sampling of one sequence per image with ``top_k`` (LAVIS: ``top_p=0.9``, top-k 50 from transformers 4.x'
    defaults); ``repetition_penalty`` as in transformers. Further keywords go to transformers' ``generate``
    (e.g. ``num_return_sequences``, ``length_penalty``, ``generator`` is not one: seed with ``torch.manual_seed``).
    ``use_cache=False`` runs the uncached loop (the whole sequence every step).
    """
    _check_image_embeds(model, image_embeds)
    _check_int("num_beams", num_beams, 1)
    _check_int("max_length", max_length, 2)
    _check_int("min_length", min_length, 0)
    if max_length > model.config.qformer.max_position_embeddings:
        raise ValueError(f"Blip2Stage1.generate: max_length ({max_length}) exceeds the Q-Former's "
                         f"max_position_embeddings ({model.config.qformer.max_position_embeddings})")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"Blip2Stage1.generate: top_p must be None (beam search) or a float in (0, 1], got {top_p!r}")
    was_training = model.training
    model.eval()
    try:
        runner = QFormerCaptioner(model, image_embeds, use_cache=use_cache, eos_token_id=eos_token_id)
        b = image_embeds.shape[0]
        dev = image_embeds.device
        start = torch.full((b, 1), model.config.bos_token_id, dtype=torch.long, device=dev)
        sampling = top_p is not None
        kw = dict(max_length=max_length, min_length=min_length, num_beams=1 if sampling else num_beams,
                  do_sample=sampling, repetition_penalty=repetition_penalty, length_penalty=1.0, early_stopping=False,
                  bos_token_id=model.config.bos_token_id, eos_token_id=eos_token_id,
                  pad_token_id=model.config.qformer.pad_token_id)
        if sampling:
            kw.update(top_p=float(top_p), top_k=top_k)
        kw.update(generate_kwargs)
        out = runner.generate(start, image_index=torch.arange(b, device=dev), use_cache=False, **kw)
        # [PAD] after the first [SEP] (transformers' beam search can repeat [SEP] when it pads a finished
        # hypothesis that already holds one)
        after = (out == eos_token_id).long().cumsum(1) - (out == eos_token_id).long() > 0
        return out.masked_fill(after, model.config.qformer.pad_token_id)
    finally:
        model.train(was_training)
