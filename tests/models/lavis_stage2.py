"""LAVIS' BLIP-2 stage 2 restated for the tests: how ``Blip2OPT.forward`` / ``Blip2T5.forward`` build their text
batches and compute the loss (lavis/models/blip2_models/blip2_opt.py, blip2_t5.py, with the caption text processor
of lavis/processors/blip_processors.py), and the decoding arguments its ``generate`` / ``predict_answers`` pass to
transformers 4.33.2 (LAVIS' pinned version) with what that version counts.

The model parts are transformers' own (``Blip2QFormerModel``, ``T5ForConditionalGeneration``, ...): LAVIS'
``Qformer.bert`` computes what transformers' Q-Former computes (tests/test_blip2_stage2.py holds blipfast to it).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# text batches


def pre_caption(caption: str, max_words: int = 50) -> str:
    """``BlipCaptionProcessor.pre_caption``."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def opt_batch(tokenizer, captions, *, processor_prompt: str = "a photo of ", model_prompt: str = "a photo of",
              max_txt_len: int = 32):
    """(input_ids, attention_mask, targets) of ``Blip2OPT.forward`` on ``samples["text_input"]`` = the caption
    processor's output (``BlipCaptionProcessor(prompt=processor_prompt)``, caption_coco_ft.yaml's "a photo of "),
    with the model's ``prompt`` (blip2_caption_opt2.7b.yaml's "a photo of") giving ``prompt_length``."""
    text_input = [processor_prompt + pre_caption(c) for c in captions]
    prompt_length = tokenizer(model_prompt, return_tensors="pt").attention_mask.sum(1)
    tokenizer.padding_side = "right"
    text = [t + "\n" for t in text_input]
    tok = tokenizer(text, return_tensors="pt", padding="longest", truncation=True, max_length=max_txt_len)
    targets = tok.input_ids.masked_fill(tok.input_ids == tokenizer.pad_token_id, -100)
    if model_prompt:
        targets[:, :prompt_length] = -100  # do not apply loss to the prompt
    return tok.input_ids, tok.attention_mask, targets


def t5_batch(tokenizer, text_input, text_output, *, max_txt_len: int = 32):
    """(input_ids, attention_mask, targets, decoder_attention_mask) of ``Blip2T5.forward``."""
    kw = dict(padding="longest", truncation=True, max_length=max_txt_len, return_tensors="pt")
    inp, out = tokenizer(list(text_input), **kw), tokenizer(list(text_output), **kw)
    targets = out.input_ids.masked_fill(out.input_ids == tokenizer.pad_token_id, -100)
    return inp.input_ids, inp.attention_mask, targets, out.attention_mask


# ---------------------------------------------------------------------------------------------------------------
# the T5 model


