"""Counted cost of BLIP (v1)'s image-text matching pass: blipfast.BlipTextModel against HF's BlipTextModel.

The pass of BLIP pre-training (docs/semantics.md#blip-pre-training; blip_pretrain.py): B images and 3B text rows (each
caption with its own image, each caption with a sampled negative image, each image with a sampled negative caption), the
image-grounded text encoder cross-attending to the image tokens in every layer, ``itm_head`` on the first token,
cross-entropy against [1]*B + [0]*2B, and the backward into the text model and the image features (BLIP trains
its ViT). Three implementations of the same loss:

- ``hf``: transformers' ``BlipTextModel`` (the reference semantics): each row-set gets its own copy of the image
  tokens (``image[kv_index]``), so the image K/V projections of all 12 layers run 3 times per image;
- ``blipfast, gathered images``: blipfast.BlipTextModel on the same gathered copies (the fused ops alone);
- ``blipfast, shared image K/V``: ``image_kv(image)`` once per image (one GEMM for every layer) and
  ``kv_index`` for the 3B rows.

Counted with blipfast.bench.counting, in one of two ways:

- on CPU tensors (default; fp32, dropout 0, the HF default of BlipTextConfig: with dropout the CPU takes the
  reference attention, which is not what a GPU runs): the computation really runs;
- ``--gpu-path``: on meta tensors that take the dispatch decisions of a CUDA device (``counting_gpu_path``: the
  Triton attention and the CUDA epilogue, their fake implementations standing in for the kernels), in bf16 and
  with BLIP's dropout of 0.1 by default (the kernels regenerate their dropout masks; HF keeps them). Nothing is
  computed, so full-size batches count in seconds.

``python -m blipfast.bench.blip_itm [--batch 8] [--gpu-path] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import torch
import torch.nn.functional as F

from .counting import Cost, count_step, counting_gpu_path, format_cost_table

# BLIP-base text model (Salesforce med_config.json) at pre-training shapes: 224 px ViT-B/16, captions of 30 tokens
BASE = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, bos_token_id=30522, sep_token_id=102, pad_token_id=0)


def itm_steps(batch: int = 8, text_len: int = 30, image_tokens: int = 197, cfg_overrides: Optional[dict] = None,
              device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """name -> (step() returning the ITM loss after its backward, tensors to exclude from saved bytes)."""
    from transformers import BlipTextConfig
    from transformers import BlipTextModel as HFBlipTextModel

    from ..models.blip import BlipTextModel

    torch.manual_seed(seed)
    cfg = BlipTextConfig(**{**BASE, **(cfg_overrides or {})})
    with torch.device(device):
        hf = HFBlipTextModel._from_config(cfg, attn_implementation="eager", add_pooling_layer=False).to(dtype).train()
        bf = BlipTextModel.from_hf(hf).train()
        itm_head = torch.nn.Linear(cfg.hidden_size, 2, dtype=dtype)
        b = batch
        image = torch.randn(b, image_tokens, cfg.encoder_hidden_size, dtype=dtype, requires_grad=True)
        ids = torch.randint(4, min(cfg.vocab_size, 30522), (b, text_len))
        lengths = torch.randint(text_len // 3, text_len + 1, (b,))
        mask = (torch.arange(text_len)[None] < lengths[:, None]).long()  # captions padded to max_length
        ids = ids.masked_fill(mask == 0, 0)
        ids[:, 0] = 30523 if cfg.vocab_size > 30523 else 1  # [ENC]
        other = (torch.arange(b) + torch.randint(1, max(b, 2), (b,))) % b  # a different sample (B > 1)
        kv_index = torch.cat([torch.arange(b), other, torch.arange(b)])  # image of each row
        text_index = torch.cat([torch.arange(b), torch.arange(b), other.roll(1)])  # caption of each row
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    rows_ids, rows_mask = ids[text_index], mask[text_index]

    def finish(model, hidden):
        loss = F.cross_entropy(F.linear(hidden[:, 0], itm_head.weight, itm_head.bias), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        itm_head.zero_grad(set_to_none=True)
        image.grad = None
        return loss.detach()

    def hf_step():
        return finish(hf, hf(rows_ids, attention_mask=rows_mask, encoder_hidden_states=image[kv_index])[0])

    def bf_gathered():
        return finish(bf, bf(rows_ids, attention_mask=rows_mask, encoder_hidden_states=image[kv_index])[0])

    def bf_shared():
        return finish(bf, bf(rows_ids, attention_mask=rows_mask, encoder_kv=bf.image_kv(image), kv_index=kv_index)[0])

    inputs = [image, ids, mask, rows_ids, rows_mask, kv_index, text_index, labels, *itm_head.parameters()]
    return {"hf BlipTextModel (reference)": (hf_step, [*hf.parameters(), *inputs]),
            "blipfast, gathered images": (bf_gathered, [*bf.parameters(), *inputs]),
            "blipfast, shared image K/V": (bf_shared, [*bf.parameters(), *inputs])}


def count_itm(*, gpu_path: bool = False, **kwargs) -> list[tuple[str, Cost]]:
    """Counted cost of each implementation of :func:`itm_steps` (same arguments); ``gpu_path``: on meta tensors
    as on a CUDA device (see the module doc)."""
    if not gpu_path:
        return [(name, count_step(step, exclude)) for name, (step, exclude) in itm_steps(**kwargs).items()]
    with counting_gpu_path():
        steps = itm_steps(**{**kwargs, "device": "meta"})
        return [(name, count_step(step, exclude)) for name, (step, exclude) in steps.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per step (3x as many text rows)")
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--image-tokens", type=int, default=197, help="197 at 224 px, 577 at 384 px (ViT-B/16)")
    p.add_argument("--device", default="cpu", help="where the CPU-path count runs")
    p.add_argument("--gpu-path", action="store_true", help="count the GPU path on meta tensors (bf16, dropout)")
    p.add_argument("--dropout", type=float, help="hidden and attention dropout (default: 0, or 0.1 with --gpu-path)")
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args(argv)
    dropout = args.dropout if args.dropout is not None else (0.1 if args.gpu_path else 0.0)
    dtype = torch.bfloat16 if args.gpu_path else torch.float32
    rows = count_itm(batch=args.batch, text_len=args.text_len, image_tokens=args.image_tokens, device=args.device,
                     dtype=dtype, gpu_path=args.gpu_path,
                     cfg_overrides=dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    print(f"BLIP ITM pass, forward + backward: B={args.batch} images, {3 * args.batch} text rows of "
          f"{args.text_len} tokens, {args.image_tokens} image tokens, BLIP-base text model, "
          f"{'GPU path (meta tensors), bf16' if args.gpu_path else args.device + ', fp32'}, dropout {dropout}")
    print(format_cost_table(rows, base=rows[0][0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": {n: c.as_dict() for n, c in rows}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
