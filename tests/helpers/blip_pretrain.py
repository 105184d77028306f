"""A tiny BlipPretrain configuration and batch (tests/models/test_blip_pretrain*.py, tests/bench/test_blip_pretrain.py):
BERT-style special tokens, a 2-layer text encoder/decoder and ViT, dropout off."""
from __future__ import annotations

import torch

from blipfast.models.blip_pretrain import BlipPretrainConfig

VOCAB, ENC, DEC, CLS, SEP = 60, 59, 58, 1, 2


def tiny_config(**kw) -> BlipPretrainConfig:
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                bos_token_id=DEC, sep_token_id=SEP, eos_token_id=SEP, pad_token_id=0)
    text.update(kw.pop("text", {}))
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=8)
    vision.update(kw.pop("vision", {}))
    base = dict(embed_dim=8, queue_size=12, enc_token_id=ENC, bos_token_id=DEC)
    base.update(kw)
    return BlipPretrainConfig(text=text, vision=vision, **base)


def make_batch(b, t, pad_rows=(), size=16):
    px = torch.randn(b, 3, size, size)
    ids = torch.randint(3, DEC, (b, t))
    ids[:, 0] = CLS
    mask = torch.ones(b, t, dtype=torch.long)
    for r in pad_rows:
        mask[r, t - 2:] = 0
        ids[r, t - 2:] = 0
    return px, ids, mask
