"""BLIP-2 stage 1 (ITC + ITM + ITG, LAVIS ``Blip2Qformer`` semantics, docs/semantics.md#stage-1-losses) as one fused
step.

LAVIS runs a stage-1 step as four Q-Former passes (image, text, ITM over 3B sequences, ITG), computes every
image's cross-attention K/V four times, builds dense masks and draws each hard negative with a host sync.
``Blip2Stage1.forward`` runs the same losses as:

1. ``ln_vision`` and ONE ``QFormer.image_kv`` call: each image's K/V of every cross layer, once per step;
2. ONE pass over [queries | text | decoder text] with the ``itc_itg`` mask: the query rows see the queries and
   cross-attend the image, the text rows their text (LAVIS' separate image and text passes of ITC, ``unimodal``),
   the decoder rows the queries and their prefix (LAVIS' ITG pass over the image pass' cached query K/V,
   ``causal``; the gradient reaches the queries, cross-attention and ``ln_vision``), then the LM head;
3. ``ops.itc_loss`` (fused, gathered over the process group) and ``ops.sample_hard_negatives`` (on the device,
   no host sync), or the given ``negatives``;
4. the ITM pass over 3B sequences [pos, pos, negative text] x [pos, negative image, pos]: the image K/V of
   step 1 are shared through ``kv_index`` (under torch.distributed the chosen negative images of other ranks
   are fetched by ``blipfast.distributed.exchange_itm_negatives`` and only those get their K/V computed here);
   its last layer computes the query rows only (``query_output_only``: the ITM head reads nothing else).

No dense mask, no host synchronisation: ``torch.compile(model, fullgraph=True)`` traces the whole step, and on
CUDA the step (forward, backward, optimizer) can be captured in a CUDA graph (``torch.cuda.graphs``; see
docs/blip2-stage1.md#how-the-step-runs). Deliberate differences from LAVIS: a batch without any next-token target
(T = 1) gives ``loss_lm = 0`` where LAVIS' mean over no tokens is NaN; a global batch of one has no negatives, so ITM
trains on the positive pair alone (LAVIS' sampler crashes there); the gathered ITC features are constants also in a
single process (docs/semantics.md#itc).

Weights: the module names follow the HF key space of ``blipfast.convert`` (``qformer.*``, ``embeddings.*``,
``query_tokens``, ``vision_projection``, ``text_projection``, ``itm_head``, ``temp``, ``qformer_lm_head.*``) with
``ln_vision`` for HF's ``vision_model.post_layernorm``; ``from_lavis`` / ``to_lavis_state_dict`` and ``from_hf``
convert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .. import convert, ops
from ..distributed import exchange_itm_negatives, group_info, itm_batch_indices
from ..ops import linear_cross_entropy
from ._checks import check_index, check_text
from .layers import activation, init_weights
from .losses import itm_loss
from .qformer import QFormer, QFormerConfig, QFormerEmbeddings

# the Q-Former of stage 1: BERT-base with the [DEC] token (vocab 30523) and the text FFN
_QFORMER_DEFAULTS = {"vocab_size": 30523, "use_qformer_text_input": True}


class Blip2Stage1Config:
    """Configuration of :class:`Blip2Stage1` (field names of the stage-1 issue; defaults of LAVIS' stage 1).

    ``qformer`` is a :class:`QFormerConfig`, a dict or an HF ``Blip2QFormerConfig``; its ``vocab_size`` includes
    ``[DEC]`` (30523 unless given) and its ``encoder_hidden_size`` is the vision width; the text FFN is always
    on. ``Blip2Stage1Config(**config.to_dict())`` rebuilds a config.
    """

    FIELDS = ("num_query_tokens", "embed_dim", "max_txt_len", "bos_token_id", "ln_vision_eps",
              "itc_label_smoothing", "lm_label_smoothing")

    def __init__(self, qformer: Any = None, num_query_tokens: int = 32, embed_dim: int = 256, max_txt_len: int = 32,
                 bos_token_id: int = 30522, ln_vision_eps: float = 1e-5, itc_label_smoothing: float = 0.1,
                 lm_label_smoothing: float = 0.1):
        if qformer is None:
            qformer = QFormerConfig(**_QFORMER_DEFAULTS)
        elif isinstance(qformer, dict):
            qformer = QFormerConfig({**_QFORMER_DEFAULTS, **qformer})
        elif isinstance(qformer, QFormerConfig) or hasattr(qformer, "hidden_size") or hasattr(qformer, "qformer_config"):
            qformer = QFormerConfig(qformer)
        else:
            raise TypeError(f"Blip2Stage1Config: qformer must be a QFormerConfig, a dict or a Blip2QFormerConfig, got "
                            f"{type(qformer).__name__}")
        if not qformer.use_qformer_text_input:
            qformer = QFormerConfig(qformer, use_qformer_text_input=True)
        self.qformer = qformer
        self.num_query_tokens = num_query_tokens
        self.embed_dim = embed_dim
        self.max_txt_len = max_txt_len
        self.bos_token_id = bos_token_id
        self.ln_vision_eps = ln_vision_eps
        self.itc_label_smoothing = itc_label_smoothing
        self.lm_label_smoothing = lm_label_smoothing
        self._validate()

    def _validate(self) -> None:
        def err(msg):
            raise ValueError(f"Blip2Stage1Config: {msg}")

        for name in ("num_query_tokens", "embed_dim", "max_txt_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                err(f"{name} must be a positive int, got {v!r}")
        if self.max_txt_len > self.qformer.max_position_embeddings:
            err(f"max_txt_len ({self.max_txt_len}) exceeds the Q-Former's max_position_embeddings "
                f"({self.qformer.max_position_embeddings})")
        v = self.bos_token_id
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.qformer.vocab_size:
            err(f"bos_token_id must be an int in [0, vocab_size={self.qformer.vocab_size}), got {v!r} (the Q-Former's "
                f"vocab_size must include [DEC])")
        if isinstance(self.ln_vision_eps, bool) or not isinstance(self.ln_vision_eps, (int, float)) \
                or not self.ln_vision_eps > 0:
            err(f"ln_vision_eps must be a positive float, got {self.ln_vision_eps!r}")
        for name in ("itc_label_smoothing", "lm_label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                err(f"{name} must be a float in [0, 1], got {v!r}")

    def to_dict(self) -> dict:
        return {"qformer": self.qformer.to_dict(), **{k: getattr(self, k) for k in self.FIELDS}}

    def __eq__(self, other):
        return isinstance(other, Blip2Stage1Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "Blip2Stage1Config(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


class _LMTransform(nn.Module):  # LAVIS/BERT BertPredictionHeadTransform: dense, act, LayerNorm
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class QFormerLMHead(nn.Module):
    """The Q-Former's LM head (LAVIS ``Qformer.cls.predictions``): dense -> act -> LayerNorm -> decoder + bias.
    ``decoder.weight`` is tied to the word embeddings by the owner; ``decoder.bias`` is ``bias``."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = _LMTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = self.decoder.bias
        self._act = activation(cfg.hidden_act)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        t = self.transform
        return t.LayerNorm(self._act(t.dense(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.hidden(h))


@dataclass
class Blip2Stage1Output(ModelOutput):
    """``loss`` = ``loss_itc + loss_itm + loss_lm``; the ITC logits ``s_i2t`` / ``s_t2i`` [B, BW] (detached) and
    the negatives drawn from them (or given) as global indices [B] (-1: nothing drawable)."""

    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_itm: Optional[torch.Tensor] = None
    loss_lm: Optional[torch.Tensor] = None
    s_i2t: Optional[torch.Tensor] = None
    s_t2i: Optional[torch.Tensor] = None
    neg_text_index: Optional[torch.Tensor] = None
    neg_image_index: Optional[torch.Tensor] = None


def _check_batch(image_embeds, input_ids, attention_mask, width: int, max_len: int) -> None:
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != width \
            or not image_embeds.is_floating_point():
        got = (f"{list(image_embeds.shape)} {image_embeds.dtype}" if isinstance(image_embeds, torch.Tensor)
               else type(image_embeds).__name__)
        raise ValueError(f"Blip2Stage1: image_embeds must be a float tensor [B, N, {width}] (ViT tokens before "
                         f"ln_vision), got {got}")
    b = image_embeds.shape[0]
    if b == 0 or image_embeds.shape[1] == 0:
        raise ValueError(f"Blip2Stage1: image_embeds must be non-empty, got {list(image_embeds.shape)}")
    check_text("Blip2Stage1", input_ids, attention_mask, b, max_len, image_embeds.device, "image_embeds")


def _check_index(name: str, t, b: int, device) -> torch.Tensor:
    return check_index("Blip2Stage1", name, t, b, device, "image_embeds")


class Blip2Stage1(nn.Module):
    """BLIP-2 stage-1 pre-training model (ITC + ITM + ITG) on blipfast's fused ops; see the module docstring."""

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = config if isinstance(config, Blip2Stage1Config) else (
            Blip2Stage1Config(**config) if isinstance(config, dict) else Blip2Stage1Config() if config is None else None)
        if cfg is None:
            raise TypeError(f"Blip2Stage1: config must be a Blip2Stage1Config or a dict, got {type(config).__name__}")
        self.config = cfg
        q = cfg.qformer
        d = q.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, d))
        self.ln_vision = nn.LayerNorm(q.encoder_hidden_size, eps=cfg.ln_vision_eps)
        self.qformer = QFormer(q)
        self.embeddings = QFormerEmbeddings(q)
        self.qformer_lm_head = QFormerLMHead(q)
        self.vision_projection = nn.Linear(d, cfg.embed_dim)
        self.text_projection = nn.Linear(d, cfg.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for m in (self.ln_vision, self.qformer_lm_head, self.vision_projection, self.text_projection, self.itm_head):
            init_weights(m, q.initializer_range)
        with torch.no_grad():
            self.query_tokens.normal_(0.0, q.initializer_range)
        self.qformer_lm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as in LAVIS

    # ------------------------------------------------------------------------------------------
    # the pieces (also used by retrieval and captioning)

    def image_kv(self, image_embeds: torch.Tensor):
        """``ln_vision`` and every cross layer's K/V of M images ([M, N, width] ViT tokens before ``ln_vision``)."""
        x = image_embeds.to(self.ln_vision.weight.dtype)
        return self.qformer.image_kv(self.ln_vision(x))

    def query_embeds(self, input_ids: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """[queries | text embeddings] of n row-sets (queries only without ``input_ids``)."""
        queries = self.query_tokens.expand(n, -1, -1)
        return queries if input_ids is None else self.embeddings(input_ids, query_embeds=queries)

    def image_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """Normalised projections [B, Q, E] of the query outputs (ITC, retrieval)."""
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def text_features(self, cls_output: torch.Tensor) -> torch.Tensor:
        """Normalised projection [B, E] of the text [CLS] output (ITC, retrieval)."""
        return F.normalize(self.text_projection(cls_output), dim=-1)

    def itm_logits(self, query_output: torch.Tensor) -> torch.Tensor:
        """[B, 2] ITM logits: the ITM head over the Q query outputs, averaged."""
        return self.itm_head(query_output).mean(dim=1)

    def lm_loss(self, hidden: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        """Label-smoothed next-token cross-entropy of the ITG pass (LAVIS: labels = decoder ids with [PAD]
        -> -100, token t + 1 predicted from position t, mean over the targets; 0 when there is none)."""
        pad = self.config.qformer.pad_token_id
        targets = decoder_ids[:, 1:]
        if pad is not None:
            targets = targets.masked_fill(targets == pad, -100)
        head = self.qformer_lm_head
        x = head.hidden(hidden[:, :-1]).reshape(-1, hidden.shape[-1])
        return linear_cross_entropy(x, head.decoder.weight, head.decoder.bias, targets.reshape(-1),
                                    label_smoothing=self.config.lm_label_smoothing)

    # ------------------------------------------------------------------------------------------

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                image_ids: Optional[torch.Tensor] = None, negatives: Optional[tuple] = None,
                process_group=None, sample_seed=None) -> Blip2Stage1Output:
        """One stage-1 step's losses (see the module docstring).

        ``image_embeds`` [B, N, vision width]: the frozen ViT's outputs BEFORE ``ln_vision``; ``input_ids`` /
        ``attention_mask`` [B, T]: BERT-tokenised captions starting with [CLS] (1 = token, 0 = padding);
        ``image_ids`` [B]: pairs showing the same image are positives (COCO fine-tuning); ``negatives``:
        ``(neg_text_index, neg_image_index)`` global indices as ``ops.sample_hard_negatives`` returns them
        (replaces the sampling); ``process_group``: the group ITC and the negatives are gathered over (default:
        the default group when torch.distributed is initialised, else one process); ``sample_seed``: the seed of
        the hard-negative draw (an int or an int64 tensor with one element on the device; default: drawn from
        torch's RNG). Trainers pass the same seed on every rank so that W ranks draw what one process holding
        the global batch draws, while dropout keeps each rank's own RNG.
        """
        cfg = self.config
        qc = cfg.qformer
        _check_batch(image_embeds, input_ids, attention_mask, qc.encoder_hidden_size, qc.max_position_embeddings)
        dev = image_embeds.device
        b, t = input_ids.shape
        nq = cfg.num_query_tokens
        if image_ids is not None:
            image_ids = _check_index("image_ids", image_ids, b, dev)
        input_ids = input_ids.long()
        text_mask = attention_mask != 0
        ones = torch.ones(b, nq, dtype=torch.bool, device=dev)

        # 1. image K/V once per image
        x_img = self.ln_vision(image_embeds.to(self.ln_vision.weight.dtype))
        ikv = self.qformer.image_kv(x_img)

        # 2. ITC and ITG in ONE pass over [queries | text | decoder text], mode "itc_itg": query rows see the queries
        #    and cross-attend the image, text rows their text (ITC's unimodal mask), decoder rows the queries and
        #    their prefix (ITG's causal mask over the same query K/V, not detached); both texts at positions 0..T-1
        dec_ids = torch.cat([torch.full_like(input_ids[:, :1], cfg.bos_token_id), input_ids[:, 1:]], 1)
        pos = torch.arange(t, device=dev)
        emb = self.embeddings(torch.cat([input_ids, dec_ids], 1), position_ids=torch.cat([pos, pos])[None],
                              query_embeds=self.query_tokens.expand(b, -1, -1))
        h = self.qformer(emb, query_length=nq, attention_mask=torch.cat([ones, text_mask, text_mask], 1),
                         encoder_kv=ikv, mode="itc_itg").last_hidden_state
        image_feats = self.image_features(h[:, :nq])
        text_feat = self.text_features(h[:, nq])
        loss_lm = self.lm_loss(h[:, nq + t:], dec_ids)

        # 3. ITC loss and hard negatives
        loss_itc, s_i2t, s_t2i = ops.itc_loss(image_feats, text_feat.to(image_feats.dtype), self.temp,
                                              label_smoothing=cfg.itc_label_smoothing, image_ids=image_ids,
                                              process_group=process_group, return_logits=True)
        if negatives is None:
            neg_text, neg_image = ops.sample_hard_negatives(s_i2t, s_t2i, image_ids=image_ids,
                                                            process_group=process_group, seed=sample_seed)
        else:
            if not isinstance(negatives, (tuple, list)) or len(negatives) != 2:
                raise ValueError("Blip2Stage1: negatives must be a pair (neg_text_index, neg_image_index)")
            neg_text = _check_index("negatives[0] (neg_text_index)", negatives[0], b, dev)
            neg_image = _check_index("negatives[1] (neg_image_index)", negatives[1], b, dev)

        # 4. ITM over 3B sequences, image K/V shared through kv_index; only the query rows of the last layer
        _, world = group_info(process_group)
        if world == 1:
            batch = itm_batch_indices(neg_text, neg_image)
            itm_kv, ids_bank, mask_bank = ikv, input_ids, text_mask
        else:  # the chosen negatives of other ranks: their ln_vision'd tokens, ids and masks come over
            ex = exchange_itm_negatives(neg_text, neg_image, x_img, input_ids, text_mask, process_group=process_group)
            batch, ids_bank, mask_bank = ex.batch, ex.text_ids_bank, ex.text_mask_bank
            itm_kv = self.qformer.image_kv(ex.image_bank)
        ids_itm = ids_bank.index_select(0, batch.text_index)
        mask_itm = torch.cat([ones.repeat(3, 1), mask_bank.index_select(0, batch.text_index)], 1)
        out_itm = self.qformer(self.query_embeds(ids_itm, 3 * b), query_length=nq, attention_mask=mask_itm,
                               encoder_kv=itm_kv, kv_index=batch.kv_index, query_output_only=True)
        loss_itm = itm_loss(self.itm_logits(out_itm.last_hidden_state), batch.labels, batch.weight)

        loss_itc = loss_itc if loss_itc.dtype == torch.float64 else loss_itc.float()
        return Blip2Stage1Output(loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm,
                                 loss_lm=loss_lm, s_i2t=s_i2t.detach(), s_t2i=s_t2i.detach(), neg_text_index=neg_text,
                                 neg_image_index=neg_image)

    # ------------------------------------------------------------------------------------------
    # captioning

    def generate(self, image_embeds: torch.Tensor, **kwargs) -> torch.LongTensor:
        """Q-Former-only captions (LAVIS ``Blip2Qformer.generate``): token ids [B, L] from [DEC] to [SEP];
        beam 3, max 30, min 10 by default, ``top_p=0.9`` for nucleus sampling. ``image_embeds`` are the ViT tokens
        before ``ln_vision``. See ``blipfast.models.blip2_generate.generate`` for every option."""
        from .blip2_generate import generate

        return generate(self, image_embeds, **kwargs)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _hf_space(self) -> dict:
        """This model's state dict in the HF key space of blipfast.convert."""
        out = {}
        for k, v in self.state_dict().items():
            out[("vision_model.post_layernorm." + k[len("ln_vision."):]) if k.startswith("ln_vision.") else k] = v
        return out

    def to_lavis_state_dict(self) -> dict:
        """The weights under LAVIS ``Blip2Qformer`` names (``Qformer.bert.*``, ``Qformer.cls.*``, ``ln_vision``,
        ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, ``query_tokens``)."""
        return convert.hf_to_lavis(self._hf_space(), strict=True).state_dict

    def load_lavis_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load LAVIS-named weights (HF / blipfast names work too) with :func:`blipfast.convert.load_into`: every
        key must map to this model and every parameter be there (a ValueError names the keys, in the
        checkpoint's names); the LM head's decoder weight and bias are the tied word embeddings and bias.
        ``visual_encoder.*`` (the frozen ViT, not part of this model) and ``position_ids`` buffers are ignored."""
        convert.load_into(self, state_dict, ignore=(r"visual_encoder\.",), what="Blip2Stage1.from_lavis")

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None) -> "Blip2Stage1":
        """A model from a LAVIS stage-1 checkpoint: a ``.pth`` path (read with ``weights_only=True``), a dict with
        key ``"model"``, or a plain state dict with LAVIS names."""
        model = cls(config)
        model.load_lavis_state_dict(convert.load_state_dict(checkpoint))
        return model

    @classmethod
    def from_hf(cls, hf_model: nn.Module, config: Any = None) -> "Blip2Stage1":
        """A model with the parts an HF ``Blip2ForImageTextRetrieval`` has (Q-Former, embeddings, queries,
        projections, ITM head, ``vision_model.post_layernorm`` as ``ln_vision``); the LM head starts from the
        tied word embeddings and a fresh transform, ``temp`` at 0.07. ``config`` defaults to one built from the
        HF config (its ``qformer_config`` with the text FFN on)."""
        hc = hf_model.config
        if config is None:
            config = Blip2Stage1Config(qformer=hc.qformer_config, num_query_tokens=hc.num_query_tokens,
                                       embed_dim=hc.image_text_hidden_size,
                                       ln_vision_eps=hc.vision_config.layer_norm_eps)
        model = cls(config)
        own = model._hf_space()
        with torch.no_grad():
            for k, v in hf_model.state_dict().items():
                if k in own and not k.startswith("qformer_lm_head."):
                    own[k].copy_(v)
        return model.train(hf_model.training)
