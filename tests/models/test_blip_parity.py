"""Parity of blipfast.BlipTextModel / BlipTextLMHeadModel with transformers' BLIP text classes (CPU, fp32).

Every parameter of the HF model is randomised (biases and LayerNorm affine included), blipfast loads HF's
state_dict with strict=True, both run in eval mode on the same inputs, and the outputs and the gradients of
every parameter (by name) and of the inputs are compared with the tolerance rule of tests/helpers/qformer.py
(1e-5 of the magnitude; gradient floor 1e-7 of the model's largest gradient). Modes: the image-grounded
encoder (bidirectional, cross-attention in every layer), the image-grounded decoder (causal), the text-only
encoder (ITC) and the LM head's label-smoothed loss; padding anywhere but position 0 (so every causal row keeps
a key and HF's finite mask equals blipfast's true one), padded image tokens.

transformers 5.x drops ``encoder_attention_mask`` in BLIP's text cross-attention (``BlipTextAttention`` never
hands it to ``BlipTextSelfAttention``, so padded image/question tokens are attended to); Salesforce BLIP applies
it, and so does blipfast. With a padded image the reference is therefore HF run per sample on the image's
unpadded tokens only, which is what a correct mask computes (``test_hf_ignores_the_encoder_attention_mask``
pins the HF behaviour so that a fix upstream shows).
"""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import BlipTextConfig
from transformers import BlipTextLMHeadModel as HFLMHead
from transformers import BlipTextModel as HFText

import blipfast
from blipfast.models.blip import CACHE_FIELD, blip_text_config, share_encoder_decoder
from tests.helpers.qformer import GRAD_FLOOR, _check, _randomize, _seed_of
from tests.helpers.runtime import HAS_CUDA, count_calls
from tests.helpers.tolerance import assert_triton_matches_torch

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported

TOKENS = dict(bos_token_id=1, eos_token_id=2, sep_token_id=3, pad_token_id=0)
# name -> (BlipTextConfig fields, batch B, text T, image tokens Lk)
CONFIGS = {
    "small": (dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   encoder_hidden_size=24, max_position_embeddings=40), 3, 7, 11),
    "odd": (dict(vocab_size=71, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=80,
                 encoder_hidden_size=40, max_position_embeddings=40, hidden_act="gelu_new", layer_norm_eps=1e-6,
                 label_smoothing=0.1), 2, 9, 13),
    "base-width": (dict(vocab_size=300, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=3072, encoder_hidden_size=768, max_position_embeddings=40), 2, 5, 9),
}
MODES = ("encoder", "decoder", "text-only", "lm-loss")
# the base-width config (BERT-base layer shapes, one layer) runs two modes to keep CI fast
CASES = [(n, m) for n in CONFIGS for m in MODES if n != "base-width" or m in ("encoder", "lm-loss")]


def _config(name: str) -> BlipTextConfig:
    return BlipTextConfig(**CONFIGS[name][0], **TOKENS)


@functools.lru_cache(maxsize=1)
def _pair(name: str, lm: bool):
    torch.manual_seed(_seed_of("blip", name, lm))  # HF's weight init draws from the global generator
    cls = HFLMHead if lm else HFText
    hf = cls._from_config(_config(name), attn_implementation="eager").eval()
    _randomize(hf, torch.Generator().manual_seed(_seed_of("blip", name, lm, "bias")))
    bf = (blipfast.BlipTextLMHeadModel if lm else blipfast.BlipTextModel).from_hf(hf)
    return hf, bf


def _padding(bsz: int, n: int, p: float = 0.35) -> torch.Tensor:
    """A 0/1 mask with random holes; position 0 always kept."""
    m = (torch.rand(bsz, n) > p).long()
    m[:, 0] = 1
    return m


def _inputs(name: str, mode: str):
    cfg, bsz, t, lk = CONFIGS[name]
    kw = dict(input_ids=torch.randint(4, cfg["vocab_size"], (bsz, t)), attention_mask=_padding(bsz, t))
    if mode != "text-only":
        kw["encoder_hidden_states"] = torch.randn(bsz, lk, cfg["encoder_hidden_size"], requires_grad=True)
        kw["encoder_attention_mask"] = _padding(bsz, lk)
    if mode == "decoder":
        kw["is_decoder"] = True
    if mode == "lm-loss":
        kw["labels"] = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    return kw