class LavisT5(nn.Module):
    """``Blip2T5`` on cached ViT tokens: ``ln_vision`` -> transformers' Q-Former over the queries -> ``t5_proj`` ->
    [queries | prompt] into the encoder of a T5 built as LAVIS builds it (``T5Config.from_pretrained(folder)``,
    then ``dense_act_fn = "gelu"``), the caption the decoder's target. Weights from a :class:`blipfast.Blip2Stage2`
    (its trained parts) and the LLM folder."""

    def __init__(self, stage2, llm_folder):
        from transformers import Blip2QFormerModel, T5Config, T5ForConditionalGeneration

        super().__init__()
        m = stage2.model
        self.qformer = Blip2QFormerModel(m.config.qformer_config)
        self.qformer.load_state_dict({k[len("qformer."):]: v for k, v in m.state_dict().items()
                                      if k.startswith("qformer.")}, strict=True)
        self.query_tokens = nn.Parameter(m.query_tokens.detach().clone())
        ln = m.vision_model.post_layernorm
        self.ln_vision = nn.LayerNorm(ln.normalized_shape, eps=ln.eps)
        self.ln_vision.load_state_dict(ln.state_dict())
        self.t5_proj = nn.Linear(m.language_projection.in_features, m.language_projection.out_features)
        self.t5_proj.load_state_dict(m.language_projection.state_dict())
        t5_config = T5Config.from_pretrained(llm_folder)
        t5_config.dense_act_fn = "gelu"
        self.t5_model = T5ForConditionalGeneration.from_pretrained(llm_folder, config=t5_config)
        for p in self.t5_model.parameters():
            p.requires_grad_(False)

    # LAVIS' names -> transformers' (blipfast's) names of the trained tensors
    NAMES = {"ln_vision.": "vision_model.post_layernorm.", "t5_proj.": "language_projection."}

    def hf_name(self, name: str) -> str:
        for a, b in self.NAMES.items():
            if name.startswith(a):
                return b + name[len(a):]
        return name

    def forward(self, image_embeds, input_ids, attention_mask, targets, decoder_attention_mask):
        image_embeds = self.ln_vision(image_embeds)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds)
        inputs_t5 = self.t5_proj(query_output.last_hidden_state)
        atts_t5 = torch.ones(inputs_t5.shape[:-1], dtype=torch.long)
        inputs_embeds = torch.cat([inputs_t5, self.t5_model.encoder.embed_tokens(input_ids)], dim=1)
        return self.t5_model(inputs_embeds=inputs_embeds, attention_mask=torch.cat([atts_t5, attention_mask], 1),
                             decoder_attention_mask=decoder_attention_mask, labels=targets).loss


def exact_gelu_is_used(t5_model) -> bool:
    """Every T5 feed-forward of the model runs the exact (erf) GELU."""
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    acts = [m.act for m in t5_model.modules() if hasattr(m, "wi") or hasattr(m, "wi_0")]
    return bool(acts) and all(torch.equal(a(x), F.gelu(x)) for a in acts)


# ---------------------------------------------------------------------------------------------------------------
# decoding: LAVIS' calls and transformers 4.33.2's counting


# the transformers arguments of each LAVIS call (HEAD of salesforce/LAVIS), in LAVIS' own words
CALLS = {
    # Blip2OPT.generate(samples, num_beams=5, max_length=30, min_length=1, repetition_penalty=1.0, length_penalty=1.0)
    ("generate", "opt"): dict(num_beams=5, max_length=30, min_length=1, repetition_penalty=1.0, length_penalty=1.0),
    # Blip2T5.generate: the same defaults, but max_new_tokens=max_length
    ("generate", "t5"): dict(num_beams=5, max_new_tokens=30, min_length=1, repetition_penalty=1.0,
                             length_penalty=1.0),
    # Blip2OPT.predict_answers(num_beams=5, max_len=10, min_len=1, length_penalty=0): max_new_tokens=max_len
    ("predict_answers", "opt"): dict(num_beams=5, max_new_tokens=10, min_length=1, length_penalty=0),
    # Blip2T5.predict_answers(num_beams=5, max_len=10, min_len=1, length_penalty=-1)
    ("predict_answers", "t5"): dict(num_beams=5, max_new_tokens=10, min_length=1, length_penalty=-1),
}


def counts_4_33(call: dict):
    """(most, least) NEW tokens transformers 4.33.2 lets ``generate(inputs_embeds=..., **call)`` produce before its
    EOS: a decoder-only model given only ``inputs_embeds`` starts from ``input_ids`` = [BOS] (a placeholder, not
    fed to the model, but returned and counted), an encoder-decoder one from [decoder_start]; ``max_length`` and
    ``min_length`` count that first token, ``max_new_tokens`` does not (``max_length`` = start + new). The EOS is
    refused while the sequence is shorter than ``min_length`` (MinLengthLogitsProcessor)."""
    start = 1  # the BOS placeholder or the decoder start token
    most = call["max_new_tokens"] if "max_new_tokens" in call else call["max_length"] - start
    least = max(call.get("min_length", 0) - start, 0)
    return most, least
