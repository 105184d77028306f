"""blipfast.QFormer beyond HF: the three stage-1 masks, ITG over cached query K/V, shared image K/V, dropout,
and argument validation (CPU, fp32).

Each identity below holds exactly in real arithmetic; the two sides differ only by the order of fp32
reductions (different GEMM shapes, concatenations), so outputs and gradients are compared at 1e-5 of the
reference's magnitude (measured differences are ~1e-7 relative).
"""
from __future__ import annotations

import pytest
import torch

import blipfast
from blipfast import QFormerConfig, QFormerEmbeddings
from tests.helpers.qformer import B, CFG, LK, Q, RTOL, T, _model


def _close(name, got, ref):
    if got is None or ref is None:
        other = ref if got is None else got
        assert other is None or not other.any(), f"{name}: gradient on one side only"
        return
    assert got.shape == ref.shape, f"{name}: {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= RTOL * scale + 1e-7, f"{name}: max error {err:.3e} > {RTOL} x {scale:.3e}"


def _grads(loss, model, extra: dict) -> dict:
    names = [n for n, _ in model.named_parameters()] + list(extra)
    tensors = [p for _, p in model.named_parameters()] + list(extra.values())
    return dict(zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)))


def _text_mask(bsz, t):
    lengths = torch.randint(1, t + 1, (bsz,))
    return (torch.arange(t)[None] < lengths[:, None]).long()


def _inputs(bsz=B):
    queries = torch.randn(bsz, Q, CFG["hidden_size"], requires_grad=True)
    text = torch.randn(bsz, T, CFG["hidden_size"], requires_grad=True)
    image = torch.randn(bsz, LK, CFG["encoder_hidden_size"], requires_grad=True)
    return queries, text, image, _text_mask(bsz, T)


def test_unimodal_equals_separate_query_and_text_passes():
    model = _model()
    queries, text, image, tmask = _inputs()
    emask = _text_mask(B, LK)
    full_mask = torch.cat([torch.ones(B, Q, dtype=torch.long), tmask], 1)
    out = model(torch.cat([queries, text], 1), query_length=Q, attention_mask=full_mask, encoder_hidden_states=image,
                encoder_attention_mask=emask, mode="unimodal").last_hidden_state
    q_only = model(queries, encoder_hidden_states=image, encoder_attention_mask=emask).last_hidden_state
    t_only = model(text, query_length=0, attention_mask=tmask).last_hidden_state
    _close("query rows", out[:, :Q], q_only)
    _close("text rows", out[:, Q:], t_only)
    w = torch.randn_like(out)
    leaves = dict(queries=queries, text=text, image=image)
    g_uni = _grads((out * w).sum(), model, leaves)
    g_sep = _grads((q_only * w[:, :Q]).sum() + (t_only * w[:, Q:]).sum(), model, leaves)
    for name in g_sep:
        _close(f"grad {name}", g_uni[name], g_sep[name])


@pytest.mark.parametrize("mask_width", ["text", "full"])
def test_itg_over_cached_query_kv_equals_causal_pass(mask_width):
    model = _model()
    queries, text, image, tmask = _inputs()
    full_mask = torch.cat([torch.ones(B, Q, dtype=torch.long), tmask], 1)
    ref = model(torch.cat([queries, text], 1), query_length=Q, attention_mask=full_mask, encoder_hidden_states=image,
                mode="causal").last_hidden_state[:, Q:]

    img_pass = model(queries, encoder_hidden_states=image, return_query_kv=True)
    kv = img_pass.query_kv
    assert len(kv) == CFG["num_hidden_layers"]
    assert all(k.shape == (B, Q, 4, 16) and k.requires_grad and v.requires_grad for k, v in kv)  # not detached
    itg = model(text, attention_mask=tmask if mask_width == "text" else full_mask, past_query_kv=kv)
    out = itg.last_hidden_state
    _close("ITG text rows", out, ref)
    _close("ITG pooler", itg.pooler_output, ref[:, 0])

    w = torch.randn_like(out)
    leaves = dict(queries=queries, text=text, image=image)
    g_ref = _grads((ref * w).sum(), model, leaves)
    g_itg = _grads((out * w).sum(), model, leaves)
    # the ITG loss reaches the query path (queries, cross-attention, image) only through the cached K/V
    assert g_itg["image"] is not None and g_itg["image"].abs().max() > 0
    assert g_itg["encoder.layer.0.crossattention.attention.query.weight"].abs().max() > 0
    for name in g_ref:
        _close(f"grad {name}", g_itg[name], g_ref[name])


