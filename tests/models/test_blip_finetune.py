"""The pieces BLIP's task models share (blipfast/models/blip_finetune.py): the ViT's stochastic depth against timm
0.4.12's ``drop_path`` in BLIP's ``Block`` (same draws, same output and gradients), its per-block rates, the task
configuration's checks, and the frames of a video concatenated into one image input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blipfast.models.blip_finetune import DropPathBlipEncoderLayer, task_vit, video_tokens
from blipfast.models.blip_vqa import BlipVQAConfig
from tests.helpers.blip_tasks import vqa_config
from tests.helpers.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


def _timm_block(layer, x, p, training):
    """BLIP's vit.py ``Block.forward`` with timm 0.4.12's drop_path over an HF BlipEncoderLayer's parameters."""
    def drop_path(y):
        if p == 0.0 or not training:
            return y
        keep = 1 - p
        r = keep + torch.rand((y.shape[0],) + (1,) * (y.ndim - 1), dtype=y.dtype, device=y.device)
        r.floor_()
        return y.div(keep) * r

    def ln(y, m):
        return F.layer_norm(y, y.shape[-1:], m.weight, m.bias, m.eps)

    a = layer.self_attn
    b, n, d = x.shape
    h = a.num_heads
    qkv = F.linear(ln(x, layer.layer_norm1), a.qkv.weight, a.qkv.bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d)
    x = x + drop_path(F.linear(ctx, a.projection.weight, a.projection.bias))
    mlp = layer.mlp
    y = F.linear(F.gelu(F.linear(ln(x, layer.layer_norm2), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    return x + drop_path(y)


def test_stochastic_depth_rates_and_draws_are_blips():
    cfg = vqa_config(vision={"num_hidden_layers": 3}, drop_path_rate=0.5)
    vit = task_vit(cfg.vision, cfg.drop_path_rate).double().train()
    layers = vit.encoder.layers
    assert type(layers[0]).__name__ == "BlipEncoderLayer"  # rate 0 in the first block: HF's layer as it is
    assert [getattr(layer, "drop_prob", 0.0) for layer in layers] == [0.0, 0.25, 0.5]
    layer = layers[2]
    assert isinstance(layer, DropPathBlipEncoderLayer)
    x = torch.randn(64, 5, cfg.vision.hidden_size, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    g = torch.autograd.grad(out.square().sum(), x)[0]
    torch.manual_seed(7)
    ref = _timm_block(layer, x, 0.5, True)
    rg = torch.autograd.grad(ref.square().sum(), x)[0]
    assert_close(out, ref, name="drop path output")
    assert_close(g, rg, name="drop path gradient")
    both_dropped = ((out - x).abs().flatten(1).amax(1) == 0).double().mean()
    assert 0.05 < both_dropped < 0.5  # each branch kept with probability 1/2: both dropped for about a quarter
    layer.eval()
    assert_close(layer(x), _timm_block(layer, x, 0.5, False), name="eval: no drop")


def test_video_tokens_concatenate_the_frames():
    cfg = vqa_config()
    vit = task_vit(cfg.vision, 0.0).eval()
    frames = torch.randn(2, 3, 3, 16, 16)
    out = video_tokens(vit, frames)
    per = vit(pixel_values=frames[1].reshape(3, 3, 16, 16)).last_hidden_state
    assert out.shape == (2, 3 * per.shape[1], per.shape[2])
    assert_close(out[1], per.reshape(-1, per.shape[2]), dtype=torch.float32, name="video 1")
    with pytest.raises(ValueError, match="frames"):
        video_tokens(vit, frames[0])


def test_config_checks_and_round_trip():
    cfg = vqa_config()
    assert BlipVQAConfig(**cfg.to_dict()) == cfg and BlipVQAConfig().vision.image_size == 480
    assert BlipVQAConfig.FIELDS == ("enc_token_id", "bos_token_id", "drop_path_rate")
    with pytest.raises(ValueError, match="drop_path_rate"):
        vqa_config(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="enc_token_id"):
        vqa_config(enc_token_id=10**6)
    with pytest.raises(ValueError, match="unknown vision"):
        vqa_config(vision={"bogus": 1})
    with pytest.raises(TypeError, match="unknown field"):
        vqa_config(bogus=1)
