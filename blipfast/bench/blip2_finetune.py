"""BLIP-2 caption fine-tuning with the ViT-g trained (LAVIS ``caption_coco_ft.yaml``: ``freeze_vit: False``, 364 px,
prompt "a photo of ", batch 16, amp): a ``blipfast.Blip2Stage2`` whose ViT runs blipfast's fused pre-LN blocks
(blipfast/models/blip2_vision.py) against LAVIS' step restated with SDPA (blipfast/bench/blip2_finetune_baseline.py),
same weights. Shapes: EVA ViT-g/14 (39 blocks, width 1408, 677 tokens at 364 px), the default Q-Former (32 queries),
an OPT-2.7b-shaped frozen LLM in bfloat16 (32 layers, width 2560, vocabulary 50272), T = 32 text tokens (LAVIS'
``max_txt_len``: "a photo of " + caption + "\\n", a quarter to all of them real).

Counted on every device (``counted``: on meta tensors with the GPU's dispatch, blipfast/bench/counting.py) under bf16
autocast as a GPU runs it (blipfast/bench/meta_autocast.py: autocast's CUDA cast policy, HF's SDPA calls as CUDA's
kernel): FLOPs, bytes saved for the backward, operators, host syncs of one forward + backward, for each setting:
LAVIS' step without and with ViT checkpointing (the recipe checkpoints every block), blipfast without checkpointing,
every 2nd block and every block. Targets (BLIP-2 downstream issue): blipfast without checkpointing saves <= 0.5x the
baseline's bytes with <= 1.0x its FLOPs, and syncs nothing.

Memory per GPU (``memory_table``), from the counts and the parameters: weights (trained fp32, the frozen LLM bf16),
fp32 gradients, AdamW's two fp32 states, activations = the bytes saved for the backward at the end of the forward
(counted) plus, with checkpointing, one block's recomputed activations during its backward (counted on one block);
the sum is the peak's upper bound, transients (the logits' loss, GEMM workspaces, the allocator's slack) aside. On
one GPU, and with FSDP2 over 4 GPUs at the same per-GPU batch: weights, gradients and AdamW states sharded, plus the
root unit's gathered parameters and two gathered blocks (prefetch) with one block's gradient before its
reduce-scatter.

Timed on CUDA (``cases``): the whole step (forward, backward, AdamW) at B = 16 under bf16 autocast, images/s and
peak memory, blipfast against LAVIS' step eager and compiled.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .common import Case, training_step
from .counting import Cost, count_step, counting_gpu_path, format_cost_table
from .meta_autocast import meta_autocast

BASELINE = "LAVIS step (SDPA)"
BASELINE_CKPT = "LAVIS step, ViT checkpointed"
OURS = "blipfast"
OURS_CKPT = "blipfast, ViT checkpointed"
# name -> (baseline?, ViT checkpointing); the rows of the table, in order
SETTINGS = {BASELINE: (True, False), BASELINE_CKPT: (True, True), OURS: (False, None),
            "blipfast, every 2nd block ckpt": (False, 2), OURS_CKPT: (False, "all")}
TARGETS = {"saved_bytes": 0.5, "flops": 1.0}
BUDGETS = {"one_gpu": 40e9, "fsdp2": 24e9}  # bytes per GPU: LAVIS' A100-40GB; a 24 GB card under FSDP2 x 4
GiB = 2 ** 30
OPT_2_7B = dict(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True, dropout=0.1,
                activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2)
PROMPT_TOKENS = 4  # "</s>a photo of" in OPT's tokenizer


def blip2_config(*, image_size: int = 364, vision=None, qformer=None, text=None, num_query_tokens: int = 32):
    """The ``Blip2Config`` of the benchmark (keyword dicts override the ViT-g / Q-Former / OPT-2.7b shapes)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    return Blip2Config(vision_config=Blip2VisionConfig(image_size=image_size, **(vision or {})).to_dict(),
                       qformer_config=Blip2QFormerConfig(**(qformer or {})).to_dict(),
                       text_config=OPTConfig(**{**OPT_2_7B, **(text or {})}).to_dict(),
                       num_query_tokens=num_query_tokens)