@pytest.mark.parametrize("source", ["encoder_kv", "encoder_hidden_states"])
def test_shared_image_kv_with_kv_index_equals_expanded_images(source):
    model = _model(cross_attention_frequency=1)
    m = 2
    kv_index = torch.tensor([1, 0, 1, 1, 0])
    n = kv_index.numel()
    x = torch.randn(n, Q + T, CFG["hidden_size"], requires_grad=True)
    image = torch.randn(m, LK, CFG["encoder_hidden_size"], requires_grad=True)
    emask = _text_mask(m, LK)
    amask = torch.cat([torch.ones(n, Q, dtype=torch.long), _text_mask(n, T)], 1)
    if source == "encoder_kv":
        kw = dict(encoder_kv=model.image_kv(image, emask), kv_index=kv_index)
    else:
        kw = dict(encoder_hidden_states=image, encoder_attention_mask=emask, kv_index=kv_index)
    out = model(x, query_length=Q, attention_mask=amask, **kw).last_hidden_state
    ref = model(x, query_length=Q, attention_mask=amask, encoder_hidden_states=image[kv_index],
                encoder_attention_mask=emask[kv_index]).last_hidden_state
    _close("output", out, ref)
    w = torch.randn_like(out)
    leaves = dict(x=x, image=image)
    g_out, g_ref = _grads((out * w).sum(), model, leaves), _grads((ref * w).sum(), model, leaves)
    for name in g_ref:
        _close(f"grad {name}", g_out[name], g_ref[name])


def test_image_kv_layout_and_reuse():
    model = _model()
    image = torch.randn(2, LK, CFG["encoder_hidden_size"])
    kv = model.image_kv(image)
    assert len(kv) == len(model.config.cross_attention_layers) == 2 and kv.key_padding_mask is None
    layer = model.encoder.layer[2].crossattention.attention
    k_ref = torch.nn.functional.linear(image, layer.key.weight, layer.key.bias).view(2, LK, 4, 16)
    _close("k of layer 2", kv[1][0], k_ref)
    assert kv[1][0].stride(-1) == 1
    queries = torch.randn(2, Q, CFG["hidden_size"])
    _close("encoder_kv", model(queries, encoder_kv=kv).last_hidden_state,
           model(queries, encoder_hidden_states=image).last_hidden_state)


def test_dropout_in_training_mode():
    model = _model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    queries, text, image, tmask = _inputs()
    x = torch.cat([queries, text], 1).detach()
    kw = dict(query_length=Q, attention_mask=torch.cat([torch.ones(B, Q, dtype=torch.long), tmask], 1),
              encoder_hidden_states=image.detach(), mode="causal")

    def run(seed):
        torch.manual_seed(seed)
        out = model(x, **kw).last_hidden_state
        out.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    a, ga = run(1)
    b, gb = run(1)
    c, _ = run(2)
    assert torch.isfinite(a).all() and all(torch.isfinite(g).all() for g in ga)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert (a - c).abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x, **kw).last_hidden_state, model(x, **kw).last_hidden_state
    assert torch.equal(e1, e2) and (e1 - a).abs().max() > 1e-3


