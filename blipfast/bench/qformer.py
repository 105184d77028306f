"""Q-Former forward and forward+backward: blipfast.QFormer against Hugging Face's Blip2QFormerModel.

Both models hold the same random weights (the default BLIP-2 configuration unless told otherwise) and
see the same inputs: the ITC image pass (32 queries cross-attending to 257 image tokens) and the ITM
pass (queries + 32 text tokens, a quarter of the text padded, bidirectional). On CUDA both run under
bf16 autocast (LAVIS trains the Q-Former under autocast); on CPU in fp32. FLOPs are counted from the
layer shapes (2 * MACs of every GEMM and attention product), forward = 1x, forward+backward = 3x.
"""
from __future__ import annotations

import contextlib

import torch

from .common import Case


def _flops_fwd(cfg, b, q, t, n_img, text: bool) -> float:
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    enc = cfg.encoder_hidden_size
    L = q + (t if text else 0)
    total = 0.0
    for i in range(layers):
        total += 2 * b * L * d * 3 * d + 2 * b * L * d * d  # QKV + output projection
        total += 2 * 2 * b * L * L * d  # QK^T and PV
        if i % cfg.cross_attention_frequency == 0:
            total += 2 * b * q * d * d * 2  # query + output projections
            total += 2 * b * n_img * enc * d * 2  # image K/V projections
            total += 2 * 2 * b * q * n_img * d
        total += 2 * b * L * d * f * 2  # FFN (query and text FFNs have equal shapes)
    return total


def _models(device, cfg_overrides=None):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    from ..models.qformer import QFormer

    hf_cfg = Blip2QFormerConfig(use_qformer_text_input=True, **(cfg_overrides or {}))
    try:
        hf_cfg._attn_implementation = "sdpa"
    except Exception:  # older transformers spell it differently; the default is then used
        pass
    hf = Blip2QFormerModel(hf_cfg).to(device)
    bf = QFormer(hf_cfg).to(device)
    bf.load_state_dict(hf.state_dict(), strict=True)
    hf.train()
    bf.train()
    return hf_cfg, hf, bf


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          batch: int | None = None, cfg_overrides: dict | None = None) -> list[Case]:
    """The Q-Former cases of ``blipfast bench`` (dropout on, as in training)."""
    if batch is None:
        batch = (8 if quick else 32) if device.type == "cuda" else 2
    n_img = 257
    cfg, hf, bf = _models(device, cfg_overrides)
    q, t = 32, 32
    d, enc = cfg.hidden_size, cfg.encoder_hidden_size
    use_amp = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)

    def amp():
        return torch.autocast("cuda", dtype=dtype) if use_amp else contextlib.nullcontext()

    image = torch.randn(batch, n_img, enc, device=device)
    queries = torch.randn(batch, q, d, device=device, requires_grad=True)
    text = torch.randn(batch, t, d, device=device, requires_grad=True)
    mask = torch.ones(batch, q + t, dtype=torch.long, device=device)
    lengths = torch.randint(t // 2, t + 1, (batch,), device=device)
    mask[:, q:] = (torch.arange(t, device=device)[None, :] < lengths[:, None]).long()

    out = []
    for label, text_on in (("ITC image pass", False), ("ITM pass", True)):
        emb = torch.cat([queries, text], 1) if text_on else queries
        kw = dict(query_length=q, encoder_hidden_states=image)
        if text_on:
            kw["attention_mask"] = mask
        flops = _flops_fwd(cfg, batch, q, t, n_img, text_on)
        params = dict(batch=batch, queries=q, text=t if text_on else 0, image_tokens=n_img,
                      dtype=str(dtype).replace("torch.", "") if use_amp else "float32",
                      layers=cfg.num_hidden_layers, hidden=d)
        for model_name, model, base in (("HF transformers", hf, True), ("blipfast", bf, False)):
            def fwd(model=model, emb=emb, kw=kw):
                with torch.no_grad(), amp():
                    return model(query_embeds=emb, **kw)[0]

            def fwd_bwd(model=model, emb=emb, kw=kw):
                with amp():
                    o = model(query_embeds=emb, **kw)[0]
                o.float().sum().backward()
                model.zero_grad(set_to_none=True)

            out.append(Case(f"qformer {label} fwd", model_name, fwd, flops=flops, baseline=base, params=params))
            out.append(Case(f"qformer {label} fwd+bwd", model_name, fwd_bwd, flops=3 * flops, baseline=base,
                            params=params))
    return out