class _PerSample:
    """HF run sample by sample on the unpadded image tokens (see the module doc); outputs concatenated, the LM
    loss recombined into the batch mean over labelled tokens."""

    def __init__(self, hf):
        self.hf = hf

    def named_parameters(self):
        return self.hf.named_parameters()

    def __call__(self, encoder_attention_mask=None, **kw):
        if encoder_attention_mask is None:
            return self.hf(**kw)
        outs = []
        for b in range(encoder_attention_mask.shape[0]):
            keep = encoder_attention_mask[b].bool()
            one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            one["encoder_hidden_states"] = kw["encoder_hidden_states"][b:b + 1, keep]
            outs.append(self.hf(**one, **({"reduction": "none"} if "labels" in kw else {})))
        if "labels" in kw:
            n = (kw["labels"][:, 1:] != -100).sum()
            return SimpleNamespace(loss=sum(o.loss.sum() for o in outs) / n, logits=torch.cat([o.logits for o in outs]))
        cat = {k: torch.cat([getattr(o, k) for o in outs]) for k in ("last_hidden_state", "pooler_output")}
        return SimpleNamespace(**cat)


def _run(model, kw, leaves):
    out = model(**kw)
    main = out.loss if "labels" in kw else out.last_hidden_state
    torch.manual_seed(1)
    loss = main.sum() if main.dim() == 0 else (main * torch.randn_like(main)).sum()
    if getattr(out, "pooler_output", None) is not None:
        loss = loss + out.pooler_output.square().sum()
    names = [n for n, _ in model.named_parameters()] + list(leaves)
    tensors = [p for _, p in model.named_parameters()] + list(leaves.values())
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("name,mode", CASES)
def test_parity_with_hf(name, mode):
    hf, bf = _pair(name, mode == "lm-loss")
    kw = _inputs(name, mode)
    leaves = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    (ref, ref_g), (got, got_g) = _run(_PerSample(hf), kw, leaves), _run(bf, kw, leaves)
    if mode == "lm-loss":
        _check("loss", got.loss, ref.loss)
        _check("logits", got.logits, ref.logits)
    else:
        # rows that are padding still compute (as in HF): compare every row
        _check("last_hidden_state", got.last_hidden_state, ref.last_hidden_state)
        _check("pooler_output", got.pooler_output, ref.pooler_output)
        # the tuple form (return_dict=False), in a call of its own: HF's (last_hidden_state, pooler_output)
        with torch.no_grad():
            got_t = bf(**kw, return_dict=False)
        assert isinstance(got_t, tuple)
        _check("return_dict=False [0]", got_t[0], ref.last_hidden_state)
        _check("return_dict=False [1]", got_t[1], ref.pooler_output)
    assert set(got_g) == set(ref_g)
    gmax = max(g.abs().max().item() for g in ref_g.values() if g is not None)
    for n in ref_g:
        _check(f"grad {n}", got_g[n], ref_g[n], floor=GRAD_FLOOR * gmax)


def test_hf_ignores_the_encoder_attention_mask():
    """The transformers behaviour the per-sample reference works around: HF's output does not depend on
    encoder_attention_mask, blipfast's does (and equals HF on the unpadded tokens, test_parity_with_hf)."""
    hf, bf = _pair("small", False)
    kw = _inputs("small", "encoder")
    with torch.no_grad():
        masked = hf(**kw).last_hidden_state
        unmasked = hf(**{**kw, "encoder_attention_mask": None}).last_hidden_state
        torch.testing.assert_close(masked, unmasked, rtol=0, atol=0)
        assert not torch.allclose(bf(**kw).last_hidden_state, bf(**{**kw, "encoder_attention_mask": None})
                                  .last_hidden_state)


def test_state_dict_keys_equal_hf():
    for name in CONFIGS:
        for is_decoder in (True, False):
            cfg = BlipTextConfig(**CONFIGS[name][0], is_decoder=is_decoder, **TOKENS)
            with torch.device("meta"):
                pairs = [(HFText(cfg, add_pooling_layer=pool), blipfast.BlipTextModel(cfg, add_pooling_layer=pool))
                         for pool in (True, False)] + [(HFLMHead(cfg), blipfast.BlipTextLMHeadModel(cfg))]
            for hf, bf in pairs:
                hf_sd, bf_sd = hf.state_dict(), bf.state_dict()
                assert list(bf_sd) == list(hf_sd)
                assert all(bf_sd[k].shape == hf_sd[k].shape for k in hf_sd)
    lm = blipfast.BlipTextLMHeadModel(_config("small"))
    assert lm.cls.predictions.decoder.weight is lm.bert.embeddings.word_embeddings.weight  # tied as in HF
    assert lm.cls.predictions.decoder.bias is lm.cls.predictions.bias
    assert all(torch.isfinite(p).all() for p in lm.parameters())


