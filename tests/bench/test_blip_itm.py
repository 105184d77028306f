"""The counted BLIP ITM comparison (blipfast/bench/blip_itm.py) on a tiny config: the three implementations
compute the same loss, and the counts show exactly what sharing the image K/V saves."""
from __future__ import annotations

import torch

from blipfast.bench.blip_itm import count_itm, itm_steps
from blipfast.bench.counting import format_cost_table

TINY = dict(hidden_size=32, encoder_hidden_size=24, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2,
            vocab_size=64, bos_token_id=1, sep_token_id=2)
B, T, LK = 3, 7, 9


def test_same_loss_in_all_implementations():
    losses = [step() for step, _ in itm_steps(batch=B, text_len=T, image_tokens=LK, cfg_overrides=TINY).values()]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-6)


def test_shared_image_kv_saves_exactly_the_repeated_projections():
    rows = dict(count_itm(batch=B, text_len=T, image_tokens=LK, cfg_overrides=TINY))
    hf, gathered, shared = rows.values()
    d, enc, layers = TINY["hidden_size"], TINY["encoder_hidden_size"], TINY["num_hidden_layers"]
    # K and V of every layer for 2B extra image copies: forward GEMM + its two backward GEMMs
    repeated = 3 * 2 * (2 * B) * LK * enc * (2 * d * layers)
    assert gathered.flops - shared.flops == repeated
    assert shared.saved_bytes < gathered.saved_bytes
    assert shared.host_syncs == gathered.host_syncs == 0
    assert shared.ops < hf.ops and gathered.ops < hf.ops
    assert "blipfast, shared image K/V" in format_cost_table(list(rows.items()), base="hf BlipTextModel (reference)")


def test_gpu_path_counts_on_meta_tensors():
    """--gpu-path: the GPU's dispatch decisions on meta tensors (bf16, dropout): the same FLOP saving, no host sync,
    less activation memory than HF (which also keeps its dropout masks)."""
    tiny = {**TINY, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    rows = dict(count_itm(batch=B, text_len=T, image_tokens=LK, cfg_overrides=tiny, dtype=torch.bfloat16,
                          gpu_path=True))
    hf, gathered, shared = rows.values()
    d, enc, layers = TINY["hidden_size"], TINY["encoder_hidden_size"], TINY["num_hidden_layers"]
    assert gathered.flops - shared.flops == 3 * 2 * (2 * B) * LK * enc * (2 * d * layers)
    assert shared.saved_bytes < gathered.saved_bytes < hf.saved_bytes
    assert shared.host_syncs == 0 and "blipfast.cross_attention_fwd" in shared.op_counts