def build_model(config=None, *, device="meta", llm_dtype=torch.bfloat16):
    """A ``Blip2Stage2`` over a random ``Blip2ForConditionalGeneration`` (LLM frozen in ``llm_dtype``, SDPA) whose ViT
    runs blipfast's fused blocks and is trained (with ``ln_vision``, the Q-Former, the queries and the projection)."""
    from transformers import Blip2ForConditionalGeneration

    from ..models.blip2_stage2 import Blip2Stage2
    from ..models.blip2_vision import fuse_blip2_vision_model

    config = config or blip2_config()
    config.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = Blip2ForConditionalGeneration(config)
    hf.language_model.to(llm_dtype)
    stage2 = Blip2Stage2(hf).train()
    fuse_blip2_vision_model(hf.vision_model)
    for p in hf.vision_model.parameters():  # freeze_vit: False
        p.requires_grad_(True)
    return stage2


def text_batch(b: int, t: int, vocab: int, device, generator=None) -> dict:
    """Prompt + caption ids [b, t] (right-padded, a quarter to all of t real), labels -100 on prompt and padding."""
    ids = torch.randint(3, vocab, (b, t), device=device, generator=generator)
    ids[:, 0] = 2  # OPT's BOS
    lengths = torch.randint(max(t // 4, PROMPT_TOKENS + 1), t + 1, (b,), device=device, generator=generator)
    mask = (torch.arange(t, device=device)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :PROMPT_TOKENS] = -100
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask, "labels": labels}


def _loss_fns(stage2, batch: dict) -> dict:
    """{setting name: (loss function, blipfast's ViT checkpointing for it)}; :func:`_select` switches it."""
    from .blip2_finetune_baseline import lavis_caption_loss

    def ours():
        return stage2.loss(batch)

    def base(ckpt):
        return lambda: lavis_caption_loss(stage2, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                          batch["labels"], checkpoint=ckpt)

    return {name: ((base(ckpt), None) if is_base else (ours, ckpt)) for name, (is_base, ckpt) in SETTINGS.items()}


def _select(stage2, ckpt) -> None:
    from ..models.blip2_vision import set_vision_checkpointing

    set_vision_checkpointing(stage2.model.vision_model, ckpt)


def counted(batch: int = 16, text_len: int = 32, config=None, dtype: Optional[torch.dtype] = torch.bfloat16):
    """[(name, Cost)] of one training step (forward + backward) of each setting, counted on meta tensors with a CUDA
    device's dispatch, under ``dtype`` autocast (None: float32)."""
    stage2 = build_model(config)
    cfg = stage2.model.config
    size = cfg.vision_config.image_size
    with torch.device("meta"):
        data = {"pixel_values": torch.randn(batch, 3, size, size),
                **text_batch(batch, text_len, cfg.text_config.vocab_size, "meta")}
    keep = list(stage2.parameters()) + list(stage2.buffers()) + list(data.values())
    rows = []
    with counting_gpu_path():
        for name, (loss_fn, ckpt) in _loss_fns(stage2, data).items():
            def step(loss_fn=loss_fn):
                with meta_autocast(dtype):
                    loss_fn().backward()
            _select(stage2, ckpt)
            rows.append((name, count_step(step, exclude=keep)))
    return rows, stage2


def _block_activations(stage2, batch: int, dtype) -> int:
    """Bytes one fused ViT block saves for its backward (what a checkpointed block holds while it recomputes)."""
    vm = stage2.model.vision_model
    layer = vm.encoder.layers[0]
    with torch.device("meta"):
        x = torch.randn(batch, vm.embeddings.num_positions, vm.config.hidden_size, requires_grad=True)
    flag, layer.blipfast_checkpoint = layer.blipfast_checkpoint, False

    def step():
        with meta_autocast(dtype):
            layer(x).float().sum().backward()

    try:
        with counting_gpu_path():
            return count_step(step, exclude=list(layer.parameters()) + [x]).saved_bytes
    finally:
        layer.blipfast_checkpoint = flag


def _units(stage2) -> tuple[int, int]:
    """(bytes of the largest FSDP unit's parameters, bytes of the root unit's), as ``blipfast train --fsdp`` shards
    (:func:`blipfast.train.fsdp.fsdp_units`): units are the ViT blocks and the LLM's decoder layers; the root holds
    the rest, the Q-Former whole (its ``image_kv`` reads every cross layer's weights in one GEMM), embeddings, heads,
    norms and queries."""
    m = stage2.model
    blocks = [*m.vision_model.encoder.layers, *m.language_model.model.decoder.layers]
    in_units = {id(p) for blk in blocks for p in blk.parameters()}
    size = [sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in blocks]
    root = sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in in_units)
    return max(size), root


