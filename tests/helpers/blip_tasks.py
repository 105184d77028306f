"""Tiny BlipVQA / BlipNLVR configurations and batches (tests/models/test_blip_vqa.py, test_blip_nlvr.py,
tests/bench/test_blip_vqa.py): the special tokens of tests/helpers/blip_pretrain.py, 2-layer text models and ViT,
dropout and stochastic depth off unless asked."""
from __future__ import annotations

import torch

from blipfast.models.blip_nlvr import BlipNLVRConfig
from blipfast.models.blip_vqa import BlipVQAConfig
from tests.helpers.blip_pretrain import CLS, DEC, ENC, SEP, VOCAB
from tests.helpers.tolerance import assert_close, assert_within_torch_error

SIZE = 16


def text_vision(text=None, vision=None):
    t = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             bos_token_id=DEC, sep_token_id=SEP, eos_token_id=SEP, pad_token_id=0)
    t.update(text or {})
    v = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
             patch_size=8)
    v.update(vision or {})
    return t, v


def vqa_config(text=None, vision=None, **kw) -> BlipVQAConfig:
    t, v = text_vision(text, vision)
    return BlipVQAConfig(text=t, vision=v, **{"enc_token_id": ENC, "bos_token_id": DEC, "drop_path_rate": 0.0, **kw})


def nlvr_config(text=None, vision=None, **kw) -> BlipNLVRConfig:
    t, v = text_vision(text, vision)
    return BlipNLVRConfig(text=t, vision=v, **{"enc_token_id": ENC, "bos_token_id": DEC, "drop_path_rate": 0.0,
                                               "merge_from_layer": 1, **kw})


def tokens(rows: int, t: int, lengths=None, generator=None):
    """(ids [rows, t] with [CLS] first, [SEP] at each row's end and [PAD] after it, mask) for row lengths
    ``lengths`` (default all ``t``)."""
    lengths = [t] * rows if lengths is None else list(lengths)
    ids = torch.randint(3, DEC, (rows, t), generator=generator)
    ids[:, 0] = CLS
    mask = torch.zeros(rows, t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, n - 1] = SEP
        ids[r, n:] = 0
        mask[r, :n] = 1
    return ids, mask


def check_losses_and_grads(fast_loss, fast_grads, ref_loss, ref_grads, low_loss, low_grads, dtype) -> None:
    """blipfast's loss and gradients (dicts name -> tensor) against the float64 restatement: in float64 to rounding
    (the gradients as one vector, relative to its scale: a gradient that is 0 in exact arithmetic, the keys' bias,
    is rounding noise on both sides), otherwise within the restatement's own error in ``dtype`` (``low_*``)."""
    assert set(fast_grads) == set(ref_grads)
    names = sorted(ref_grads)
    cat = lambda g: torch.cat([g[k].double().flatten() for k in names])  # noqa: E731
    if dtype == torch.float64:
        assert_close(fast_loss, ref_loss, name="loss")  # another op order: several roundings, not one
        assert_close(cat(fast_grads), cat(ref_grads), name="all gradients")
        return
    assert_within_torch_error(fast_loss.reshape(1), ref_loss.reshape(1), low_loss.reshape(1), dtype=dtype, name="loss")
    assert_within_torch_error(cat(fast_grads), cat(ref_grads), cat(low_grads), dtype=dtype, name="all gradients",
                              factor=4.0)
