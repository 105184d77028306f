"""The counted BLIP-2 caption fine-tuning step (blipfast/bench/blip2_finetune.py) on a tiny configuration, on meta
tensors with the GPU's dispatch under emulated bf16 autocast: blipfast's ViT path saves fewer bytes for the backward
with the same FLOPs, checkpointing saves less again, and the ViT + Q-Former path syncs nothing. The autocast emulation
(blipfast/bench/meta_autocast.py) is held to PyTorch's real CPU autocast: the same bytes saved for the backward. The
real shapes (ViT-g, OPT-2.7b) take minutes to count on meta tensors: `blipfast bench --only blip2_finetune`."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Blip2VisionConfig, Blip2VisionModel

from blipfast.bench import blip2_finetune as bf
from blipfast.bench.counting import count_step, counting_gpu_path
from blipfast.bench.meta_autocast import meta_autocast
from blipfast.models.blip2_vision import fuse_blip2_vision_model
from blipfast.ops import _common, concat_linear


def tiny_config():
    return bf.blip2_config(
        image_size=56, num_query_tokens=4,
        vision=dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4, patch_size=14),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     encoder_hidden_size=64, vocab_size=100),
        text=dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                  word_embed_proj_dim=32, max_position_embeddings=64))


def test_counted_step_on_a_tiny_config():
    table, payload = bf.counted_report(batch=3, text_len=9, config=tiny_config())
    rows, r = payload["rows"], payload["ratio"]
    assert r["flops"] <= 1.0 and r["saved_bytes"] < 0.7, r
    base, ours = rows[bf.BASELINE], rows[bf.OURS]
    assert ours["host_syncs"] <= base["host_syncs"]  # what remains is transformers' OPT mask check, in both
    saved = [rows[n]["saved_bytes"] for n in (bf.OURS, "blipfast, every 2nd block ckpt", bf.OURS_CKPT)]
    assert saved[0] > saved[1] > saved[2]
    assert rows[bf.BASELINE_CKPT]["saved_bytes"] < base["saved_bytes"]
    # checkpointing recomputes what LAVIS' blocks recompute (the last GEMM of a block is skipped in both)
    assert rows[bf.OURS_CKPT]["flops"] == rows[bf.BASELINE_CKPT]["flops"] > ours["flops"] == base["flops"]
    mem = payload["memory"][bf.OURS]
    assert mem["one_gpu"] == mem["weights"] + mem["grads"] + mem["adamw"] + mem["activations"]
    assert mem["grads"] * 2 == mem["adamw"] and mem["fsdp2_4"] < mem["one_gpu"]
    assert "blipfast, ViT checkpointed" in table and "peak memory per GPU" in table
    for name, m in payload["memory"].items():  # the largest batch fits its budget and one more does not
        per_image = m["activations"] / 3
        for key, static, budget in (("one_gpu", m["one_gpu"] - m["activations"], bf.BUDGETS["one_gpu"]),
                                    ("fsdp2_4", m["fsdp2_4"] - m["activations"], bf.BUDGETS["fsdp2"])):
            b = m["largest_batch"][key]
            assert static + b * per_image <= budget < static + (b + 1) * per_image, (name, key, b)
    if not torch.cuda.is_available():
        assert bf.cases(torch.device("cpu")) == []


@pytest.mark.parametrize("checkpoint", [False, True])
def test_restated_lavis_step_equals_blipfasts_step_in_float64(checkpoint):
    """The baseline is the same function: LAVIS' restated caption loss and blipfast's Blip2Stage2 loss with the fused
    ViT give the same loss and the same gradients of every trained parameter, to float64 rounding (dropout off)."""
    from blipfast.bench.blip2_finetune_baseline import lavis_caption_loss
    from blipfast.models.blip2_vision import set_vision_checkpointing

    torch.manual_seed(0)
    stage2 = bf.build_model(tiny_config(), device="cpu", llm_dtype=torch.float64)
    stage2.model.double()
    stage2.eval()
    with torch.no_grad():
        for p in stage2.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 0.3)
    set_vision_checkpointing(stage2.model.vision_model, "all" if checkpoint else None)
    data = {"pixel_values": torch.randn(3, 3, 56, 56, dtype=torch.float64), **bf.text_batch(3, 9, 120, "cpu")}
    params = [p for _, p in stage2.trainable_parameters()]

    def run(fn):
        loss = fn()
        return loss.detach(), torch.autograd.grad(loss, params)

    got, g_got = run(lambda: stage2.loss(data))
    want, g_want = run(lambda: lavis_caption_loss(stage2, data["pixel_values"], data["input_ids"],
                                                  data["attention_mask"], data["labels"], checkpoint=checkpoint))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    names = [n for n, _ in stage2.trainable_parameters()]
    assert any(n.startswith("vision_model.encoder") for n in names)
    for n, a, b in zip(names, g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * max(1.0, b.abs().max().item()), msg=n)


def test_timed_steps_train_on_a_cpu():
    """The steps the GPU benchmark times (without torch.compile) run and train the ViT, on a tiny model on a CPU."""
    stage2 = bf.build_model(tiny_config(), device="cpu")
    vit = stage2.model.vision_model.encoder.layers[0].mlp.fc1.weight
    cases = bf.step_cases(torch.device("cpu"), torch.bfloat16, 2, compile=False, stage2=stage2)
    assert [c.name for c in cases] == [bf.BASELINE_CKPT, bf.BASELINE, bf.OURS, bf.OURS_CKPT]
    for case in cases:
        before = vit.detach().clone()
        case.fn()
        assert vit.grad is not None and not torch.equal(vit.detach(), before), case.name


def test_vit_and_qformer_path_syncs_nothing():
    stage2 = bf.build_model(tiny_config())
    with torch.device("meta"):
        px = torch.randn(2, 3, 56, 56)

    def step():
        with meta_autocast(torch.bfloat16):
            stage2.language_inputs(pixel_values=px).float().sum().backward()

    with counting_gpu_path():
        cost = count_step(step, exclude=list(stage2.parameters()) + [px])
    assert cost.host_syncs == 0 and cost.saved_bytes > 0


@pytest.mark.parametrize("fused,checkpoint", [(False, None), (True, None), (True, "all")])
def test_meta_autocast_saves_what_cpu_autocast_saves(fused, checkpoint):
    """The emulation with autocast's CPU policy on meta tensors against torch.autocast("cpu") on CPU tensors: the same
    bytes saved for the backward (bf16 GEMM inputs and weight copies, fp32 LayerNorm inputs), except that SDPA's
    log-sum-exp is padded to 32 keys (and seeded) by CUDA's memory-efficient kernel that meta tensors count."""
    cfg = Blip2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=7)
    cpu = Blip2VisionModel._from_config(cfg, attn_implementation="eager")
    if fused:
        fuse_blip2_vision_model(cpu, checkpoint=checkpoint)
    meta = copy.deepcopy(cpu).to("meta")
    px = torch.randn(2, 3, 28, 28)
    pxm = px.to("meta")

    def on_cpu():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = cpu(pixel_values=px).last_hidden_state
        out.float().sum().backward()

    def on_meta():
        with meta_autocast(torch.bfloat16, policy="cpu"):
            meta(pixel_values=pxm).last_hidden_state.float().sum().backward()

    got = count_step(on_meta, exclude=list(meta.parameters()) + [pxm]).saved_bytes
    want = count_step(on_cpu, exclude=list(cpu.parameters()) + [px]).saved_bytes
    sdpa_calls = 2 if fused and checkpoint is None else 0
    lse_pad = sdpa_calls * (2 * 4 * (32 - 17) * 4 + 16)  # [B, H, 32] instead of [B, H, 17] fp32, + a Philox seed
    assert got == want + lse_pad


