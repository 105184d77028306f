"""The check functions of the model-level integration tests (tests/models/test_integration.py, and the mutation
tests that run them against wrong kernels): the stage-1 ITM path on sampled negatives as index tensors against
LAVIS' construction, and a QFormer on the Triton attention kernels against the float64 model."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import blipfast
from blipfast import ops
from blipfast.distributed import itm_batch_indices
from blipfast.models.losses import itm_loss
from tests.helpers.tolerance import assert_triton_matches_torch, assert_within_torch_error

Q, T, N_IMG = 4, 6, 9


def _small(device="cpu", dtype=torch.float32):
    cfg = blipfast.QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 encoder_hidden_size=24, vocab_size=50, use_qformer_text_input=True,
                                 cross_attention_frequency=1)
    qf = blipfast.QFormer(cfg).to(device=device, dtype=dtype).eval()
    emb = blipfast.QFormerEmbeddings(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters
        for name, p in qf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return cfg, qf, emb


@dataclass
class Stage1Inputs:
    """A tiny QFormer with ITC/ITM heads and a batch, all fp32 (the float64 reference is a cast copy)."""
    qf: torch.nn.Module
    emb: torch.nn.Module
    heads: torch.nn.ModuleDict
    image: torch.Tensor
    query_tokens: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    image_ids: torch.Tensor | None

    def to(self, dtype):
        mods = [copy.deepcopy(m).to(dtype) for m in (self.qf, self.emb, self.heads)]
        return dataclasses.replace(self, qf=mods[0], emb=mods[1], heads=mods[2], image=self.image.to(dtype),
                                   query_tokens=self.query_tokens.to(dtype))


def _stage1_inputs(b, same_images):
    cfg, qf, emb = _small()
    heads = torch.nn.ModuleDict(dict(vision_proj=torch.nn.Linear(32, 16), text_proj=torch.nn.Linear(32, 16),
                                     itm_head=torch.nn.Linear(32, 2)))
    mask = torch.ones(b, T, dtype=torch.long)
    mask[:, T - 2:] = (torch.rand(b, 2) > 0.5).long()
    return Stage1Inputs(qf, emb, heads, torch.randn(b, N_IMG, 24), torch.randn(1, Q, 32), torch.randint(1, 50, (b, T)),
                        mask, torch.tensor(same_images) if same_images is not None else None)


def _negatives(inp):
    """ITC -> hard negatives (fp32, as the training step draws them): (neg_text, neg_image)."""
    b = inp.image.shape[0]
    with torch.no_grad():
        img_out = inp.qf(inp.query_tokens.expand(b, -1, -1), encoder_hidden_states=inp.image).last_hidden_state
        txt_out = inp.qf(inp.emb(inp.ids), query_length=0, attention_mask=inp.mask).last_hidden_state
        img_feats = F.normalize(inp.heads["vision_proj"](img_out), dim=-1)
        txt_feats = F.normalize(inp.heads["text_proj"](txt_out[:, 0]), dim=-1)
        _, s_i2t, s_t2i = ops.itc_loss(img_feats, txt_feats, torch.tensor(0.07), image_ids=inp.image_ids,
                                       return_logits=True)
    return ops.sample_hard_negatives(s_i2t, s_t2i, image_ids=inp.image_ids, seed=77)


def _stage1_itm(inp, negs, use_index_path):
    """The ITM loss of the batch with the given negatives; returns (loss, grad of the image features)."""
    b = inp.image.shape[0]
    qf, emb, heads, ids, mask, query_tokens = inp.qf, inp.emb, inp.heads, inp.ids, inp.mask, inp.query_tokens
    image = inp.image.detach().clone().requires_grad_()
    neg_text, neg_image = negs
    if use_index_path:  # blipfast: image K/V once per image, texts by index
        batch = itm_batch_indices(neg_text, neg_image)
        text_emb = emb(ids[batch.text_index], query_embeds=query_tokens.expand(3 * b, -1, -1))
        att = torch.cat([torch.ones(3 * b, Q, dtype=torch.long), mask[batch.text_index]], 1)
        out = qf(text_emb, query_length=Q, attention_mask=att, encoder_kv=qf.image_kv(image), kv_index=batch.kv_index)
        logits = heads["itm_head"](out.last_hidden_state[:, :Q]).mean(1)
        loss = itm_loss(logits, batch.labels, batch.weight)
    else:  # LAVIS: materialise the 3B image embeddings and texts with a per-sample loop
        rows = [(i, i, 1) for i in range(b)]
        rows += [(i, int(neg_image[i]), 0) for i in range(b) if int(neg_image[i]) >= 0]
        rows += [(int(neg_text[i]), i, 0) for i in range(b) if int(neg_text[i]) >= 0]
        t_idx = torch.tensor([r[0] for r in rows])
        images = torch.stack([image[r[1]] for r in rows])
        labels = torch.tensor([r[2] for r in rows])
        text_emb = emb(ids[t_idx], query_embeds=query_tokens.expand(len(rows), -1, -1))
        att = torch.cat([torch.ones(len(rows), Q, dtype=torch.long), mask[t_idx]], 1)
        out = qf(text_emb, query_length=Q, attention_mask=att, encoder_hidden_states=images)
        logits = heads["itm_head"](out.last_hidden_state[:, :Q]).mean(1)
        loss = F.cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss, [image])
    return loss.detach(), grad


def check_itm_index_path(b, same_images):
    """The index path (fp32) against LAVIS' construction in float64, with LAVIS' construction in fp32 as
    PyTorch's yardstick; returns the negatives."""
    inp = _stage1_inputs(b, same_images)
    negs = _negatives(inp)
    fast = _stage1_itm(inp, negs, True)
    low = _stage1_itm(inp, negs, False)
    ref = _stage1_itm(inp.to(torch.float64), negs, False)
    for name, f, r, lo in zip(("ITM loss", "d image features"), fast, ref, low):
        assert_within_torch_error(f, r, lo, name=name)
    return negs


def check_qformer_on_triton(monkeypatch, mode_case, device, calls):
    """QFormer with BLIPFAST_BACKEND=triton (fp32) against the float64 model on the reference backend, with
    the fp32 reference backend as PyTorch's yardstick: last_hidden_state and every parameter gradient
    (``calls``: count_calls on the Triton entry points)."""
    cfg, qf, emb = _small(device)
    b = 3
    image = torch.randn(b, N_IMG, 24, device=device)
    ids = torch.randint(1, 50, (b, T), device=device)
    mask = torch.ones(b, Q + T, dtype=torch.long, device=device)
    mask[1, Q + 3:] = 0
    queries = torch.randn(b, Q, 32, device=device)

    def run(dtype):
        m, e = (qf, emb) if dtype == torch.float32 else (copy.deepcopy(qf).to(dtype), copy.deepcopy(emb).to(dtype))
        m.zero_grad(set_to_none=True)
        im, qu = image.to(dtype), queries.to(dtype)
        if mode_case == "queries+text":
            out = m(e(ids, query_embeds=qu), query_length=Q, attention_mask=mask, encoder_hidden_states=im,
                    mode="causal").last_hidden_state
        elif mode_case == "text-only":
            out = m(e(ids), query_length=0, attention_mask=mask[:, Q:]).last_hidden_state
        else:
            kv = m(qu, encoder_hidden_states=im, return_query_kv=True).query_kv
            out = m(e(ids), past_query_kv=kv, attention_mask=mask[:, Q:]).last_hidden_state
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    assert_triton_matches_torch(monkeypatch, calls, run)
