"""Model-level integration: the stage-1 ITM path consumes the sampled negatives as index tensors, and the
QFormer runs on the Triton attention kernels when they are selected (interpreter on CPU, CUDA on a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blipfast
from blipfast import ops
from blipfast.distributed import itm_batch_indices, itm_loss
from tests.conftest import HAS_CUDA, assert_close, assert_triton_matches_torch, count_calls

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


def _stage1_itm(b, same_images, use_index_path):
    """ITC -> hard negatives -> ITM loss for a batch of b pairs; returns (loss, grads of image features)."""
    torch.manual_seed(1234)  # both paths build the same model and data
    cfg, qf, emb = _small()
    heads = torch.nn.ModuleDict(dict(vision_proj=torch.nn.Linear(32, 16), text_proj=torch.nn.Linear(32, 16),
                                     itm_head=torch.nn.Linear(32, 2)))
    image = torch.randn(b, N_IMG, 24, requires_grad=True)
    query_tokens = torch.randn(1, Q, 32)
    ids = torch.randint(1, 50, (b, T))
    mask = torch.ones(b, T, dtype=torch.long)
    mask[:, T - 2:] = (torch.rand(b, 2) > 0.5).long()
    image_ids = torch.tensor(same_images) if same_images is not None else None

    qtok = query_tokens.expand(b, -1, -1)
    img_out = qf(qtok, encoder_hidden_states=image).last_hidden_state
    txt_out = qf(emb(ids), query_length=0, attention_mask=mask).last_hidden_state
    img_feats = F.normalize(heads["vision_proj"](img_out), dim=-1)
    txt_feats = F.normalize(heads["text_proj"](txt_out[:, 0]), dim=-1)
    temp = torch.tensor(0.07)
    _, s_i2t, s_t2i = ops.itc_loss(img_feats, txt_feats, temp, image_ids=image_ids, return_logits=True)
    neg_text, neg_image = ops.sample_hard_negatives(s_i2t, s_t2i, image_ids=image_ids, seed=77)

    batch = itm_batch_indices(neg_text, neg_image)
    if use_index_path:  # blipfast: image K/V once per image, texts by index
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
    loss.backward()
    return loss.detach(), image.grad, (neg_text, neg_image)


@pytest.mark.parametrize("b,same_images", [(4, None), (5, [0, 1, 1, 2, 0]), (1, None), (2, [3, 3])])
def test_itm_from_sampled_indices_equals_lavis_construction(b, same_images):
    """The index path (kv_index into shared image K/V, weight 0 for missing negatives) gives LAVIS'
    loss and image-feature gradients; B*W = 1 and all-same-image batches train on positives only."""
    loss_idx, grad_idx, negs = _stage1_itm(b, same_images, True)
    loss_ref, grad_ref, negs_ref = _stage1_itm(b, same_images, False)
    assert all(torch.equal(x, y) for x, y in zip(negs, negs_ref))
    if b == 1 or (same_images is not None and len(set(same_images)) == 1):
        assert (negs[0] == -1).all() and (negs[1] == -1).all()
    else:
        assert (negs[0] >= 0).all() and (negs[1] >= 0).all()
    assert_close(loss_idx, loss_ref, torch.float32, "ITM loss", scale=10)
    assert_close(grad_idx, grad_ref, torch.float32, "d image features", scale=10)


@pytest.mark.parametrize("mode_case", ["queries+text", "text-only", "itg-cached"])
def test_qformer_runs_on_triton_kernels(monkeypatch, mode_case):
    """With BLIPFAST_BACKEND=triton the model's attention goes through the Triton kernels (interpreter on CPU)
    and matches the reference backend in outputs and parameter gradients."""
    pytest.importorskip("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    import blipfast.kernels.attention as kern

    calls = count_calls(monkeypatch, kern, "qformer_attention_fwd", "cross_attention_fwd")

    cfg, qf, emb = _small(device)
    b = 3
    image = torch.randn(b, N_IMG, 24, device=device)
    ids = torch.randint(1, 50, (b, T), device=device)
    mask = torch.ones(b, Q + T, dtype=torch.long, device=device)
    mask[1, Q + 3:] = 0
    queries = torch.randn(b, Q, 32, device=device)

    def run():
        qf.zero_grad(set_to_none=True)
        if mode_case == "queries+text":
            out = qf(emb(ids, query_embeds=queries), query_length=Q, attention_mask=mask, encoder_hidden_states=image,
                     mode="causal").last_hidden_state
        elif mode_case == "text-only":
            out = qf(emb(ids), query_length=0, attention_mask=mask[:, Q:]).last_hidden_state
        else:
            kv = qf(queries, encoder_hidden_states=image, return_query_kv=True).query_kv
            out = qf(emb(ids), past_query_kv=kv, attention_mask=mask[:, Q:]).last_hidden_state
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in qf.named_parameters() if p.grad is not None}

    assert_triton_matches_torch(monkeypatch, calls, run)