def test_lm_head_options():
    """reduction="none" (per-sequence sums, VQA's answer scoring), return_logits, logits_to_keep, tuples."""
    hf, bf = _pair("odd", True)
    kw = _inputs("odd", "lm-loss")
    kw.pop("encoder_attention_mask")  # HF ignores it (see the module doc)
    with torch.no_grad():
        ref, got = hf(**kw, reduction="none"), bf(**kw, reduction="none")
        _check("per-sequence loss", got.loss, ref.loss)
        kw.pop("labels")
        _check("return_logits", bf(**kw, return_logits=True), hf(**kw, return_logits=True))
        _check("logits_to_keep=1", bf(**kw, logits_to_keep=1).logits, hf(**kw, logits_to_keep=1).logits)
        tup = bf(**kw, return_dict=False)
        _check("tuple logits", tup[0], ref.logits)
        hs = bf(**kw, output_hidden_states=True).hidden_states
        hs_ref = hf(**kw, output_hidden_states=True).hidden_states
        assert len(hs) == len(hs_ref) == hf.config.num_hidden_layers + 1
        for i, (a, b) in enumerate(zip(hs, hs_ref)):
            _check(f"hidden_states[{i}]", a, b)


def test_incremental_decoding_with_cache_equals_full_pass():
    """The decoder fed one token at a time through HF's cache equals one causal pass (and HF step by step);
    the cross-attention K/V are computed at the first step and then read from the cache."""
    hf, bf = _pair("small", True)
    cfg, bsz, t, lk = CONFIGS["small"]
    ids = torch.randint(4, cfg["vocab_size"], (bsz, t))
    image = torch.randn(bsz, lk, cfg["encoder_hidden_size"])
    with torch.no_grad():
        full = bf(ids, encoder_hidden_states=image, use_cache=False).logits
        for model in (bf, hf):
            cache, steps = None, []
            for i in range(t):
                kw = {CACHE_FIELD: cache} if cache is not None else {}
                out = model(ids[:, i:i + 1], attention_mask=torch.ones(bsz, i + 1, dtype=torch.long),
                            encoder_hidden_states=image, use_cache=True, **kw)
                cache = getattr(out, CACHE_FIELD)
                steps.append(out.logits)
            _check(f"{type(model).__module__} cached steps", torch.cat(steps, 1), full)
        assert cache.get_seq_length() == t


@pytest.mark.parametrize("how", [dict(), dict(num_beams=3, min_length=6)])
def test_generate_from_left_padded_prompts_identical(how):
    """transformers' generate on the decoder alone, batched prompts of different lengths (left padding, so
    the padding rows have no key: blipfast outputs 0 there, HF an average; neither reaches a real token), in
    fp64 so that no near-tie can flip a token."""
    import copy

    hf = copy.deepcopy(_pair("small", True)[0]).double()
    bf = blipfast.BlipTextLMHeadModel.from_hf(hf)
    cfg, bsz, _, lk = CONFIGS["small"]
    prompt = torch.randint(4, cfg["vocab_size"], (bsz, 5))
    prompt[:, 0] = TOKENS["bos_token_id"]
    mask = torch.ones(bsz, 5, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    prompt = prompt.masked_fill(mask == 0, TOKENS["pad_token_id"])
    image = torch.randn(bsz, lk, cfg["encoder_hidden_size"], dtype=torch.float64)
    kw = dict(input_ids=prompt, attention_mask=mask, encoder_hidden_states=image, max_length=14,
              eos_token_id=TOKENS["sep_token_id"], pad_token_id=TOKENS["pad_token_id"], **how)
    ref, got = hf.generate(**kw), bf.generate(**kw)
    assert got.tolist() == ref.tolist()
    assert got.shape[1] > 6


def test_shared_image_kv_with_kv_index_equals_per_pair_passes():
    """ITM's three row-sets per image (positive, negative text, negative image) over image K/V computed once per
    image: outputs equal HF's per-pair passes, and the image features' gradient equals HF's summed over pairs."""
    hf, bf = _pair("small", False)
    cfg, bsz, t, lk = CONFIGS["small"]
    image = torch.randn(bsz, lk, cfg["encoder_hidden_size"], requires_grad=True)
    img_mask = _padding(bsz, lk)
    ids = torch.randint(4, cfg["vocab_size"], (3 * bsz, t))
    mask = _padding(3 * bsz, t)
    kv_index = torch.cat([torch.arange(bsz), torch.randint(0, bsz, (bsz,)), torch.arange(bsz)])
    weight = torch.randn(3 * bsz, t, cfg["hidden_size"])
    ref = _PerSample(hf)(input_ids=ids, attention_mask=mask, encoder_hidden_states=image[kv_index],
                         encoder_attention_mask=img_mask[kv_index]).last_hidden_state
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), image)
    kv = bf.image_kv(image, img_mask)
    assert len(kv) == cfg["num_hidden_layers"]
    got = bf(ids, attention_mask=mask, encoder_kv=kv, kv_index=kv_index).last_hidden_state
    (g_got,) = torch.autograd.grad((got * weight).sum(), image)
    _check("ITM rows over shared K/V", got, ref)
    _check("d image", g_got, g_ref)


