"""Q-Former-only captioning (Blip2Stage1.generate): next-token logits against LAVIS' decoding restated in PyTorch
(blipfast/bench/stage1_baseline.py's pass: SDPA, additive masks, image K/V per pass), the cached loop against the
uncached one token for token (beam, greedy, nucleus sampling, several sequences per image), one Q-Former pass of ONE
token per sequence and step after the first, and the incremental-decoding cache of QFormer.forward."""
from __future__ import annotations

import pytest
import torch

from blipfast import Blip2Stage1
from blipfast.bench.stage1_baseline import _additive, _ln, _Pass, _text_embeds
from blipfast.models.blip2_generate import QFormerCaptioner
from blipfast.testing.retrieval import VOCAB, jitter_, stage1_config

# hf: compares with transformers' own models (CI also runs it on the lowest supported); one_thread: tiny models
pytestmark = [pytest.mark.hf, pytest.mark.usefixtures("one_thread")]

F64 = torch.float64
SEP = 102


def _model(sep_bias: float = 0.0, dtype=F64):
    model = jitter_(Blip2Stage1(stage1_config(num_hidden_layers=2))).to(dtype).eval()
    with torch.no_grad():  # make [SEP] likely, so that captions end at different lengths
        model.qformer_lm_head.decoder.bias[SEP] += sep_bias
    return model


def _images(b, dtype=F64):
    return torch.randn(b, 9, 32, dtype=dtype)


@torch.no_grad()
def lavis_next_logits(model, image_embeds, tokens):
    """LAVIS' BertLMHeadModel step without a cache: [queries | tokens] under the multimodal causal mask (queries see
    the queries, text the queries and its prefix), the queries cross-attending to ln_vision(image); the LM head on
    the last position."""
    b, t = tokens.shape
    nq = model.config.num_query_tokens
    image = _ln(image_embeds, model.ln_vision)
    emb = torch.cat([model.query_tokens.expand(b, -1, -1), _text_embeds(model, tokens)], 1)
    j = torch.arange(nq + t)
    allowed = (j[None, :] < nq) | ((j[None, :] <= j[:, None]) & (j[:, None] >= nq))
    out, _ = _Pass(model)(emb, nq, _additive(allowed.expand(b, -1, -1), emb.dtype), image=image)
    return model.qformer_lm_head(out[:, -1])


def test_step_logits_equal_lavis_decoding():
    model = _model()
    img = _images(3)
    seq = torch.randint(1, VOCAB - 1, (6, 7))
    seq[:, 0] = model.config.bos_token_id
    index = torch.tensor([0, 0, 1, 1, 2, 2])  # two sequences per image
    cached = QFormerCaptioner(model, img, use_cache=True)
    uncached = QFormerCaptioner(model, img, use_cache=False)
    with torch.no_grad():
        for t in range(1, 8):
            ref = lavis_next_logits(model, img[index], seq[:, :t])
            for runner in (cached, uncached):
                got = runner(seq[:, :t], image_index=index).logits[:, -1]
                torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    assert cached.prefills == 1  # one prefill, then one token per step


CASES = {
    "beam (LAVIS default: 3 beams)": dict(),
    "greedy": dict(num_beams=1),
    "nucleus": dict(top_p=0.9),
    "beams, 2 sequences, repetition penalty": dict(num_beams=3, num_return_sequences=2, repetition_penalty=1.3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cached_equals_uncached(name, monkeypatch):
    model = _model(sep_bias=4.0)
    img = _images(3)
    runners, lengths = [], []
    orig_init, orig_fwd = QFormerCaptioner.__init__, model.qformer.forward

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        runners.append(self)

    def fwd(query_embeds, *a, **k):
        lengths.append(query_embeds.shape[1])
        return orig_fwd(query_embeds, *a, **k)

    monkeypatch.setattr(QFormerCaptioner, "__init__", init)
    monkeypatch.setattr(model.qformer, "forward", fwd)
    kw = dict(max_length=12, min_length=5, **CASES[name])
    torch.manual_seed(7)
    fast = model.generate(img, **kw)
    fast_lengths = list(lengths)
    torch.manual_seed(7)
    slow = model.generate(img, use_cache=False, **kw)
    assert torch.equal(fast, slow), (fast, slow)
    n_seq = 3 * kw.get("num_return_sequences", 1)
    assert fast.shape[0] == n_seq and (fast[:, 0] == model.config.bos_token_id).all()
    # the cache: the query pass (Q rows), one prefill of [DEC], then one token per sequence and step
    nq = model.config.num_query_tokens
    assert runners[0].prefills == 1 and fast_lengths[0] == nq and set(fast_lengths[1:]) == {1}, fast_lengths
    # [SEP] ends captions (here at different lengths), never before min_length; [PAD] after it
    ended = (fast == SEP).any(1)
    assert ended.any()
    for row in fast[ended]:
        first = int((row == SEP).nonzero()[0])
        assert first >= kw["min_length"]
        assert (row[first + 1:] == model.config.qformer.pad_token_id).all()


def test_sampling_draws_differ_and_follow_the_seed():
    model = _model()
    img = _images(2)
    torch.manual_seed(1)
    a = model.generate(img, top_p=0.9, max_length=10)
    torch.manual_seed(1)
    b = model.generate(img, top_p=0.9, max_length=10)
    torch.manual_seed(2)
    c = model.generate(img, top_p=0.9, max_length=10)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_float32_mode_and_errors():
    model = _model(dtype=torch.float32).train()
    img = _images(2, torch.float32)
    out = model.generate(img, max_length=8, min_length=2)
    assert out.shape[0] == 2 and out.shape[1] <= 8 and out.dtype == torch.long
    assert model.training  # eval for the call (no dropout), the mode restored
    with pytest.raises(ValueError, match="image_embeds"):
        model.generate(img[..., :5])
    with pytest.raises(ValueError, match="top_p"):
        model.generate(img, top_p=1.5)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(img, max_length=41)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(img, num_beams=0)


def test_qformer_incremental_cache_equals_the_causal_pass():
    """QFormer.forward(past_query_kv=..., return_query_kv=True) returns the past K/V extended by the new rows'; feeding
    the text one token at a time over it gives the hidden states of the full causal pass."""
    model = _model()
    qf = model.qformer
    img = _images(2)
    ids = torch.randint(1, VOCAB - 1, (2, 6))
    nq = model.config.num_query_tokens
    with torch.no_grad():
        kv = model.image_kv(img)
        full = qf(model.query_embeds(ids, 2), query_length=nq, encoder_kv=kv, mode="causal").last_hidden_state[:, nq:]
        cache = qf(model.query_embeds(None, 2), encoder_kv=kv, return_query_kv=True).query_kv
        steps = []
        for t in range(6):
            emb = model.embeddings(ids[:, t:t + 1], position_ids=torch.tensor([[t]]))
            out = qf(emb, past_query_kv=cache, return_query_kv=True)
            assert out.query_kv[0][0].shape == (2, nq + t + 1, 4, 16)
            assert torch.equal(out.query_kv[0][0][:, :nq + t], cache[0][0])  # past kept, new row appended
            cache = out.query_kv
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
