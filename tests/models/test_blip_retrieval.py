"""blipfast.BlipRetrieval against Salesforce BLIP's ``BLIP_Retrieval.forward`` restated in plain PyTorch
(blipfast/bench/blip_retrieval_baseline.py: BERT passes with -10000 masks, the ITM positives and negatives in two
passes that each project the image K/V, the momentum loop, queue slicing at ``int(ptr_queue)``, ITC targets from the
image ids), and its retrieval inference against ``train_retrieval.py``'s evaluation restated
(tests/helpers/blip_finetune.py).

Both run on deep copies of one tiny random model (dropout off) from the same state: both losses, the gradient of
every parameter and of the pixels, and the state the step leaves (momentum copies, queues, index queue, pointer,
temp) agree in float64 to float64 rounding and in float32 within PyTorch's own float32 error. Cases: padding,
repeated image ids (the index queue with ids already in it), a batch of one, ``negative_all_rank`` on one process,
several steps through a queue wrap-around."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blipfast.bench.blip_retrieval_baseline import blip_retrieval_forward
from blipfast.models.blip_retrieval import BlipRetrieval, BlipRetrievalConfig
from blipfast.models.blip_vision import interpolate_pos_embed
from blipfast.ops import sample_hard_negatives_from_gathered
from tests.helpers.blip_finetune import blip_score_matrices, jitter_, retrieval_config
from tests.helpers.blip_pretrain import make_batch
from tests.helpers.tolerance import assert_within_torch_error

F64 = torch.float64
LOSSES = ("loss_itc", "loss_itm")
STATE = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "temp")

CASES = {
    # name: (B, T, padded rows, image ids, negatives (text, image), config overrides)
    "padded": (4, 7, (1, 3), [0, 1, 2, 3], ([1, 2, 3, 0], [2, 0, 1, 1]), {}),
    "repeated_ids": (4, 6, (2,), [7, 3, 7, 5], ([1, 0, 1, 2], [3, 2, 1, 0]), {}),
    "B1": (1, 5, (), [4], ([-1], [-1]), {}),
    "all_rank": (4, 6, (0,), [2, 2, 6, 1], ([3, 0, 1, 2], [2, 3, 0, 0]), {"negative_all_rank": True}),
}


def _case(name, dtype, steps=1):
    b, t, pads, ids, neg, over = CASES[name]
    torch.manual_seed(4321)
    model = jitter_(BlipRetrieval(retrieval_config(**over)).to(dtype).train())
    with torch.no_grad():  # known queue contents (ids that collide with the batch's) and pointer
        model.image_queue.copy_(F.normalize(torch.randn_like(model.image_queue), dim=0))
        model.text_queue.copy_(F.normalize(torch.randn_like(model.text_queue), dim=0))
        model.idx_queue.copy_(torch.randint(0, 9, model.idx_queue.shape))
        model.ptr_queue.fill_(b * (steps % 3))
        model.temp.fill_(0.07)
    kw = {"negatives": (torch.tensor(neg[0]), torch.tensor(neg[1])), "image_ids": torch.tensor(ids)}
    return model, [make_batch(b, t, pads) for _ in range(steps)], kw


def _step(model, fast, px, ids, mask, kw, dtype):
    x = px.clone().to(dtype).requires_grad_()
    if fast:
        out = model(x, ids, mask, **kw)
        out = {k: getattr(out, k) for k in ("loss",) + LOSSES}
    else:
        out = blip_retrieval_forward(model, x, ids, mask, kw["alpha"], kw["image_ids"], negatives=kw["negatives"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["pixel_values"] = x.grad
    model.zero_grad(set_to_none=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k in STATE or k.startswith(("vision_model_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m."))}
    return out, grads, state


def _check_f64(a, b, what):
    (fo, fg, fs), (bo, bg, bs) = a, b
    for k in LOSSES:
        torch.testing.assert_close(fo[k], bo[k], rtol=1e-12, atol=1e-12, msg=f"{what}: {k}")
    assert set(fg) == set(bg), sorted(set(fg) ^ set(bg))
    scale = max(g.abs().max().item() for g in bg.values())
    for n in bg:
        err = (fg[n] - bg[n]).abs().max().item()
        assert err <= 1e-11 * scale, f"{what}: d {n}: {err:.3e} (scale {scale:.3e})"
    for n in bs:
        torch.testing.assert_close(fs[n], bs[n], rtol=1e-12, atol=1e-13, msg=f"{what}: {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_blip_float64(name):
    model, batches, kw = _case(name, F64)
    (px, ids, mask), = batches
    kw = dict(kw, alpha=0.4)
    _check_f64(_step(copy.deepcopy(model), True, px, ids, mask, kw, F64),
               _step(copy.deepcopy(model), False, px, ids, mask, kw, F64), name)


def test_queue_wraps_around_with_the_index_queue_float64():
    """Four steps of B = 4 into a queue of 12 starting at pointer 4 (4, 8, 0: wrap, 4, 8), the ids of earlier steps
    in the index queue becoming positives of later ones: every step's losses, gradients and state equal BLIP's."""
    model, batches, kw = _case("repeated_ids", F64, steps=4)
    fast, base = copy.deepcopy(model), copy.deepcopy(model)
    for s, (px, ids, mask) in enumerate(batches):
        k = dict(kw, alpha=0.1 + 0.1 * s)
        _check_f64(_step(fast, True, px, ids, mask, k, F64), _step(base, False, px, ids, mask, k, F64), f"step {s}")
    assert int(fast.ptr_queue) == 8 and (fast.idx_queue[0] >= 0).all()


@pytest.mark.parametrize("name", ["padded", "repeated_ids"])
def test_parity_with_blip_float32(name):
    model, ((px, ids, mask),), kw = _case(name, F64)
    kw = dict(kw, alpha=0.4)
    runs = {tag: _step(copy.deepcopy(model).to(dt), fast, px, ids, mask, kw, dt)
            for tag, fast, dt in (("fast", True, torch.float32), ("base32", False, torch.float32),
                                  ("ref", False, F64))}
    (fo, fg, _), (lo, lg, _), (ro, rg, _) = runs["fast"], runs["base32"], runs["ref"]
    for k in LOSSES:
        assert_within_torch_error(fo[k].reshape(1), ro[k].reshape(1), lo[k].reshape(1), dtype=torch.float32, name=k)
    names = sorted(rg)
    cat = lambda g: torch.cat([g[n].double().flatten() for n in names])  # noqa: E731
    assert_within_torch_error(cat(fg), cat(rg), cat(lg), dtype=torch.float32, name="all gradients", factor=4.0)


def test_drawn_negatives_exclude_every_same_id_column_without_a_floor():
    """The draws are ops.sample_hard_negatives_from_gathered over BLIP's online similarities image_feat @
    text_feat.T / temp (no 1e-4 floor), never a pair of the same image id; the rows of an id that fills the batch
    but one column draw that column."""
    torch.manual_seed(5)
    model = BlipRetrieval(retrieval_config()).train()
    px, ids, mask = make_batch(5, 6)
    image_ids = torch.tensor([3, 3, 3, 3, 9])
    out = model(px, ids, mask, alpha=0.4, image_ids=image_ids, sample_seed=11)
    with torch.no_grad():
        img = F.normalize(model.vision_proj(model.vision_tokens(px)[:, 0]), dim=-1)
        txt = F.normalize(model.text_proj(model.text_encoder(ids, attention_mask=mask != 0).last_hidden_state[:, 0]),
                          dim=-1)
    torch.testing.assert_close(out.s_i2t, img @ txt.t() / model.temp, rtol=1e-5, atol=1e-5)
    want = sample_hard_negatives_from_gathered(out.s_i2t, out.s_t2i, image_ids=image_ids, image_ids_all=image_ids,
                                               seed=11)
    assert torch.equal(out.neg_text_index, want[0]) and torch.equal(out.neg_image_index, want[1])
    assert out.neg_text_index[:4].eq(4).all() and out.neg_image_index[:4].eq(4).all()
    assert out.neg_text_index[4] in range(4)


def test_vit_gradient_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(6)
    plain = jitter_(BlipRetrieval(retrieval_config()).double().train())
    ckpt = BlipRetrieval(retrieval_config(vit_grad_ckpt=True, vit_ckpt_layer=2)).double().train()
    ckpt.load_state_dict(plain.state_dict())
    assert [layer.gradient_checkpointing for layer in ckpt.vision_model.encoder.layers] == [True, True]
    assert not any(layer.gradient_checkpointing for layer in ckpt.vision_model_m.encoder.layers)  # BLIP: online only
    model, ((px, ids, mask),), kw = _case("padded", F64)
    kw = dict(kw, alpha=0.4)
    _check_f64(_step(ckpt, True, px, ids, mask, kw, F64), _step(plain, True, px, ids, mask, kw, F64), "ckpt")


@pytest.mark.parametrize("k", [2, 10])
def test_score_matrices_are_blips_evaluation(k):
    """ITC top-k + ITM re-ranking with BLIP's rule (k = 10 > every candidate count: all re-scored), float64."""
    torch.manual_seed(7)
    model = jitter_(BlipRetrieval(retrieval_config()).double(), 0.2)
    px = torch.randn(5, 3, 16, 16, dtype=F64)
    _, ids, mask = make_batch(7, 6, pad_rows=(1, 4))
    s_i2t, s_t2i = model.score_matrices(pixel_values=px, input_ids=ids, attention_mask=mask, k=k, batch_size=3,
                                        image_batch_size=2)
    r_i2t, r_t2i = blip_score_matrices(model, px, ids, mask, k)
    torch.testing.assert_close(s_i2t, r_i2t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_t2i, r_t2i, rtol=1e-10, atol=1e-10)
    assert model.training  # the inference methods restore the mode
    with pytest.raises(ValueError, match="exactly one"):
        model.score_matrices(input_ids=ids, attention_mask=mask)


