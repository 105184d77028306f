"""QFormer's attention masks: bool, integer and floating masks (1 = attend, 0 = padding) all mean the same;
any other dtype (complex, ...) is a TypeError that names the argument, on every path that takes a mask
(forward's attention_mask over [queries | text] or text only, encoder_attention_mask with image features or
through image_kv)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.qformer import B, LK, Q, T, _model

GOOD = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
        torch.float32, torch.float64]
BAD = [torch.complex64, torch.complex128]


def _inputs():
    x = torch.randn(B, Q + T, 64)
    image = torch.randn(B, LK, 40)
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[0, -3:] = False
    image_mask = torch.ones(B, LK, dtype=torch.bool)
    image_mask[1, -2:] = False
    return x, image, text_mask, image_mask


@pytest.mark.parametrize("dtype", BAD, ids=str)
def test_masks_of_other_dtypes_are_rejected_naming_the_argument(dtype):
    model = _model()
    x, image, text_mask, image_mask = _inputs()
    full = torch.cat([torch.ones(B, Q, dtype=torch.bool), text_mask], 1)
    with pytest.raises(TypeError, match=r"QFormer: attention_mask must be a bool, integer or floating tensor"):
        model(x, query_length=Q, attention_mask=full.to(dtype), encoder_hidden_states=image)
    with pytest.raises(TypeError, match=r"QFormer: attention_mask must be a bool, integer or floating tensor"):
        model(x, query_length=Q, attention_mask=text_mask.to(dtype), encoder_hidden_states=image)  # text part only
    with pytest.raises(TypeError, match=r"QFormer: encoder_attention_mask must be a bool, integer or floating"):
        model(x, query_length=Q, encoder_hidden_states=image, encoder_attention_mask=image_mask.to(dtype))
    with pytest.raises(TypeError, match=r"QFormer: encoder_attention_mask must be a bool, integer or floating"):
        model.image_kv(image, image_mask.to(dtype))


@torch.no_grad()
def test_bool_integer_and_floating_masks_agree():
    model = _model()
    x, image, text_mask, image_mask = _inputs()
    full = torch.cat([torch.ones(B, Q, dtype=torch.bool), text_mask], 1)
    want = model(x, query_length=Q, attention_mask=full, encoder_hidden_states=image,
                 encoder_attention_mask=image_mask).last_hidden_state
    for dtype in GOOD:
        got = model(x, query_length=Q, attention_mask=full.to(dtype), encoder_hidden_states=image,
                    encoder_attention_mask=image_mask.to(dtype)).last_hidden_state
        assert torch.equal(got, want), dtype
    assert not torch.equal(want, model(x, query_length=Q, encoder_hidden_states=image).last_hidden_state)
