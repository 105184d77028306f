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


# The transformers arguments of LAVIS' decoding calls (HEAD of salesforce/LAVIS), default for default, and what its
# tasks pass to them. Each returns the keyword arguments of transformers' generate besides inputs_embeds,
# attention_mask and the EOS.

def opt_generate(use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1, top_p=0.9,
                 repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1):
    """``Blip2OPT.generate``."""
    return dict(do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature, num_beams=num_beams,
                max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
                length_penalty=length_penalty, num_return_sequences=num_captions)


def t5_generate(use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1, top_p=0.9,
                repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1):
    """``Blip2T5.generate`` (and ``Blip2T5Instruct.generate`` with its defaults passed): ``max_new_tokens``."""
    return dict(do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature, num_beams=num_beams,
                max_new_tokens=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
                length_penalty=length_penalty, num_return_sequences=num_captions)


def opt_predict_answers(num_beams=5, max_len=10, min_len=1, prompt="", length_penalty=0):
    """``Blip2OPT.predict_answers`` (inference_method "generate")."""
    return dict(do_sample=False, num_beams=num_beams, max_new_tokens=max_len, min_length=min_len,
                length_penalty=length_penalty)


def t5_predict_answers(num_beams=5, max_len=10, min_len=1, prompt="", length_penalty=-1):
    """``Blip2T5.predict_answers``."""
    return dict(do_sample=False, num_beams=num_beams, max_new_tokens=max_len, min_length=min_len,
                length_penalty=length_penalty)


def vicuna_instruct_generate(use_nucleus_sampling=False, num_beams=5, max_length=256, min_length=1, top_p=0.9,
                             repetition_penalty=1.5, length_penalty=1, num_captions=1, temperature=1):
    """``Blip2VicunaInstruct.generate``: ``max_length`` with inputs_embeds, as OPT."""
    return opt_generate(use_nucleus_sampling, num_beams, max_length, min_length, top_p, repetition_penalty,
                        length_penalty, num_captions, temperature)


def vicuna_instruct_predict_answers(num_beams=5, max_len=10, min_len=1, prompt="", length_penalty=0):
    """``Blip2VicunaInstruct.predict_answers``: its own generate with max_length=max_len."""
    return vicuna_instruct_generate(num_beams=num_beams, max_length=max_len, min_length=min_len,
                                    length_penalty=length_penalty)


def t5_instruct_predict_answers(num_beams=5, max_len=10, min_len=1, prompt="", length_penalty=-1):
    """``Blip2T5Instruct.predict_answers``: its generate with max_length=max_len (there max_new_tokens)."""
    return t5_generate(num_beams=num_beams, max_length=max_len, min_length=min_len, length_penalty=length_penalty,
                       repetition_penalty=1.5)


def t5_instruct_generate(**kw):
    """``Blip2T5Instruct.generate``: T5's call with max_length 256 and repetition penalty 1.5 by default."""
    return t5_generate(**{"max_length": 256, "repetition_penalty": 1.5, **kw})


# lavis/projects/blip2/eval/caption_coco_{opt2.7b,flant5xl}_eval.yaml + CaptionTask.valid_step as BLIP-2 was
# evaluated (it passed use_nucleus_sampling=False, num_beams, max_length=max_len, min_length=min_len), the model
# prompt "a photo of" (configs/models/blip2/blip2_caption_*.yaml)
COCO_RUN = dict(num_beams=5, max_len=30, min_len=8)
COCO_PROMPT = "a photo of"
# lavis/projects/blip2/eval/vqav2_zeroshot_*_eval.yaml + VQATask.valid_step (passes num_beams, max_len, min_len,
# prompt; no length penalty)
VQA_RUN = dict(num_beams=5, max_len=10, min_len=1, prompt="Question: {} Short answer:")


def caption_task(generate, run=COCO_RUN):
    """``CaptionTask.valid_step`` (BLIP-2's version) calling a model's generate."""
    return generate(use_nucleus_sampling=False, num_beams=run["num_beams"], max_length=run["max_len"],
                    min_length=run["min_len"])


def vqa_task(predict_answers, run=VQA_RUN):
    """``VQATask.valid_step`` calling a model's predict_answers."""
    return predict_answers(num_beams=run["num_beams"], max_len=run["max_len"], min_len=run["min_len"],
                           prompt=run["prompt"])


def counts_4_33(call: dict):
    """(most, least) NEW tokens transformers 4.33.2 lets ``generate(inputs_embeds=..., **call)`` produce before its
    EOS: a decoder-only model given only ``inputs_embeds`` starts from ``input_ids`` = [BOS] (a placeholder, not
    fed to the model, but returned and counted: utils.py ``_maybe_initialize_input_ids_for_generation``), an
    encoder-decoder one from [decoder_start]; ``max_length`` counts that first token, ``max_new_tokens`` does not
    (``max_length`` = its length + new); the EOS is refused while the sequence is shorter than ``min_length``
    (``MinLengthLogitsProcessor``: ``input_ids.shape[-1] < min_length``)."""
    start = 1  # the BOS placeholder or the decoder start token
    most = call["max_new_tokens"] if "max_new_tokens" in call else call["max_length"] - start
    least = max(call["min_length"] - start, 0)
    return most, least