def test_salesforce_round_trip_and_a_pretraining_checkpoint_as_initialisation():
    """to_lavis_state_dict loads back bit for bit; a 224-px pre-training checkpoint initialises a 384-px model as
    BLIP's load_checkpoint does: position embeddings interpolated (online and momentum ViT), the decoder unused,
    queue_ptr not taken (ptr_queue 0), the queues taken, idx_queue -100."""
    from blipfast.models.blip_pretrain import BlipPretrain
    from tests.helpers.blip_pretrain import tiny_config

    torch.manual_seed(9)
    model = jitter_(BlipRetrieval(retrieval_config()))
    model.ptr_queue.fill_(5)
    back = BlipRetrieval.from_lavis({"model": model.to_lavis_state_dict()}, retrieval_config())
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    pre = jitter_(BlipPretrain(tiny_config(embed_dim=8, queue_size=12)))
    pre.queue_ptr.fill_(3)
    sd = pre.to_lavis_state_dict()
    big = BlipRetrieval(retrieval_config(vision={"image_size": 32}))
    notes = big.load_lavis_state_dict(sd)
    assert any("queue_ptr not taken" in n for n in notes) and any("text_decoder" in n for n in notes)
    assert sum("position embedding" in n for n in notes) == 2
    assert int(big.ptr_queue) == 0 and big.idx_queue.eq(-100).all() and torch.equal(big.image_queue, pre.image_queue)
    for m in ("", "_m"):
        pe = sd[f"visual_encoder{m}.pos_embed"]
        grid = F.interpolate(pe[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
        got = getattr(big, f"vision_model{m}").embeddings.position_embedding
        torch.testing.assert_close(got, torch.cat([pe[:, :1], grid], 1), rtol=0, atol=0)
        torch.testing.assert_close(interpolate_pos_embed(pe, 16), got.detach(), rtol=0, atol=0)
    assert torch.equal(big.text_encoder.embeddings.word_embeddings.weight, pre.text_encoder.embeddings
                       .word_embeddings.weight)
    bad = dict(sd, **{"visual_encoder.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="visual_encoder.bogus"):
        big.load_lavis_state_dict(bad)


@pytest.mark.hf
def test_hf_blip_for_image_text_retrieval():
    """From HF's BlipForImageTextRetrieval: its ITM logits (the text given [ENC]-first) and cosine similarities."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from tests.helpers.blip_finetune import TEXT, VISION

    torch.manual_seed(10)
    hf = BlipForImageTextRetrieval(BlipConfig(text_config=TEXT, vision_config=VISION,
                                              image_text_hidden_size=8)).eval()
    model = BlipRetrieval.from_hf(hf).eval()
    assert model.config.vision.image_size == 16 and int(model.ptr_queue) == 0
    px, ids, mask = make_batch(3, 6, (1,))
    with torch.no_grad():
        enc = ids.clone()
        enc[:, 0] = model.config.enc_token_id
        itm = hf(input_ids=enc, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score[:, 1]
        cos = hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
    mine = model.itm_scores(model.encode_images(px), ids, mask, torch.arange(3), torch.arange(3))
    torch.testing.assert_close(mine, itm, rtol=1e-5, atol=1e-5)
    feats = model.image_features(model.encode_images(px)) @ model.text_features(ids, mask).t()
    torch.testing.assert_close(feats.diagonal(), cos.diagonal(), rtol=1e-5, atol=1e-5)


def test_config_and_argument_errors():
    cfg = retrieval_config()
    assert BlipRetrievalConfig(**cfg.to_dict()) == cfg
    d = BlipRetrievalConfig()
    assert (d.vision.image_size, d.queue_size, d.k_test, d.negative_all_rank, d.vit_ckpt_layer) == (384, 57600, 256,
                                                                                                   True, 4)
    with pytest.raises(ValueError, match="vit_ckpt_layer"):
        retrieval_config(vit_ckpt_layer=-1)
    with pytest.raises(TypeError, match="itm_floor"):
        retrieval_config(itm_floor=0.0)
    with pytest.raises(ValueError, match="negative_all_rank"):
        retrieval_config(negative_all_rank=1)
    model = BlipRetrieval(retrieval_config())
    px, ids, mask = make_batch(2, 5)
    with pytest.raises(ValueError, match="image_ids"):
        model(px, ids, mask, alpha=0.4, image_ids=None)
    with pytest.raises(ValueError, match="pixel_values"):
        model(px[:, :, :8], ids, mask, alpha=0.4, image_ids=torch.arange(2))
    with pytest.raises(ValueError, match="negatives"):
        model(px, ids, mask, alpha=0.4, image_ids=torch.arange(2), negatives=(torch.arange(2),))
    with pytest.raises(ValueError, match="k must"):
        model.score_matrices(pixel_values=px, input_ids=ids, attention_mask=mask, k=0)
