"""blipfast.models.blip2_vision: HF's Blip2VisionModel (EVA ViT-g) with the fused pre-LN blocks keeps its outputs, every
parameter gradient and its state dict, with and without gradient checkpointing, with ``interpolate_pos_encoding``
and under bf16 autocast; the position-embedding interpolation equals HF's and LAVIS'.

The fused fp32 model is held to a float64 copy of the HF model, the unfused fp32 HF model's error as the yardstick
(tests/conftest.py: assert_within_torch_error); under autocast, HF's own autocast run is the yardstick.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2VisionConfig, Blip2VisionModel

from blipfast import convert
from blipfast.models._prenorm_linear import layernorm_gelu_mlp, layernorm_linear
from blipfast.models.blip2_vision import (FusedBlip2EncoderLayer, checkpointed_blocks, fuse_blip2_vision_model,
                                          interpolate_pos_embed_state_dict, interpolate_position_embedding,
                                          resize_position_embedding, set_vision_checkpointing,
                                          unfuse_blip2_vision_model)
from tests.helpers.tolerance import assert_grads_within_torch_error, assert_within_torch_error
from tests.helpers.qformer import _randomize, _seed_of

pytestmark = pytest.mark.hf

# awkward sizes: 3 heads of 12, an MLP width that is no multiple of anything, 4 x 4 patches of 7 px + CLS = 17 tokens
CONFIG = dict(hidden_size=36, intermediate_size=53, num_hidden_layers=3, num_attention_heads=3, image_size=28,
              patch_size=7, layer_norm_eps=1e-6, hidden_act="gelu")


def _hf(attn: str = "eager", **cfg) -> Blip2VisionModel:
    torch.manual_seed(_seed_of("vit", attn))
    model = Blip2VisionModel._from_config(Blip2VisionConfig(**{**CONFIG, **cfg}), attn_implementation=attn).eval()
    _randomize(model, torch.Generator().manual_seed(_seed_of("vit", "w")), all_weights=True)
    with torch.no_grad():  # the key third of the fused qkv bias is trained in HF 5.x: make it nonzero too
        for layer in model.encoder.layers:
            layer.self_attn.qkv.bias.normal_(0.0, 0.02)
    return model


def _run(model, px, weight, *, interpolate=False, autocast=False):
    """(outputs, {name: grad}) of sum(weight * last_hidden_state) + sum(pooler_output)."""
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(pixel_values=px, interpolate_pos_encoding=interpolate)
    loss = (out.last_hidden_state.float() * weight).sum() + out.pooler_output.float().sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"last_hidden_state": out.last_hidden_state.detach(), "pooler_output": out.pooler_output.detach()}, grads


def _check(model_lowp, px, *, checkpoint=None, interpolate=False, autocast=False):
    ref64 = copy.deepcopy(model_lowp).double()
    n_tok = (px.shape[-2] // 7) * (px.shape[-1] // 7) + 1
    gen = torch.Generator().manual_seed(_seed_of("w"))
    weight = torch.randn(px.shape[0], n_tok, CONFIG["hidden_size"], generator=gen)
    out64, g64 = _run(ref64, px.double(), weight.double(), interpolate=interpolate)
    out_t, g_t = _run(model_lowp, px, weight, interpolate=interpolate, autocast=autocast)
    keys = list(model_lowp.state_dict())
    params = dict(model_lowp.named_parameters())
    fuse_blip2_vision_model(model_lowp, checkpoint=checkpoint)
    assert list(model_lowp.state_dict()) == keys
    assert all(p is params[n] for n, p in model_lowp.named_parameters())
    assert all(type(m) is FusedBlip2EncoderLayer for m in model_lowp.encoder.layers)
    out_f, g_f = _run(model_lowp, px, weight, interpolate=interpolate, autocast=autocast)
    for name in out64:
        assert_within_torch_error(out_f[name].float(), out64[name], out_t[name].float(), dtype=out_t[name].dtype,
                                  name=name)
    assert_grads_within_torch_error(g_f, g64, g_t)
    unfuse_blip2_vision_model(model_lowp)
    assert all(type(m).__name__ == "Blip2EncoderLayer" for m in model_lowp.encoder.layers)


def _pixels(b, size, tag):
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(_seed_of("px", tag)))


@pytest.mark.parametrize("checkpoint", [None, "all", 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_outputs_and_gradients_equal_hf(attn, checkpoint):
    _check(_hf(attn), _pixels(3, (28, 28), attn), checkpoint=checkpoint)


@pytest.mark.parametrize("checkpoint", [None, [2]])
def test_interpolated_position_encoding(checkpoint):
    """A 35 x 42 px image (5 x 6 patches) on the 28-px model: HF interpolates its 4 x 4 table in every forward, and
    the gradient flows through the bicubic interpolation to it."""
    _check(_hf(), _pixels(2, (35, 42), "interp"), checkpoint=checkpoint, interpolate=True)


def test_bf16_autocast_within_torch_error():
    """Under CPU bf16 autocast: the fused path (xhat kept in bf16, LayerNorm outputs rebuilt) is held to the float64
    model with HF's own autocast error as the yardstick."""
    _check(_hf(), _pixels(2, (28, 28), "amp"), checkpoint=None, autocast=True)


