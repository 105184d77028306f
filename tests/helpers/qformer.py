"""What the QFormer tests share: the fp32-vs-fp32 parity check (1e-5 of the reference's magnitude, with a floor for
gradients that are rounding noise), random biases and LayerNorm affine for HF models, per-case seeds from the run's
seed, and the tiny QFormer of the mode tests (tests/models/test_qformer_*.py, test_blip_parity.py,
test_blip_patch.py)."""
from __future__ import annotations

import torch

from blipfast import QFormer, QFormerConfig
from tests.helpers.tolerance import SEED

RTOL = 1e-5
GRAD_FLOOR = 1e-7
CFG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, encoder_hidden_size=40,
           use_qformer_text_input=True, vocab_size=50, max_position_embeddings=16)
B, Q, T, LK = 3, 6, 7, 9


def _randomize(model, gen, all_weights=False):
    """Random biases and LayerNorm affine (HF initialises them to 0 / 1); other weights keep HF's N(0, 0.02)
    init unless ``all_weights`` (the vision tower's init scale is 1e-10: its features would be near-constant)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif all_weights or name.endswith("bias") or p.dim() < 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _seed_of(*parts) -> int:
    return (SEED + sum(map(ord, "/".join(map(str, parts))))) % 2**31


def _check(name, got, ref, floor=0.0):
    if ref is None or got is None:  # unused on one side: must be unused (or exactly zero) on the other
        other = got if ref is None else ref
        assert other is None or not other.any(), f"{name}: gradient on one side only"
        return 0.0
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{name}: max error {err:.2e}, magnitude {scale:.2e}")  # shown with -rP / on failure
    assert err <= RTOL * scale + floor, f"{name}: max error {err:.3e} > {RTOL} x {scale:.3e} + {floor:.1e}"
    return err / max(scale, 1e-30)


def _model(**overrides) -> QFormer:
    model = QFormer(QFormerConfig(**{**CFG, **overrides})).eval()
    with torch.no_grad():  # random biases and LayerNorm affine, so that every parameter matters
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model