def test_share_encoder_decoder_ties_all_but_self_attention():
    """BLIP pre-training's tie: the decoder holds the encoder's embeddings, cross-attention and FFN Parameters
    and its own self-attention; the encoder's image K/V then also serve the decoder."""
    cfg = _config("small")
    enc = blipfast.BlipTextModel(cfg, add_pooling_layer=False).eval()
    dec = blipfast.BlipTextLMHeadModel(cfg).eval()
    share_encoder_decoder(enc, dec.bert)
    enc_params = {id(p) for p in enc.parameters()}
    for n, p in dec.bert.named_parameters():
        assert (id(p) in enc_params) == (".attention." not in n), n
    image = torch.randn(2, 5, cfg.encoder_hidden_size)
    ids = torch.randint(4, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        a = dec(ids, encoder_hidden_states=image).logits
        b = dec(ids, encoder_kv=enc.image_kv(image)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"\.bert"):
        share_encoder_decoder(enc, dec)


def test_config_sources_and_validation():
    cfg = _config("small")
    assert blip_text_config(cfg) is cfg
    from_dict = blip_text_config(cfg.to_dict())
    from_kw = blip_text_config(**CONFIGS["small"][0], **TOKENS)
    for c in (from_dict, from_kw):
        assert all(getattr(c, k) == v for k, v in CONFIGS["small"][0].items())
    from transformers import BlipConfig
    assert blip_text_config(BlipConfig(text_config=cfg.to_dict())).hidden_size == 32
    m = blipfast.BlipTextModel(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8,
                               vocab_size=10, encoder_hidden_size=4, bos_token_id=1, sep_token_id=2, eos_token_id=2)
    assert m.config.hidden_size == 16 and len(m.encoder.layer) == 1
    bad = [(dict(hidden_size=30, num_attention_heads=4), ValueError, "multiple of num_attention_heads"),
           (dict(num_hidden_layers=0), ValueError, "num_hidden_layers"),
           (dict(hidden_dropout_prob=1.0), ValueError, "hidden_dropout_prob"),
           (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
           (dict(hidden_act="nope"), ValueError, "hidden_act"),
           (dict(pad_token_id=99999), ValueError, "pad_token_id"),
           (dict(hidden_sizee=8), TypeError, "unknown field")]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            blip_text_config(**kw)
    with pytest.raises(TypeError, match="BlipTextConfig"):
        blip_text_config(3)


def test_bad_inputs_raise_clear_errors():
    hf, bf = _pair("small", False)
    cfg, bsz, t, lk = CONFIGS["small"]
    ids = torch.randint(4, cfg["vocab_size"], (bsz, t))
    image = torch.randn(bsz, lk, cfg["encoder_hidden_size"])
    cases = [
        (dict(input_ids=ids, attention_mask=torch.ones(bsz, t + 1)), ValueError, "attention_mask must have shape"),
        (dict(input_ids=ids, attention_mask=torch.ones(1, bsz, t)), ValueError, "attention_mask must have shape"),
        (dict(input_ids=ids, encoder_hidden_states=image[:, :, :5]), ValueError, "encoder_hidden_states must be"),
        (dict(input_ids=ids, encoder_hidden_states=image, encoder_attention_mask=torch.ones(bsz, lk + 2)),
         ValueError, "encoder_attention_mask must have shape"),
        (dict(input_ids=ids, encoder_hidden_states=image[:1]), ValueError, "pass kv_index"),
        (dict(input_ids=ids, encoder_kv=bf.image_kv(image), kv_index=torch.zeros(bsz + 1, dtype=torch.long)),
         ValueError, "kv_index must be"),
        (dict(input_ids=ids, encoder_kv=bf.image_kv(image), encoder_hidden_states=image), ValueError, "not both"),
        (dict(input_ids=ids, output_attentions=True), ValueError, "output_attentions"),
        (dict(input_ids=ids, inputs_embeds=torch.randn(bsz, t, 32)), ValueError, "both input_ids and inputs_embeds"),
        (dict(), ValueError, "give input_ids"),
        (dict(input_ids=ids[0]), ValueError, r"\[B, T\]"),
        (dict(input_ids=ids, head_mask=torch.ones(2)), TypeError, "unsupported argument head_mask"),
        (dict(input_ids=torch.randint(4, 60, (1, 41))), ValueError, "max_position_embeddings"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            bf(**kw)
    text_only = blipfast.BlipTextModel(_config("small"), is_decoder=False)
    assert not hasattr(text_only.encoder.layer[0], "crossattention")
    with pytest.raises(ValueError, match="no cross-attention"):
        text_only(ids, encoder_hidden_states=image)


def test_dropout_in_training_only():
    cfg = blip_text_config(_config("small"), hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = blipfast.BlipTextModel(cfg)
    ids = torch.randint(4, 64, (2, 6))
    image = torch.randn(2, 5, 24)
    a, b = (model(ids, encoder_hidden_states=image).last_hidden_state for _ in range(2))
    assert not torch.equal(a, b)
    model.eval()
    a, b = (model(ids, encoder_hidden_states=image).last_hidden_state for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["encoder-kv-index", "decoder"])
def test_runs_on_triton_kernels(monkeypatch, mode):
    """With BLIPFAST_BACKEND=triton the attention of the text model goes through the Triton kernels (the
    interpreter on CPU) and matches the float64 model within PyTorch's fp32 error, in outputs and every
    parameter gradient."""
    pytest.importorskip("triton")
    import blipfast.kernels.attention as kern

    calls = count_calls(monkeypatch, kern, "qformer_attention_fwd", "cross_attention_fwd")
    device = "cuda" if HAS_CUDA else "cpu"
    cfg = blip_text_config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=40, encoder_hidden_size=16, **TOKENS)
    with torch.device(device):
        model = blipfast.BlipTextModel(cfg).eval()
        ids = torch.randint(4, 40, (3, 7))
        mask = _padding(3, 7)
        image = torch.randn(2, 9, 16)
        img_mask = _padding(2, 9)
        kv_index = torch.tensor([0, 1, 0])

    def run(dtype):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        m.zero_grad(set_to_none=True)
        img = image.to(dtype)
        if mode == "decoder":
            out = m(ids, attention_mask=mask, encoder_hidden_states=img[kv_index],
                    encoder_attention_mask=img_mask[kv_index], is_decoder=True)
        else:
            out = m(ids, attention_mask=mask, encoder_kv=m.image_kv(img, img_mask), kv_index=kv_index)
        out.last_hidden_state.square().sum().backward()
        return out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                if p.grad is not None}

    assert_triton_matches_torch(monkeypatch, calls, run)


def test_training_step_compiles_fullgraph():
    """The model layer has no graph break and no host sync: an ITM step over shared image K/V and a decoder
    step compile with fullgraph=True and equal eager (aot_eager: the same kernels, traced)."""
    cfg = blip_text_config(_config("small"), num_hidden_layers=1)
    model = blipfast.BlipTextModel(cfg, add_pooling_layer=False).train()
    ids, mask = torch.randint(4, 64, (6, 7)), _padding(6, 7)
    image, kv_index = torch.randn(2, 9, 24, requires_grad=True), torch.tensor([0, 1, 0, 1, 1, 0])

    def itm(ids, mask, image, kv_index):
        return model(ids, attention_mask=mask, encoder_kv=model.image_kv(image), kv_index=kv_index)[0][:, 0].sum()

    def lm(ids, mask, image, kv_index):
        out = model(ids, attention_mask=mask, encoder_hidden_states=image[kv_index], is_decoder=True, use_cache=False)
        return out.last_hidden_state.square().sum()

    for fn in (itm, lm):
        results = []
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            loss = f(ids, mask, image, kv_index)
            (grad,) = torch.autograd.grad(loss, image)
            results.append((loss, grad))
        torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)