def memory_table(rows, stage2, batch: int, dtype=torch.bfloat16, shards: int = 4) -> tuple[str, dict]:
    """Counted peak memory per GPU of each setting, on one GPU and with FSDP2 over ``shards`` GPUs (module doc), and
    the largest per-GPU batch within :data:`BUDGETS` (activations linear in the batch, the rest fixed)."""
    params = list(stage2.model.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads, adam = 4 * trained, 8 * trained
    block = _block_activations(stage2, batch, dtype)
    unit, root = _units(stage2)
    static = weights + grads + adam
    fsdp_static = static / shards + root + 3 * unit
    head = (f"{'setting':<34} {'weights':>8} {'grads':>7} {'AdamW':>7} {'activ.':>7} {'1 GPU':>7}   "
            f"{'FSDP2 x' + str(shards) + ' /GPU':>14}   (GiB)   {'max B 1 GPU':>11} {'max B FSDP2':>11}")
    lines, payload = [head, "-" * len(head)], {}
    for name, cost in rows:
        act = cost.saved_bytes + (block if SETTINGS[name][1] else 0)
        one, fsdp = static + act, fsdp_static + act
        largest = {"one_gpu": max(0, int((BUDGETS["one_gpu"] - static) * batch // act)),
                   f"fsdp2_{shards}": max(0, int((BUDGETS["fsdp2"] - fsdp_static) * batch // act))}
        payload[name] = {"weights": weights, "grads": grads, "adamw": adam, "activations": act, "one_gpu": one,
                         f"fsdp2_{shards}": fsdp, "largest_batch": largest}
        lines.append(f"{name[:34]:<34} {weights / GiB:>8.1f} {grads / GiB:>7.1f} {adam / GiB:>7.1f} {act / GiB:>7.1f} "
                     f"{one / GiB:>7.1f}   {fsdp / GiB:>14.1f}         {largest['one_gpu']:>11} "
                     f"{largest[f'fsdp2_{shards}']:>11}")
    frozen = (weights - 4 * trained) / GiB
    lines.append(f"trained parameters {trained / 1e9:.3f} B (fp32), frozen LLM {frozen:.1f} GiB; "
                 f"FSDP2: + root unit {root / GiB:.2f} GiB + 3 x largest unit {unit / GiB:.2f} GiB")
    lines.append(f"max B: the largest per-GPU batch within {BUDGETS['one_gpu'] / 1e9:.0f} GB on one GPU / "
                 f"{BUDGETS['fsdp2'] / 1e9:.0f} GB per GPU with FSDP2 x {shards} (activations scale with the batch)")
    return "\n".join(lines), payload


def counted_report(batch: int = 16, text_len: int = 32, config=None) -> tuple[str, dict]:
    """The counted table, the memory table and their JSON, with the ratios and whether each target is met."""
    rows, stage2 = counted(batch, text_len, config)
    costs = dict(rows)
    base, ours = costs[BASELINE], costs[OURS]
    ratio = ours.ratio(base)
    met = {k: ratio[k] <= v for k, v in TARGETS.items()}
    met["host_syncs"] = ours.host_syncs == 0
    mem, mem_payload = memory_table(rows, stage2, batch)
    fits = {"one_gpu_40GB": mem_payload[OURS_CKPT]["one_gpu"] <= BUDGETS["one_gpu"],
            "fsdp2_4_24GB": mem_payload[OURS_CKPT]["fsdp2_4"] <= BUDGETS["fsdp2"]}
    cfg = stage2.model.config
    size = cfg.vision_config.image_size
    head = (f"BLIP-2 caption fine-tuning step, ViT trained, counted (B = {batch}, {size} px, T = {text_len}, "
            f"{cfg.vision_config.num_hidden_layers}-block ViT, OPT {cfg.text_config.num_hidden_layers} layers, "
            f"bf16 autocast)")
    table = format_cost_table(rows, BASELINE)
    table += "\ntargets (blipfast vs LAVIS step, no checkpointing): " + ", ".join(
        f"{k} <= {v}x {'met' if met[k] else 'NOT met'} ({ratio[k]:.3f}x)" for k, v in TARGETS.items()) + \
        f", host syncs 0 {'met' if met['host_syncs'] else 'NOT met'}"
    table += "\n\npeak memory per GPU, counted\n" + mem + "\n" + \
        f"blipfast with checkpointing: fits 40 GB on one GPU: {fits['one_gpu_40GB']}; " \
        f"fits 24 GB per GPU with FSDP2 x 4: {fits['fsdp2_4_24GB']}"
    payload = {"batch": batch, "text_len": text_len, "image_size": size, "dtype": "bf16 autocast",
               "counted_on": "meta, GPU dispatch", "rows": {n: c.as_dict() for n, c in rows}, "ratio": ratio,
               "targets": TARGETS, "met": met, "memory": mem_payload, "fits": fits}
    return head + "\n" + table, payload


# ----------------------------------------------------------------------------------------------
# timed (CUDA)


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
          batch: Optional[int] = None) -> list[Case]:
    """Timed training steps (CUDA only: one step of the 3.8B-parameter model takes minutes on a CPU)."""
    if device.type != "cuda":
        return []
    config = blip2_config(text={"num_hidden_layers": 4}) if quick else None
    return step_cases(device, dtype, batch or (4 if quick else 16), config)


def step_cases(device, dtype, batch: int, config=None, *, compile: bool = True, stage2=None) -> list[Case]:
    """The timed steps (forward, backward, AdamW) of the settings LAVIS runs (checkpointed, and not) and of blipfast
    (not checkpointed, every block), one model (``stage2``, default :func:`build_model` of ``config``) and optimizer
    for all; with ``compile`` also LAVIS' checkpointed step and blipfast's under ``torch.compile``."""
    stage2 = stage2 if stage2 is not None else build_model(config, device=device)
    cfg = stage2.model.config
    size = cfg.vision_config.image_size
    data = {"pixel_values": torch.randn(batch, 3, size, size, device=device),
            **text_batch(batch, 32, cfg.text_config.vocab_size, device)}
    opt = torch.optim.AdamW([p for _, p in stage2.trainable_parameters()], lr=1e-5, weight_decay=0.05,
                            fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16) \
        else contextlib.nullcontext()
    fns = _loss_fns(stage2, data)
    params = dict(batch=batch, image_size=size, text_len=32, dtype=str(dtype).replace("torch.", ""))
    g = f"blip2_finetune step B={batch}"

    def case(name, compiled=False, **kw):
        loss_fn, ckpt = fns[name]
        run = training_step(opt, amp, torch.compile(loss_fn) if compiled else loss_fn)

        def fn():
            _select(stage2, ckpt)
            run()
        return Case(g, name + (", torch.compile" if compiled else ""), fn, baseline=SETTINGS[name][0], params=params,
                    **kw)

    out = [case(name) for name in (BASELINE_CKPT, BASELINE, OURS, OURS_CKPT)]
    if compile:
        out += [case(BASELINE_CKPT, True, optional="torch.compile (Inductor with Triton) does not work on this "
                                                   "torch/device"), case(OURS_CKPT, True)]
    return out


def images_per_s(results) -> str:
    lines = []
    for r in results:
        if r.group.startswith("blip2_finetune step") and r.ms is not None:
            ips = r.params.get("batch", 0) / (r.ms / 1e3)
            lines.append(f"  {r.name:<44} {ips:8.1f} images/s  peak {r.peak_mem_mb or 0:8.0f} MB")
    return "\n".join(lines)