def test_checkpointing_recomputes_and_marks_the_blocks():
    model = fuse_blip2_vision_model(_hf(num_hidden_layers=5), checkpoint=2)
    assert [layer.blipfast_checkpoint for layer in model.encoder.layers] == [True, False, True, False, True]
    set_vision_checkpointing(model, range(3, 5))  # BLIP's vit_ckpt_layer = 2: the last two blocks
    assert [layer.blipfast_checkpoint for layer in model.encoder.layers] == [False, False, False, True, True]
    px = _pixels(1, (28, 28), "ckpt")
    calls = {"n": 0}
    import blipfast.models.blip2_vision as bv

    orig = bv.prenorm_vit_block

    def counting(*a):
        calls["n"] += 1
        return orig(*a)

    bv.prenorm_vit_block = counting
    try:
        model(pixel_values=px).last_hidden_state.sum().backward()
    finally:
        bv.prenorm_vit_block = orig
    assert calls["n"] == 5 + 2  # every block once, the two checkpointed ones again in the backward


def test_checkpoint_spec():
    assert checkpointed_blocks(4, None) == checkpointed_blocks(4, False) == checkpointed_blocks(4, 0) == frozenset()
    assert checkpointed_blocks(4, True) == checkpointed_blocks(4, "all") == checkpointed_blocks(4, 1) == {0, 1, 2, 3}
    assert checkpointed_blocks(7, 3) == {0, 3, 6}
    for bad in (-1, "some", [4], [1.5]):
        with pytest.raises(ValueError, match="checkpoint"):
            checkpointed_blocks(4, bad)
    with pytest.raises(ValueError, match="no Blip2EncoderLayer"):
        fuse_blip2_vision_model(torch.nn.Linear(2, 2))


def test_prenorm_linear_functions_match_autograd_in_float64():
    """The two autograd Functions against plain autograd in float64 (to rounding), awkward row counts."""
    g = torch.Generator().manual_seed(_seed_of("prenorm"))
    x = torch.randn(2, 7, 13, dtype=torch.float64, generator=g, requires_grad=True)
    lw, lb = (torch.randn(13, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w1 = torch.randn(11, 13, dtype=torch.float64, generator=g, requires_grad=True)
    b1 = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(5, 11, dtype=torch.float64, generator=g, requires_grad=True)
    leaves = (x, lw, lb, w1, b1, w2)
    for approx in ("none", "tanh"):
        ln = F.layer_norm(x, (13,), lw, lb, 1e-6)
        for fast, ref in ((layernorm_linear(x, lw, lb, 1e-6, w1, b1), F.linear(ln, w1, b1)),
                          (layernorm_gelu_mlp(x, lw, lb, 1e-6, w1, b1, w2, approximate=approx),
                           F.linear(F.gelu(F.linear(ln, w1, b1), approximate=approx), w2))):
            gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
            used = leaves if fast.shape[-1] == 5 else leaves[:5]
            got = torch.autograd.grad(fast, used, gy)
            want = torch.autograd.grad(ref, used, gy, retain_graph=True)
            torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="layernorm_linear"):
        layernorm_linear(x, lw[:3], lb, 1e-6, w1, b1)
    with pytest.raises(ValueError, match="approximate"):
        layernorm_gelu_mlp(x, lw, lb, 1e-6, w1, b1, w2, approximate="erf")


# ----------------------------------------------------------------------------------------------
# position embeddings


def _lavis_interpolate_pos_embed(pos_embed_checkpoint: torch.Tensor, num_patches: int, num_extra_tokens: int = 1):
    """LAVIS' ``lavis/models/eva_vit.py: interpolate_pos_embed`` restated on tensors (its code, without the model)."""
    pos_embed_checkpoint = pos_embed_checkpoint.float()
    embedding_size = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return pos_embed_checkpoint
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic",
                                                 align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def test_position_interpolation_224_to_364_equals_hf_and_lavis():
    """ViT-g's 16 x 16 table (224 px) to 26 x 26 (364 px): LAVIS' load-time interpolation, HF's
    interpolate_pos_encoding and blipfast's are the same tensor, bit for bit."""
    cfg = Blip2VisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=224, patch_size=14)
    with torch.device("meta"):
        shell = Blip2VisionModel(cfg)
    emb = shell.embeddings.to_empty(device="cpu")
    with torch.no_grad():
        emb.position_embedding.normal_(generator=torch.Generator().manual_seed(_seed_of("pos")))
    pos = emb.position_embedding.detach()
    hf = emb.interpolate_pos_encoding(torch.empty(1, 26 * 26 + 1, 48), 364, 364).detach()
    lavis = _lavis_interpolate_pos_embed(pos, 26 * 26)
    ours = interpolate_position_embedding(pos, 26)
    assert ours.shape == (1, 677, 48)
    assert torch.equal(ours, hf) and torch.equal(ours, lavis)
    assert torch.equal(ours[:, 0], pos[:, 0])  # the CLS position is kept
    assert torch.equal(interpolate_position_embedding(pos, 16), pos)

    sd = interpolate_pos_embed_state_dict({"vision_model.embeddings.position_embedding": pos,
                                           "visual_encoder.pos_embed": pos.half(), "other": pos}, 364, 14)
    assert torch.equal(sd["vision_model.embeddings.position_embedding"], ours)
    assert sd["visual_encoder.pos_embed"].dtype == torch.float16 and sd["other"] is pos
    for bad in ((pos[:, 1:], 26), (pos, 0), (pos[0], 26)):
        with pytest.raises(ValueError):
            interpolate_position_embedding(*bad)