def test_meta_autocast_casts_like_cuda_autocast():
    with torch.device("meta"):
        x, w = torch.randn(4, 8), torch.randn(8, 8)
        with meta_autocast(torch.bfloat16):
            assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
            assert (x @ w).dtype == torch.bfloat16
            assert torch.nn.functional.layer_norm(x.bfloat16(), (8,)).dtype == torch.float32  # CUDA's fp32 list
            assert x.bfloat16().softmax(-1).dtype == torch.float32
            assert torch.nn.functional.gelu(x.bfloat16()).dtype == torch.bfloat16
            assert (x.double() @ w.double()).dtype == torch.float64
        with meta_autocast(None):
            assert torch.nn.functional.linear(x, w).dtype == torch.float32
    with pytest.raises(ValueError, match="policy"):
        meta_autocast(policy="xpu")
    with pytest.raises(ValueError, match="dtype"):
        meta_autocast(torch.float32)


def test_meta_autocast_restores_the_dispatch_rules():
    """meta_autocast installs the linear ops' autocast rule while it is on (also re-entered around the backward) and
    leaves the dispatch as it found it."""
    before = _common._autocast_dtype
    x = torch.randn(3, 4, device="meta", requires_grad=True)
    w = torch.randn(5, 4, device="meta", requires_grad=True)
    with meta_autocast(torch.bfloat16):
        assert _common._autocast_dtype(torch.device("meta")) == torch.bfloat16
        y = concat_linear(x, (w,))
        assert y.dtype == torch.bfloat16
        y.sum().backward()
    assert _common._autocast_dtype is before and _common._autocast_dtype(torch.device("meta")) is None