def test_embeddings_and_output_forms():
    cfg = QFormerConfig(**CFG)
    emb = QFormerEmbeddings(cfg)
    assert sorted(emb.state_dict()) == ["position_embeddings.weight", "word_embeddings.weight"]
    ids = torch.randint(0, CFG["vocab_size"], (B, T))
    queries = torch.randn(B, Q, CFG["hidden_size"])
    x = emb(input_ids=ids, query_embeds=queries)
    assert x.shape == (B, Q + T, CFG["hidden_size"]) and torch.equal(x[:, :Q], queries)
    manual = emb.word_embeddings(ids) + emb.position_embeddings.weight[:T]
    assert torch.equal(x[:, Q:], manual)
    model = _model()
    img = torch.randn(B, LK, 40)
    out = model(x, query_length=Q, encoder_hidden_states=img, output_hidden_states=True, return_query_kv=True)
    assert len(out.hidden_states) == CFG["num_hidden_layers"] + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    tup = model(x, query_length=Q, encoder_hidden_states=img, return_dict=False)  # a call of its own
    assert isinstance(tup, tuple) and len(tup) == 2
    _close("return_dict=False [0]", tup[0], out.last_hidden_state)
    _close("return_dict=False [1]", tup[1], out.pooler_output)
    assert out.query_kv[0][0].shape == (B, Q, 4, 16)
    assert isinstance(blipfast.QFormer, type) and "QFormer" in blipfast.__all__


def test_config_accepts_hf_config_dict_and_kwargs():
    from transformers import Blip2Config, Blip2QFormerConfig

    hf = Blip2QFormerConfig(hidden_size=96, num_attention_heads=6, cross_attention_frequency=3)
    cfg = QFormerConfig(hf)
    assert cfg.hidden_size == 96 and cfg.cross_attention_layers == (0, 3, 6, 9) and cfg.head_dim == 16
    assert QFormerConfig(hf.to_dict()) == cfg == QFormerConfig(cfg)
    assert QFormerConfig(Blip2Config(qformer_config=hf.to_dict())).hidden_size == 96
    assert QFormerConfig(hf, num_hidden_layers=2).num_hidden_layers == 2
    assert QFormerConfig(**cfg.to_dict()).to_hf().hidden_size == 96


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=100, num_attention_heads=12), "multiple of num_attention_heads"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int"),
    (dict(hidden_dropout_prob=1.0), r"hidden_dropout_prob must be a float in \[0, 1\)"),
    (dict(cross_attention_frequency=0), "cross_attention_frequency"),
    (dict(hidden_act="nonexistent_act"), "hidden_act"),
    (dict(pad_token_id=30522), "pad_token_id"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QFormerConfig(**kwargs)


def test_config_rejects_unknown_fields():
    with pytest.raises(TypeError, match="unknown field"):
        QFormerConfig(hidden_sise=64)
    cfg = QFormerConfig()
    with pytest.raises(ValueError, match="multiple"):
        cfg.num_attention_heads = 7
    assert cfg.num_attention_heads == 12


def test_forward_validation():
    model = _model()
    text_free = _model(use_qformer_text_input=False)
    x = torch.randn(B, Q + T, CFG["hidden_size"])
    image = torch.randn(B, LK, 40)
    with pytest.raises(ValueError, match="query_length"):
        model(x, query_length=Q + T + 1, encoder_hidden_states=image)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(x, query_length=Q, attention_mask=torch.ones(B, Q), encoder_hidden_states=image)
    with pytest.raises(ValueError, match="encoder_hidden_states must be given"):
        model(x, query_length=Q)
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        text_free(x, query_length=Q, encoder_hidden_states=image)
    with pytest.raises(ValueError, match="mode"):
        model(x, query_length=Q, encoder_hidden_states=image, mode="sideways")
    with pytest.raises(ValueError, match="kv_index"):
        model(x, query_length=Q, encoder_hidden_states=image[:2])
    with pytest.raises(ValueError, match=r"query_embeds must be \[B, L, 64\]"):
        model(torch.randn(B, Q, 32), encoder_hidden_states=image)
    with pytest.raises(ValueError, match="output_attentions"):
        model(x[:, :Q], encoder_hidden_states=image, output_attentions=True)
    with pytest.raises(ValueError, match="past_query_kv needs one"):
        model(x[:, Q:], past_query_kv=[(torch.zeros(B, Q, 4, 16), torch.zeros(B, Q, 4, 16))])