def test_resized_model_equals_interpolating_model():
    """resize_position_embedding (LAVIS' 364-px ViT) gives the outputs HF gets with interpolate_pos_encoding."""
    model = _hf()
    px = _pixels(2, (42, 42), "resize")
    with torch.no_grad():
        want = model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
    fuse_blip2_vision_model(model)
    resize_position_embedding(model, 42)
    assert model.embeddings.position_embedding.shape == (1, 37, 36) and model.config.image_size == 42
    with torch.no_grad():
        got = model(pixel_values=px).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        resize_position_embedding(model, 3)


def test_lavis_vit_names_load_through_convert():
    """LAVIS' EVA ViT keys (q_bias / v_bias, no key bias) map onto the fused model's HF keys."""
    hf = _hf()
    fuse_blip2_vision_model(hf)
    sd = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    lavis = convert.hf_to_lavis(sd).state_dict
    assert "visual_encoder.blocks.0.attn.q_bias" in lavis and "visual_encoder.pos_embed" in lavis
    back = convert.lavis_to_hf(lavis).state_dict
    target = copy.deepcopy(hf)
    target.load_state_dict({k[len("vision_model."):]: v for k, v in back.items()}, strict=True)
    bias = target.encoder.layers[1].self_attn.qkv.bias.detach()
    d = CONFIG["hidden_size"]
    assert torch.equal(bias[:d], hf.encoder.layers[1].self_attn.qkv.bias.detach()[:d])
    assert torch.equal(bias[d:2 * d], torch.zeros(d))  # LAVIS has no key bias


def test_instructblip_vit_is_fused_too():
    """InstructBLIP's ViT layers are BLIP-2's: the same fused block, the same outputs and gradients."""
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    torch.manual_seed(_seed_of("iblip"))
    model = InstructBlipVisionModel._from_config(InstructBlipVisionConfig(**CONFIG), attn_implementation="eager")
    _randomize(model, torch.Generator().manual_seed(_seed_of("iblip", "w")), all_weights=True)
    px = _pixels(2, (28, 28), "iblip")
    want = model(pixel_values=px).last_hidden_state
    g_want = torch.autograd.grad(want.sum(), model.encoder.layers[0].mlp.fc1.weight)[0]
    fuse_blip2_vision_model(model, checkpoint="all")
    assert all(type(m).__name__ == "FusedInstructBlipEncoderLayer" for m in model.encoder.layers)
    got = model(pixel_values=px).last_hidden_state
    g_got = torch.autograd.grad(got.sum(), model.encoder.layers[0].mlp.fc1.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5 * g_want.abs().max().item())
    unfuse_blip2_vision_model(model)
    assert all(type(m).__name__ == "InstructBlipEncoderLayer" for m in model.encoder.layers)
