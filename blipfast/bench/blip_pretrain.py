"""BLIP (v1) pre-training step and CapFilt: blipfast against Salesforce BLIP's step restated in PyTorch
(blipfast/bench/blip_pretrain_baseline.py: four text passes that see the image, each projecting its K/V, BERT layers
with dense -10000 masks and SDPA, the momentum loop, 2B ``multinomial(...).item()`` draws, ``int(queue_ptr)``)
and against Hugging Face's BLIP models. Same weights on both sides; the ViT is HF's ``BlipVisionModel`` with SDPA
attention in both step implementations.

Counted on every device (``counted_report``: B = 64, T = 30, ViT-B/16 at 224 px, BERT-base MED, queue 57600, fp32,
dropout 0.1, on meta tensors with the GPU's dispatch, see blipfast/bench/counting.py): FLOPs, bytes saved for the
backward, operators, host syncs of one forward + backward.

Timed on CUDA (``cases``): the training step (forward, backward, AdamW) at B = 64, 224 px, bf16 autocast, as
images/s (eager and ``torch.compile``, the baseline eager and compiled); CapFilt on BLIP-base models (ViT-B at
384 px, 2 web captions per image, 20-token sampled captions) as images/s of :meth:`blipfast.capfilt.CapFilt
.process_pixels` against the HF models (unswapped ``generate``; ITM through ``BlipForImageTextRetrieval``'s text
encoder over each text's copy of its image tokens; the ViT once per image in both).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .common import Case, captions, training_step
from .counting import Cost, count_step, counting_gpu_path, format_cost_table

BASELINE = "BLIP step (eager, SDPA)"
STEP_GROUP = "blip_pretrain step"
CAPFILT_GROUP = "blip_pretrain capfilt"


def _batch(b: int, t: int, size: int, vocab: int, device, generator=None):
    px = torch.randn(b, 3, size, size, device=device, generator=generator)
    return (px, *captions(b, t, 1000, min(vocab, 30000), t // 3, device, generator))


def counted(batch: int = 64, text_len: int = 30, config=None) -> list[tuple[str, Cost]]:
    """[(name, Cost)] of one pre-training step (forward + backward) of the baseline and of blipfast, counted on meta
    tensors with the dispatch of a CUDA device (float32, dropout on)."""
    from ..models.blip_pretrain import BlipPretrain, BlipPretrainConfig
    from .blip_pretrain_baseline import blip_pretrain_forward

    with torch.device("meta"):
        model = BlipPretrain(config or BlipPretrainConfig()).train()
        c = model.config
        px = torch.randn(batch, 3, c.vision.image_size, c.vision.image_size)
        ids = torch.randint(1, c.text.vocab_size - 2, (batch, text_len))
        mask = torch.ones(batch, text_len, dtype=torch.long)
    keep = list(model.parameters()) + list(model.buffers()) + [px, ids, mask]

    def ours():
        model(px, ids, mask, alpha=0.4).loss.backward()

    def base():
        blip_pretrain_forward(model, px, ids, mask, 0.4)["loss"].backward()

    with counting_gpu_path():
        return [(BASELINE, count_step(base, exclude=keep)), ("blipfast BlipPretrain", count_step(ours, exclude=keep))]


def counted_report(batch: int = 64) -> tuple[str, dict]:
    rows = counted(batch)
    ratio = rows[1][1].ratio(rows[0][1])
    payload = {"batch": batch, "text_len": 30, "image_size": 224, "queue_size": 57600, "dtype": "float32",
               "counted_on": "meta, GPU dispatch", "rows": {n: c.as_dict() for n, c in rows}, "ratio": ratio}
    head = f"BLIP pre-training step, counted (B = {batch}, T = 30, ViT-B/16 224 px, BERT-base MED, queue 57600, fp32)"
    return head + "\n" + format_cost_table(rows, BASELINE), payload


# ----------------------------------------------------------------------------------------------
# timed (CUDA)


def _step_cases(device, dtype, batch: int) -> list[Case]:
    from ..models.blip_pretrain import BlipPretrain, BlipPretrainConfig
    from .blip_pretrain_baseline import blip_pretrain_forward

    model = BlipPretrain(BlipPretrainConfig()).to(device).train()
    px, ids, mask = _batch(batch, 30, 224, model.config.text.vocab_size, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05,
                            fused=True)
    amp = torch.autocast("cuda", dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext()
    alpha = torch.tensor(0.4, device=device)
    flops = {name: c.flops for name, c in counted(batch)}

    def step(loss_fn):
        return training_step(opt, amp, loss_fn)

    ours = lambda: model(px, ids, mask, alpha=alpha).loss  # noqa: E731
    base = lambda: blip_pretrain_forward(model, px, ids, mask, 0.4)["loss"]  # noqa: E731
    ours_c = torch.compile(lambda: model(px, ids, mask, alpha=alpha).loss, fullgraph=True)
    base_c = torch.compile(lambda: blip_pretrain_forward(model, px, ids, mask, 0.4)["loss"])
    params = dict(batch=batch, text_len=30, image_size=224, dtype=str(dtype).replace("torch.", ""))
    g = f"{STEP_GROUP} B={batch}"
    f_base, f_ours = flops[BASELINE], flops["blipfast BlipPretrain"]
    return [
        Case(g, BASELINE, step(base), flops=f_base, baseline=True, params=params),
        Case(g, "BLIP step, torch.compile", step(base_c), flops=f_base, baseline=True, params=params,
             optional="torch.compile (Inductor with Triton) does not work on this torch/device"),
        Case(g, "blipfast", step(ours), flops=f_ours, params=params),
        Case(g, "blipfast, torch.compile", step(ours_c), flops=f_ours, params=params),
    ]


def _hf_capfilt(cap, filt, tok, enc_id, cap_px, filt_px, web, gen):
    """CapFilt with the unswapped HF models: HF ``generate``, then the ITM head over every text with its own copy
    of the image tokens (the ViT once per image)."""
    with torch.no_grad():
        b = cap_px.shape[0]
        prompt = tok(["a picture of "] * b, return_tensors="pt")["input_ids"].to(cap_px.device)
        out = cap.generate(pixel_values=cap_px, input_ids=prompt, **gen)
        synthetic = [t[len("a picture of "):] for t in tok.batch_decode(out, skip_special_tokens=True)]
        texts, owner = [], []
        for i, (ws, s) in enumerate(zip(web, synthetic)):
            texts += list(ws) + [s]
            owner += [i] * (len(ws) + 1)
        enc = tok(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt").to(cap_px.device)
        ids = enc["input_ids"]
        ids[:, 0] = enc_id
        embeds = filt.vision_model(pixel_values=filt_px).last_hidden_state
        h = filt.text_encoder(input_ids=ids, attention_mask=enc["attention_mask"],
                              encoder_hidden_states=embeds[torch.tensor(owner, device=ids.device)]).last_hidden_state
        return filt.itm_head(h[:, 0]).float().softmax(-1)[:, 1]


def _bench_tokenizer(words: int = 30000):
    """A BERT-style word-level tokenizer ("w0" ... "w29999", [CLS] ... [SEP]) with BLIP's [DEC] and [ENC]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    from ..data.tokenizer import add_enc_token

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(words)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok = BertTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            unk_token="[UNK]", mask_token="[MASK]")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return add_enc_token(tok)


