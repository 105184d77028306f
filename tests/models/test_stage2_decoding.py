"""LAVIS' decoding settings in blipfast (``Blip2Stage2.decoding_settings`` / ``generate(settings=...)``) against
LAVIS' own calls restated in tests/helpers/lavis_stage2.py, with the lengths counted as its transformers (4.33.2)
counts them: a BOS placeholder (decoder-only) or the decoder start token (Flan-T5) counts toward ``max_length``
and ``min_length``. The counts are checked on real ``generate`` runs of tiny models whose LM head always prefers
one token: the EOS (so the caption is as short as ``min_length`` allows) or another token (as long as
``max_length`` allows)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from blipfast.models.blip2_stage2 import Blip2Stage2
from blipfast.models.llm import SETTINGS, decoding_settings, new_token_counts
from blipfast.testing import blip2 as T
from tests.helpers import lavis_stage2 as lavis

# (blipfast settings, LLM kind, InstructBLIP) -> LAVIS' call as its task (or a user of its defaults) makes it
LAVIS_CALLS = {
    ("caption", "opt", False): lavis.opt_generate(),
    ("caption", "t5", False): lavis.t5_generate(),
    ("caption", "opt", True): lavis.vicuna_instruct_generate(),
    ("caption", "t5", True): lavis.t5_instruct_generate(),
    ("coco", "opt", False): lavis.caption_task(lavis.opt_generate),
    ("coco", "t5", False): lavis.caption_task(lavis.t5_generate),
    ("vqa", "opt", False): lavis.vqa_task(lavis.opt_predict_answers),
    ("vqa", "t5", False): lavis.vqa_task(lavis.t5_predict_answers),
    ("vqa", "opt", True): lavis.vqa_task(lavis.vicuna_instruct_predict_answers),
    ("vqa", "t5", True): lavis.vqa_task(lavis.t5_instruct_predict_answers),
}


@pytest.mark.parametrize("key", sorted(LAVIS_CALLS), ids=lambda k: "-".join(map(str, k)))
def test_settings_give_lavis_calls(key):
    """Beams, penalties, sampling off, and LAVIS' lengths as new-token counts by transformers 4.33.2's rule:
    COCO with OPT at most 29 and at least 7 new tokens, Flan-T5 30 and 7; VQA at most 10, and min_len 1 forbids
    nothing; the length penalty -1 (Flan-T5) / 0 (OPT, Vicuna); the prompts of LAVIS' configs."""
    name, kind, instruct = key
    call = LAVIS_CALLS[key]
    s = decoding_settings(name, is_encoder_decoder=kind == "t5", is_instructblip=instruct)
    kw = s.generate_kwargs()
    assert (kw["max_new_tokens"], kw["min_new_tokens"]) == lavis.counts_4_33(call)
    assert kw["do_sample"] is call["do_sample"] is False
    for k in ("num_beams", "length_penalty"):
        assert kw[k] == call[k], k
    assert kw["repetition_penalty"] == call.get("repetition_penalty", 1.0)
    assert s.prompt == {"caption": "", "coco": lavis.COCO_PROMPT, "vqa": lavis.VQA_RUN["prompt"]}[name]
    if key[:2] == ("coco", "opt"):
        assert (kw["max_new_tokens"], kw["min_new_tokens"]) == (29, 7)


def test_counting_rule_and_bad_names():
    assert new_token_counts(30, 8, max_counts_start=True) == (29, 7)
    assert new_token_counts(30, 8, max_counts_start=False) == (30, 7)
    assert new_token_counts(10, 0, max_counts_start=False) == (10, 0)
    with pytest.raises(ValueError, match="max_length"):
        new_token_counts(1, 0, max_counts_start=True)  # no new token at all
    with pytest.raises(ValueError, match="min_length"):
        new_token_counts(10, -1, max_counts_start=True)
    with pytest.raises(ValueError, match="settings must be one of"):
        decoding_settings("nocaps", is_encoder_decoder=False)
    assert SETTINGS == ("caption", "coco", "vqa")


class _Prefers(nn.Module):
    """An LM head whose logits prefer token ``k`` at every step, whatever the hidden state."""

    def __init__(self, vocab: int, k: int):
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, h):
        out = h.new_zeros(*h.shape[:-1], self.vocab)
        out[..., self.k] = 5.0
        return out


def _new_tokens(stage2, out):
    """The new tokens of each row up to and with its first EOS [B] (decoder-only: all of ``out``; seq2seq: after
    the decoder start token)."""
    new = out if not stage2.is_encoder_decoder else out[:, 1:]
    eos = (new == T.EOS).int()
    before = (eos.cumsum(1) - eos) == 0  # positions up to the first EOS
    return before.sum(1)


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("name", ["coco", "vqa"])
def test_generate_counts_equal_lavis(kind, name):
    """Blip2Stage2.generate(settings=...) produces LAVIS' counts: with the EOS always preferred the caption ends as
    early as LAVIS' min_length allows (LAVIS' least new tokens, then the EOS); with another token preferred it
    runs to LAVIS' max (COCO with OPT: 29 new tokens, not 30). Flags given win over the settings."""
    stage2 = Blip2Stage2(T.blip2(kind)).eval()
    lm = stage2.language_model
    call = LAVIS_CALLS[(name, kind, False)]
    most, least = lavis.counts_4_33(call)
    feats = torch.randn(1, 5, 24)
    lm.lm_head = _Prefers(lm.config.vocab_size, T.EOS)
    short = stage2.generate(image_embeds=feats, settings=name)
    assert _new_tokens(stage2, short).tolist() == [least + 1]  # least tokens, then the EOS
    lm.lm_head = _Prefers(lm.config.vocab_size, 7)
    long = stage2.generate(image_embeds=feats, settings=name)
    assert _new_tokens(stage2, long).tolist() == [most] and (long != T.EOS).all()
    given = stage2.generate(image_embeds=feats, settings=name, max_new_tokens=3, min_new_tokens=1)
    assert _new_tokens(stage2, given).tolist() == [3]
    with pytest.raises(TypeError, match="settings"):
        stage2.generate(image_embeds=feats, settings=3)
