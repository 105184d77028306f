"""BLIP (v1) retrieval fine-tuning step: blipfast.BlipRetrieval against Salesforce BLIP's ``BLIP_Retrieval`` step
restated in PyTorch (blipfast/bench/blip_retrieval_baseline.py: the ITM positives and negatives in two text passes
that each project the image tokens to cross-attention K/V, BERT layers with dense -10000 masks and SDPA, the momentum
loop, 2B ``multinomial(...).item()`` draws, ``int(ptr_queue)``). Same weights on both sides; the ViT is HF's
``BlipVisionModel`` with SDPA attention in both.

Counted on every device (``counted_report``: BLIP's COCO recipe, B = 32, T = 35, ViT-B/16 at 384 px, BERT-base MED,
queue 57600, ``negative_all_rank`` on one process, fp32, dropout 0.1, on meta tensors with the GPU's dispatch, see
blipfast/bench/counting.py): FLOPs, bytes saved for the backward, operators, host syncs of one forward + backward.
Both without ViT gradient checkpointing (the recipe checkpoints the last 4 blocks: the same recompute on both sides).

Timed on CUDA (``cases``): the training step (forward, backward, AdamW) at B = 32, 384 px, bf16 autocast, as images/s
(eager and ``torch.compile``, the baseline eager and compiled).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .common import Case, captions, training_step
from .counting import Cost, count_step, counting_gpu_path, format_cost_table

BASELINE = "BLIP step (eager, SDPA)"
OURS = "blipfast BlipRetrieval"
GROUP = "blip_retrieval step"
TEXT_LEN = 35  # BLIP's retrieval captions: padding="max_length", max_length=35


def _config(config=None):
    from ..models.blip_retrieval import BlipRetrievalConfig

    return config or BlipRetrievalConfig(vit_grad_ckpt=False)


def counted(batch: int = 32, text_len: int = TEXT_LEN, config=None) -> list[tuple[str, Cost]]:
    """[(name, Cost)] of one retrieval fine-tuning step (forward + backward) of the baseline and of blipfast,
    counted on meta tensors with the dispatch of a CUDA device (float32, dropout on)."""
    from ..models.blip_retrieval import BlipRetrieval
    from .blip_retrieval_baseline import blip_retrieval_forward

    with torch.device("meta"):
        model = BlipRetrieval(_config(config)).train()
        c = model.config
        px = torch.randn(batch, 3, c.vision.image_size, c.vision.image_size)
        ids = torch.randint(1, c.text.vocab_size - 2, (batch, text_len))
        mask = torch.ones(batch, text_len, dtype=torch.long)
        image_ids = torch.arange(batch)
    keep = list(model.parameters()) + list(model.buffers()) + [px, ids, mask, image_ids]

    def ours():
        model(px, ids, mask, alpha=0.4, image_ids=image_ids).loss.backward()

    def base():
        blip_retrieval_forward(model, px, ids, mask, 0.4, image_ids)["loss"].backward()

    with counting_gpu_path():
        return [(BASELINE, count_step(base, exclude=keep)), (OURS, count_step(ours, exclude=keep))]


def counted_report(batch: int = 32) -> tuple[str, dict]:
    rows = counted(batch)
    ratio = rows[1][1].ratio(rows[0][1])
    payload = {"batch": batch, "text_len": TEXT_LEN, "image_size": 384, "queue_size": 57600, "dtype": "float32",
               "negative_all_rank": True, "counted_on": "meta, GPU dispatch", "rows": {n: c.as_dict() for n, c in rows},
               "ratio": ratio}
    head = (f"BLIP retrieval fine-tuning step, counted (B = {batch}, T = {TEXT_LEN}, ViT-B/16 384 px, BERT-base MED, "
            f"queue 57600, fp32)")
    return head + "\n" + format_cost_table(rows, BASELINE), payload


# ----------------------------------------------------------------------------------------------
# timed (CUDA)


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          batch: Optional[int] = None) -> list[Case]:
    """Timed cases (CUDA only: a ViT-B step at 384 px takes seconds on a CPU)."""
    if device.type != "cuda":
        return []
    from ..models.blip_retrieval import BlipRetrieval
    from .blip_retrieval_baseline import blip_retrieval_forward

    batch = batch or (8 if quick else 32)
    model = BlipRetrieval(_config()).to(device).train()
    px = torch.randn(batch, 3, 384, 384, device=device)
    ids, mask = captions(batch, TEXT_LEN, 1000, 30000, TEXT_LEN // 3, device)
    image_ids = torch.arange(batch, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05,
                            fused=True)
    amp = torch.autocast("cuda", dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext()
    alpha = torch.tensor(0.4, device=device)
    flops = {name: c.flops for name, c in counted(batch)}

    def ours():
        return model(px, ids, mask, alpha=alpha, image_ids=image_ids).loss

    def base():
        return blip_retrieval_forward(model, px, ids, mask, 0.4, image_ids)["loss"]

    params = dict(batch=batch, text_len=TEXT_LEN, image_size=384, dtype=str(dtype).replace("torch.", ""))
    g = f"{GROUP} B={batch}"
    f_base, f_ours = flops[BASELINE], flops[OURS]
    return [
        Case(g, BASELINE, training_step(opt, amp, base), flops=f_base, baseline=True, params=params),
        Case(g, "BLIP step, torch.compile", training_step(opt, amp, torch.compile(base)), flops=f_base, baseline=True,
             params=params, optional="torch.compile (Inductor with Triton) does not work on this torch/device"),
        Case(g, "blipfast", training_step(opt, amp, ours), flops=f_ours, params=params),
        Case(g, "blipfast, torch.compile", training_step(opt, amp, torch.compile(ours, fullgraph=True)), flops=f_ours,
             params=params),
    ]


def images_per_s(results) -> str:
    lines = []
    for r in results:
        if not r.group.startswith("blip_retrieval") or r.ms is None:
            continue
        ips = r.params.get("batch", 0) / (r.ms / 1e3)
        lines.append(f"  {r.group:<28} {r.name:<28} {ips:9.1f} images/s  peak {r.peak_mem_mb or 0:8.0f} MB")
    return "\n".join(lines)
