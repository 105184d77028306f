"""LAVIS' BLIP-2 stage-1 forward (``Blip2Qformer.forward``), restated in plain PyTorch over a
``blipfast.Blip2Stage1``'s parameters: the baseline of the stage-1 benchmark and the ground truth of its tests.

Written as LAVIS runs it, not as blipfast does: four Q-Former passes (image queries, text, ITM over 3B
sequences, ITG), each computing its own image key/value projections; dense additive masks ((1 - mask) * -10000,
as LAVIS' ``get_extended_attention_mask``); SDPA; ITC over the materialised [B, BW, Q] similarities; hard
negatives drawn with one ``torch.multinomial(...).item()`` per row (2B host syncs) unless given. Semantics of
docs/semantics.md#itc where LAVIS' single-process path differs from its distributed one: the gathered ITC features
are constants. A row whose given negative is -1 (nothing drawable) is left out of the ITM mean, as blipfast does
(LAVIS crashes there). Dropout follows ``model.training`` (hidden 0.1, attention 0.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .counting import sdpa

_NEG = -10000.0


def _lin(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def _ln(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """[B, 1, Lq, Lk] additive mask of a bool [B, Lq, Lk] one."""
    return ((~allowed).to(dtype) * _NEG).unsqueeze(1)


class _Pass:
    """One LAVIS Q-Former pass: BERT layers with the query FFN on the first ``nq`` rows, cross-attention of
    the query rows to ``image`` (its K/V projected here, per pass), optional cached query K/V (ITG)."""

    def __init__(self, model):
        self.qf = model.qformer
        self.cfg = model.config.qformer
        self.train = model.training

    def _drop(self, x):
        return F.dropout(x, self.cfg.hidden_dropout_prob, self.train)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.cfg.num_attention_heads, self.cfg.head_dim).transpose(1, 2)

    def _attend(self, proj, x_q, x_kv, mask, past=None):
        q = self._heads(_lin(x_q, proj.query))
        k, v = self._heads(_lin(x_kv, proj.key)), self._heads(_lin(x_kv, proj.value))
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        p = self.cfg.attention_probs_dropout_prob if self.train else 0.0
        ctx = sdpa(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), dropout_p=p)
        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, -1), present

    def _out(self, dense_ln, x, residual):
        return _ln(self._drop(_lin(x, dense_ln.dense)) + residual, dense_ln.LayerNorm)

    def _ffn(self, inter, out, x):
        return self._out(out, F.gelu(_lin(x, inter.dense)), x)

    def __call__(self, embeds, nq, self_mask, image=None, past=None):
        """embeds [B, L, d] before the embeddings LayerNorm; self_mask additive [B, 1, L, Lk]; returns
        (hidden [B, L, d], per-layer self-attention (k, v) of this pass' rows)."""
        x = self._drop(_ln(embeds, self.qf.layernorm))
        presents = []
        for i, layer in enumerate(self.qf.encoder.layer):
            ctx, present = self._attend(layer.attention.attention, x, x, self_mask, None if past is None else past[i])
            presents.append(present)
            a = self._out(layer.attention.output, ctx, x)
            if nq > 0:
                aq = a[:, :nq]
                if layer.has_cross_attention:
                    cctx, _ = self._attend(layer.crossattention.attention, aq, image, None)
                    aq = self._out(layer.crossattention.output, cctx, aq)
                parts = [self._ffn(layer.intermediate_query, layer.output_query, aq)]
                if a.shape[1] > nq:
                    parts.append(self._ffn(layer.intermediate, layer.output, a[:, nq:]))
                x = torch.cat(parts, 1)
            else:
                x = self._ffn(layer.intermediate, layer.output, a)
        return x, presents


def _text_embeds(model, ids):
    emb = model.embeddings
    pos = torch.arange(ids.shape[1], device=ids.device)
    return F.embedding(ids, emb.word_embeddings.weight) + F.embedding(pos, emb.position_embeddings.weight)[None]


def _up(x):
    """fp32 for the softmax/CE of 16-bit values; fp64 stays fp64 (ground-truth runs)."""
    return x if x.dtype == torch.float64 else x.float()


def _draw(weights: torch.Tensor, generator=None) -> list:
    """LAVIS: one multinomial draw and one host sync per row."""
    return [torch.multinomial(weights[b], 1, generator=generator).item() for b in range(weights.shape[0])]


def lavis_stage1_forward(model, image_embeds, input_ids, attention_mask, *, image_ids=None, negatives=None,
                         generator=None) -> dict:
    """The stage-1 losses of ``model`` (a ``blipfast.Blip2Stage1``) as LAVIS computes them (see the module doc):
    ``{"loss", "loss_itc", "loss_itm", "loss_lm"}``. One process (W = 1)."""
    cfg = model.config
    run = _Pass(model)
    dt = model.query_tokens.dtype
    b, t = input_ids.shape
    nq = cfg.num_query_tokens
    dev = image_embeds.device
    text_mask = attention_mask != 0

    image = _ln(image_embeds.to(model.ln_vision.weight.dtype), model.ln_vision)
    queries = model.query_tokens.expand(b, -1, -1)

    # image pass (queries + cross-attention), cached for ITG
    q_allowed = torch.ones(b, nq, nq, dtype=torch.bool, device=dev)
    q_out, q_kv = run(queries, nq, _additive(q_allowed, dt), image=image)
    image_feats = F.normalize(_lin(q_out, model.vision_projection), dim=-1)
    # text pass
    t_out, _ = run(_text_embeds(model, input_ids), 0, _additive(text_mask[:, None, :].expand(b, t, t), dt))
    text_feat = F.normalize(_lin(t_out[:, 0], model.text_projection), dim=-1)

    # ITC over materialised [B, BW, Q] similarities (BW = B here); gathered copies are constants
    img_all, txt_all = image_feats.detach(), text_feat.detach()
    sim_i2t = torch.einsum("bqe,je->bjq", image_feats, txt_all).max(-1).values / model.temp
    sim_t2i = torch.einsum("be,jqe->bjq", text_feat, img_all).max(-1).values / model.temp
    acc = _up(sim_i2t).dtype
    if image_ids is not None:
        pos = (image_ids.view(-1, 1) == image_ids.view(1, -1)).to(acc)
    else:
        pos = torch.eye(b, device=dev, dtype=acc)
    ls = cfg.itc_label_smoothing
    targets = (1 - ls) * pos / pos.sum(1, keepdim=True) + ls / b
    loss_itc = (-(F.log_softmax(_up(sim_i2t), 1) * targets).sum(1).mean()
                - (F.log_softmax(_up(sim_t2i), 1) * targets).sum(1).mean()) / 2

    # hard negatives
    if negatives is None:
        with torch.no_grad():
            excl = pos.bool()
            w_t2i = F.softmax(_up(sim_t2i).masked_fill(excl, _NEG), 1)
            w_i2t = F.softmax(_up(sim_i2t).masked_fill(excl, _NEG), 1)
        neg_image = _draw(w_t2i, generator)
        neg_text = _draw(w_i2t, generator)
    else:
        neg_text, neg_image = (negatives[0].tolist(), negatives[1].tolist())
    ok_img = torch.tensor([j >= 0 for j in neg_image], device=dev)
    ok_txt = torch.tensor([j >= 0 for j in neg_text], device=dev)
    neg_image = torch.tensor([max(j, 0) for j in neg_image], device=dev)
    neg_text = torch.tensor([max(j, 0) for j in neg_text], device=dev)

    # ITM: 3B materialised sequences, image K/V projected again in this pass
    ids_all = torch.cat([input_ids, input_ids, input_ids[neg_text]])
    mask_all = torch.cat([text_mask, text_mask, text_mask[neg_text]])
    image_all = torch.cat([image, image[neg_image], image])
    full = torch.cat([torch.ones(3 * b, nq, dtype=torch.bool, device=dev), mask_all], 1)
    emb = torch.cat([model.query_tokens.expand(3 * b, -1, -1), _text_embeds(model, ids_all)], 1)
    itm_out, _ = run(emb, nq, _additive(full[:, None, :].expand(-1, nq + t, -1), dt), image=image_all)
    logits = _lin(itm_out[:, :nq], model.itm_head).mean(1)
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=dev), torch.zeros(2 * b, dtype=torch.long, device=dev)])
    weight = torch.cat([torch.ones(b, device=dev), ok_img.float(), ok_txt.float()]).to(acc)
    loss_itm = (F.cross_entropy(_up(logits), labels, reduction="none") * weight).sum() / weight.sum()

    # ITG: decoder ids over the cached query K/V, [ones(Q) | causal] x padding
    dec = input_ids.clone()
    dec[:, 0] = cfg.bos_token_id
    labels_lm = dec.masked_fill(dec == cfg.qformer.pad_token_id, -100)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev))
    allowed = torch.cat([torch.ones(b, t, nq, dtype=torch.bool, device=dev),
                         causal[None] & text_mask[:, None, :]], 2)
    lm_out, _ = run(_text_embeds(model, dec), 0, _additive(allowed, dt), past=q_kv)
    scores = model.qformer_lm_head(lm_out)
    loss_lm = F.cross_entropy(_up(scores[:, :-1].reshape(-1, scores.shape[-1])), labels_lm[:, 1:].reshape(-1),
                              ignore_index=-100, label_smoothing=cfg.lm_label_smoothing)
    return {"loss": loss_itc + loss_itm + loss_lm, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}
