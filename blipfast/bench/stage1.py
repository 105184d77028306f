"""One BLIP-2 stage-1 training step: blipfast.Blip2Stage1 against LAVIS' step restated in PyTorch
(blipfast/bench/stage1_baseline.py: four Q-Former passes, image K/V per pass, dense masks, SDPA, one host sync per
drawn negative), eager and under torch.compile. Default Q-Former (12 layers, 32 queries), T = 32, image features
[B, 257, 1408] (ViT-g at 224 px), same weights for both.

Counted on every device (``counted``: B = 8, float32, on meta tensors with the GPU's dispatch; see
blipfast/bench/counting.py): FLOPs, bytes saved for backward, operators dispatched, host syncs. Targets of the
stage-1 issue: FLOPs <= 0.75x, saved bytes <= 0.6x, operators <= 0.5x, host syncs 0.

Timed on CUDA (``cases``): a whole training step (forward, backward, AdamW) at B = 128 under bf16 autocast,
images/s, peak memory and MFU against a bf16 matmul timed in the same run.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .common import Case, captions, training_step
from .counting import Cost, count_step, counting_gpu_path, format_cost_table

BASELINE = "LAVIS step (eager, SDPA)"
TARGETS = {"flops": 0.75, "saved_bytes": 0.6, "ops": 0.5}


def _inputs(b: int, t: int, n_img: int, width: int, vocab: int, device, generator=None):
    """Image features, [CLS]-started token ids and a mask with a quarter to half of the text padded."""
    img = torch.randn(b, n_img, width, device=device, generator=generator)
    return (img, *captions(b, t, 1, vocab - 1, t // 2, device, generator))


def counted(batch: int = 8, text_len: int = 32, config=None) -> list[tuple[str, Cost]]:
    """[(name, Cost)] of one training step (forward + backward) of the baseline and of blipfast, counted on meta
    tensors with the dispatch of a CUDA device (float32, dropout on)."""
    from ..models.blip2 import Blip2Stage1, Blip2Stage1Config
    from .stage1_baseline import lavis_stage1_forward

    with torch.device("meta"):
        model = Blip2Stage1(config or Blip2Stage1Config()).train()
        qc = model.config.qformer
        img = torch.randn(batch, 257, qc.encoder_hidden_size)
        ids = torch.randint(1, qc.vocab_size - 1, (batch, text_len))
        mask = torch.ones(batch, text_len, dtype=torch.long)
    params = list(model.parameters())

    def ours():
        model(img, ids, mask).loss.backward()

    def base():
        lavis_stage1_forward(model, img, ids, mask)["loss"].backward()

    with counting_gpu_path():
        return [(BASELINE, count_step(base, exclude=params + [img, ids, mask])),
                ("blipfast Blip2Stage1", count_step(ours, exclude=params + [img, ids, mask]))]


def counted_report(batch: int = 8) -> tuple[str, dict]:
    """The counted table (text) and its JSON, with the ratios and whether each target is met."""
    rows = counted(batch)
    base, ours = rows[0][1], rows[1][1]
    ratio = ours.ratio(base)
    met = {k: ratio[k] <= v for k, v in TARGETS.items()}
    met["host_syncs"] = ours.host_syncs == 0
    table = format_cost_table(rows, BASELINE)
    table += "\n" + "targets: " + ", ".join(
        f"{k} <= {v}x {'met' if met[k] else 'NOT met'}" for k, v in TARGETS.items()) + \
        f", host syncs 0 {'met' if met['host_syncs'] else 'NOT met'}"
    payload = {"batch": batch, "text_len": 32, "image_tokens": 257, "dtype": "float32", "counted_on": "meta, GPU dispatch",
               "rows": {name: c.as_dict() for name, c in rows}, "ratio": ratio, "targets": TARGETS, "met": met}
    return f"stage-1 step, counted (B = {batch}, T = 32, default Q-Former, fp32)\n" + table, payload


def _matmul_case(device, dtype) -> Case:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return Case("stage1 MFU reference", f"{str(dtype).replace('torch.', '')} matmul {n}^3", lambda: a @ b,
                flops=2 * n ** 3, baseline=True, params={"n": n})


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          batch: Optional[int] = None) -> list[Case]:
    """Timed training steps (CUDA only: a stage-1 step of the default model takes minutes on a CPU)."""
    if device.type != "cuda":
        return []
    from ..models.blip2 import Blip2Stage1, Blip2Stage1Config
    from .stage1_baseline import lavis_stage1_forward

    batch = batch or (16 if quick else 128)
    t = 32
    model = Blip2Stage1(Blip2Stage1Config()).to(device).train()
    qc = model.config.qformer
    img, ids, mask = _inputs(batch, t, 257, qc.encoder_hidden_size, qc.vocab_size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    amp = torch.autocast("cuda", dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext()
    flops = {name: c.flops for name, c in counted(batch, t)}  # FLOPs of each step, from the same code on meta

    def step(loss_fn):
        return training_step(opt, amp, loss_fn)

    ours = lambda: model(img, ids, mask).loss  # noqa: E731
    base = lambda: lavis_stage1_forward(model, img, ids, mask)["loss"]  # noqa: E731
    ours_c = torch.compile(lambda: model(img, ids, mask).loss, fullgraph=True)
    base_c = torch.compile(lambda: lavis_stage1_forward(model, img, ids, mask)["loss"])
    params = dict(batch=batch, text_len=t, image_tokens=257, dtype=str(dtype).replace("torch.", ""))
    g = f"stage1 train step B={batch}"
    f_base, f_ours = flops[BASELINE], flops["blipfast Blip2Stage1"]
    return [
        _matmul_case(device, dtype),
        Case(g, BASELINE, step(base), flops=f_base, baseline=True, params=params),
        Case(g, "LAVIS step, torch.compile", step(base_c), flops=f_base, baseline=True, params=params,
             optional="torch.compile (Inductor with Triton) does not work on this torch/device"),
        Case(g, "blipfast", step(ours), flops=f_ours, params=params),
        Case(g, "blipfast, torch.compile", step(ours_c), flops=f_ours, params=params),
    ]


def images_per_s(results) -> str:
    """The timed stage-1 rows as images/s and MFU (model FLOPs / time / the bf16 matmul's TFLOP/s)."""
    ref = next((r for r in results if r.group == "stage1 MFU reference" and r.tflops), None)
    lines = []
    for r in results:
        if not r.group.startswith("stage1 train step") or r.ms is None:
            continue
        ips = r.params.get("batch", 0) / (r.ms / 1e3)
        mfu = f"{100 * r.tflops / ref.tflops:5.1f}%" if (ref and r.tflops) else "n/a"
        lines.append(f"  {r.name:<32} {ips:9.1f} images/s  MFU {mfu}  peak {r.peak_mem_mb or 0:8.0f} MB")
    return "\n".join(lines)
