"""Parity of blipfast.QFormer with transformers' Blip2QFormerModel and Blip2ForImageTextRetrieval (CPU, fp32).

Every parameter of the HF model is randomised (biases and LayerNorm affine included, so a dropped bias or a
swapped LayerNorm shows), blipfast loads HF's state_dict with strict=True, and both run in eval mode on the
same inputs; the outputs and the gradients of every parameter (by name) and of the inputs are compared.

Tolerance (fp32 vs fp32): both sides evaluate the same formula in fp32 with differently ordered reductions,
so they differ by rounding, which stays near u * sqrt(n) for the reductions involved (u = 6e-8, n <= 3072)
and grows mildly over 12 post-LN layers: measured <= ~2e-6 of the magnitude. We allow 1e-5 of the
tensor's largest magnitude. The gradients of the self-attention key biases are exactly 0 in exact arithmetic
(softmax is shift-invariant), so they are pure rounding noise of the surrounding gradients: every gradient
also gets an absolute floor of 1e-7 x the largest gradient of the model.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2QFormerModel

import blipfast
from blipfast import convert
from tests.helpers.qformer import GRAD_FLOOR, _check, _randomize, _seed_of

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported

# name -> (Blip2QFormerConfig overrides, batch B, queries Q, text T, image tokens Lk)
CONFIGS = {
    "default": ({}, 2, 32, 6, 17),
    "small": (dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                   encoder_hidden_size=48), 3, 8, 5, 11),
    "xattn-every-layer": (dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, intermediate_size=160,
                               encoder_hidden_size=80, cross_attention_frequency=1), 2, 5, 7, 9),
}

# (config, use_qformer_text_input, attn implementation, padding masks, path); path: "queries" = query-only
# image pass, "queries+text" = [queries | text] with query_length = Q, "text" = text-only (query_length = 0).
# The default (12-layer) config runs one case per use_qformer_text_input (with padding, eager and sdpa) to
# keep CI fast; the small configs run the full matrix.
CASES = [("default", False, "sdpa", True, "queries"), ("default", True, "eager", True, "queries+text")]
for _name in ("small", "xattn-every-layer"):
    for _text, _paths in ((False, ("queries",)), (True, ("queries+text", "text"))):
        for _impl in ("eager", "sdpa"):
            for _masked in (False, True):
                CASES += [(_name, _text, _impl, _masked, _p) for _p in _paths]


def _set_impl(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers read it from the config at call time
        model.config._attn_implementation = impl


@functools.lru_cache(maxsize=1)
def _pair(cfg_name: str, text_input: bool):
    cfg = Blip2QFormerConfig(use_qformer_text_input=text_input, **CONFIGS[cfg_name][0])
    torch.manual_seed(_seed_of(cfg_name, text_input))  # HF's weight init draws from the global generator
    hf = Blip2QFormerModel._from_config(cfg, attn_implementation="eager").eval()
    _randomize(hf, torch.Generator().manual_seed(_seed_of(cfg_name, text_input, "bias")))
    return hf, blipfast.QFormer.from_hf(hf)


@pytest.mark.parametrize("text_input", [False, True])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_state_dict_keys_equal_hf(cfg_name, text_input):
    cfg = Blip2QFormerConfig(use_qformer_text_input=text_input, **CONFIGS[cfg_name][0])
    with torch.device("meta"):
        hf_sd, bf_sd = Blip2QFormerModel(cfg).state_dict(), blipfast.QFormer(cfg).state_dict()
    assert list(bf_sd) == list(hf_sd)
    assert all(bf_sd[k].shape == hf_sd[k].shape for k in hf_sd)


def _inputs(cfg_name, text_input, masked, path):
    _, bsz, nq, nt, lk = CONFIGS[cfg_name]
    cfg = _pair(cfg_name, text_input)[1].config
    seq = {"queries": nq, "queries+text": nq + nt, "text": nt}[path]
    kw = dict(query_embeds=torch.randn(bsz, seq, cfg.hidden_size, requires_grad=True))
    if path != "text":
        kw["encoder_hidden_states"] = torch.randn(bsz, lk, cfg.encoder_hidden_size, requires_grad=True)
        kw["query_length"] = None if path == "queries" else nq
    else:
        kw["query_length"] = 0
    if masked:  # random padding anywhere, every row keeps >= 1 key (HF's mask is finite)
        m = (torch.rand(bsz, seq) > 0.35).long()
        m[torch.arange(bsz), torch.randint(0, seq, (bsz,))] = 1
        kw["attention_mask"] = m
        if path == "queries":
            # transformers 5.x builds the cross-attention mask over all L rows, so a padded image mask only works
            # for a query-only pass in HF; blipfast takes it with text too (tests/models/test_qformer_modes.py)
            em = (torch.rand(bsz, lk) > 0.35).long()
            em[:, -1] = 1
            kw["encoder_attention_mask"] = em
    return kw


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_parity_with_hf_qformer(case):
    cfg_name, text_input, impl, masked, path = case
    hf, qf = _pair(cfg_name, text_input)
    _set_impl(hf, impl)
    kw = _inputs(cfg_name, text_input, masked, path)
    leaves = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    weight = None
    results = []
    for model in (hf, qf):
        out = model(**kw)
        if weight is None:
            weight = torch.randn_like(out.last_hidden_state)
        names = [n for n, _ in model.named_parameters()] + list(leaves)
        tensors = [p for _, p in model.named_parameters()] + list(leaves.values())
        loss = (out.last_hidden_state * weight).sum() + out.pooler_output.sum()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        results.append((out, dict(zip(names, grads))))
    (ref, ref_g), (got, got_g) = results
    assert got.last_hidden_state.dtype == torch.float32
    _check("last_hidden_state", got.last_hidden_state, ref.last_hidden_state)
    _check("pooler_output", got.pooler_output, ref.pooler_output)
    # the tuple form (return_dict=False), in calls of its own: HF's tuple, element for element
    with torch.no_grad():
        got_t, ref_t = qf(**kw, return_dict=False), hf(**kw, return_dict=False)
    assert isinstance(got_t, tuple) and len(got_t) == len(ref_t) == 2, (len(got_t), len(ref_t))
    for i, (g, r) in enumerate(zip(got_t, ref_t)):
        _check(f"return_dict=False [{i}]", g, r)
    assert set(got_g) == set(ref_g)
    gmax = max(g.abs().max().item() for g in ref_g.values() if g is not None)
    for name in ref_g:
        _check(f"grad {name}", got_g[name], ref_g[name], floor=GRAD_FLOOR * gmax)


def test_parity_low_precision_input_and_tuple_output():
    """HF keeps the Q-Former in fp32 and casts inputs; so does blipfast (bf16 in, fp32 out)."""
    hf, qf = _pair("small", True)
    _, bsz, nq, nt, lk = CONFIGS["small"]
    x = torch.randn(bsz, nq + nt, 64).bfloat16()
    img = torch.randn(bsz, lk, 48).bfloat16()
    ref = hf(query_embeds=x, query_length=nq, encoder_hidden_states=img).last_hidden_state
    got = qf(query_embeds=x, query_length=nq, encoder_hidden_states=img, return_dict=False)
    assert isinstance(got, tuple) and got[0].dtype == torch.float32
    _check("bf16 input", got[0], ref)
    _check("pooler", got[1], ref[:, 0])


# ----------------------------------------------------------------------------------------------
# Blip2ForImageTextRetrieval: ITM logits and ITC similarities from blipfast parts with HF's weights


@functools.lru_cache(maxsize=1)
def _retrieval():
    cfg = Blip2Config(
        vision_config=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=42, patch_size=14),
        qformer_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                            use_qformer_text_input=True, vocab_size=120, max_position_embeddings=24),
        num_query_tokens=6, image_text_hidden_size=24)
    hf = Blip2ForImageTextRetrieval._from_config(cfg, attn_implementation="eager").eval()
    _randomize(hf, torch.Generator().manual_seed(_seed_of("retrieval")), all_weights=True)
    sd = hf.state_dict()
    qf = blipfast.QFormer(hf.config.qformer_config).eval()
    qf.load_state_dict(convert.qformer_state_dict(sd), strict=True)
    emb = blipfast.QFormerEmbeddings(hf.config.qformer_config).eval()
    emb.load_state_dict(convert.embeddings_state_dict(sd), strict=True)
    return hf, qf, emb


def _text_batch(bsz, t, vocab):
    ids = torch.randint(1, vocab, (bsz, t))
    lengths = torch.randint(1, t + 1, (bsz,))
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def test_retrieval_itm_logits():
    hf, qf, emb = _retrieval()
    bsz, t = 3, 9
    pixels = torch.randn(bsz, 3, 42, 42)
    ids, mask = _text_batch(bsz, t, 120)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        image = hf.vision_model(pixel_values=pixels)[0]
        queries = hf.query_tokens.expand(bsz, -1, -1)
        nq = queries.shape[1]
        x = emb(input_ids=ids, query_embeds=queries)
        full_mask = torch.cat([torch.ones(bsz, nq, dtype=torch.long), mask], 1)
        out = qf(query_embeds=x, query_length=nq, attention_mask=full_mask, encoder_hidden_states=image)
        logits = F.linear(out.last_hidden_state[:, :nq], hf.itm_head.weight, hf.itm_head.bias).mean(1)
        _check("itm logits", logits, ref.logits_per_image)

        # every (image, text) pair through shared image K/V (retrieval re-ranking) against HF per pair
        img_idx = torch.arange(bsz).repeat_interleave(bsz)
        txt_idx = torch.arange(bsz).repeat(bsz)
        kv = qf.image_kv(image)
        out = qf(query_embeds=x[txt_idx], query_length=nq, attention_mask=full_mask[txt_idx], encoder_kv=kv,
                 kv_index=img_idx)
        pair_logits = F.linear(out.last_hidden_state[:, :nq], hf.itm_head.weight, hf.itm_head.bias).mean(1)
        ref_pairs = hf(pixel_values=pixels[img_idx], input_ids=ids[txt_idx], attention_mask=mask[txt_idx],
                       use_image_text_matching_head=True).logits_per_image
        _check("itm logits, all pairs via kv_index", pair_logits, ref_pairs)


def test_retrieval_itc_similarities():
    hf, qf, emb = _retrieval()
    bsz, t = 4, 7
    pixels = torch.randn(bsz, 3, 42, 42)
    ids, mask = _text_batch(bsz, t, 120)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        image = hf.vision_model(pixel_values=pixels)[0]
        queries = hf.query_tokens.expand(bsz, -1, -1)
        nq = queries.shape[1]
        q_out = qf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        t_out = qf(query_embeds=emb(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state

        def sims(q_out, cls):
            img = F.normalize(F.linear(q_out, hf.vision_projection.weight, hf.vision_projection.bias), dim=-1)
            txt = F.normalize(F.linear(cls, hf.text_projection.weight, hf.text_projection.bias), dim=-1)
            return torch.einsum("iqe,te->iqt", img, txt).amax(1)

        _check("itc similarities (two passes)", sims(q_out, t_out[:, 0]), ref.logits_per_image)
        _check("itc text embeds", F.normalize(F.linear(t_out[:, 0], hf.text_projection.weight,
                                                       hf.text_projection.bias), dim=-1), ref.text_embeds)
        # one unimodal pass over [queries | text] gives the same similarities
        x = emb(input_ids=ids, query_embeds=queries)
        full_mask = torch.cat([torch.ones(bsz, nq, dtype=torch.long), mask], 1)
        out = qf(query_embeds=x, query_length=nq, attention_mask=full_mask, encoder_hidden_states=image,
                 mode="unimodal").last_hidden_state
        _check("itc similarities (one unimodal pass)", sims(out[:, :nq], out[:, nq]), ref.logits_per_image)