def _capfilt_cases(device, dtype, batch: int) -> list[Case]:
    import copy

    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from ..capfilt import BlipPart, CapFilt
    from ..models.blip_vision import fuse_vision_model
    from ..patch import apply_blipfast_to_blip

    tok = _bench_tokenizer()
    cfg = BlipConfig(text_config=dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, sep_token_id=3,
                                      eos_token_id=3, pad_token_id=0), vision_config=dict(image_size=384))
    hf_cap = BlipForConditionalGeneration(cfg).to(device, dtype).eval()
    hf_filt = BlipForImageTextRetrieval(cfg).to(device, dtype).eval()
    ours_cap = apply_blipfast_to_blip(copy.deepcopy(hf_cap))
    ours_filt = apply_blipfast_to_blip(copy.deepcopy(hf_filt))
    for m in (ours_cap, ours_filt):
        fuse_vision_model(m.vision_model)
    pipe = CapFilt(BlipPart(ours_cap, tok, None, "captioner"), BlipPart(ours_filt, tok, None, "filter"),
                   max_length=20, min_length=20)
    px = torch.randn(batch, 3, 384, 384, device=device, dtype=dtype)
    web = [[" ".join(f"w{(i * 7 + k) % 30000}" for k in range(12)), " ".join(f"w{(i * 13 + k) % 30000}"
                                                                           for k in range(9))] for i in range(batch)]
    gen = dict(do_sample=True, top_p=0.9, repetition_penalty=1.1, max_length=20, min_length=20, num_beams=1)
    enc_id = tok.convert_tokens_to_ids("[ENC]")
    params = dict(batch=batch, image_size=384, web_texts=2, caption_tokens=20, dtype=str(dtype).replace("torch.", ""))
    g = f"{CAPFILT_GROUP} B={batch}"
    return [
        Case(g, "HF BLIP models", lambda: _hf_capfilt(hf_cap, hf_filt, tok, enc_id, px, px, web, gen), baseline=True,
             params=params),
        Case(g, "blipfast capfilt", lambda: pipe.process_pixels(px, px, web), params=params),
    ]


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          batch: Optional[int] = None) -> list[Case]:
    """Timed cases (CUDA only: a ViT-B step takes seconds on a CPU)."""
    if device.type != "cuda":
        return []
    batch = batch or (8 if quick else 64)
    return _step_cases(device, dtype, batch) + _capfilt_cases(device, dtype, batch)


def images_per_s(results) -> str:
    lines = []
    for r in results:
        if not r.group.startswith("blip_pretrain") or r.ms is None:
            continue
        ips = r.params.get("batch", 0) / (r.ms / 1e3)
        lines.append(f"  {r.group:<28} {r.name:<28} {ips:9.1f} images/s  peak {r.peak_mem_mb or 0:8.0f} MB")
    return "\n".join(lines)
