"""The counted BLIP retrieval fine-tuning step (blipfast/bench/blip_retrieval.py) on a tiny configuration, on meta
tensors with the GPU's dispatch: blipfast syncs nothing where BLIP's step syncs once per drawn negative and once for
the queue pointer; it computes fewer FLOPs (the image K/V once per image instead of once per ITM row), saves fewer
bytes and dispatches fewer operators. The timed suite needs CUDA."""
from __future__ import annotations

import torch

from blipfast.bench import blip_retrieval
from tests.helpers.blip_finetune import retrieval_config


def test_counted_step_on_a_tiny_config():
    b = 6
    rows = dict(blip_retrieval.counted(batch=b, text_len=9, config=retrieval_config(negative_all_rank=True)))
    base, ours = rows[blip_retrieval.BASELINE], rows[blip_retrieval.OURS]
    assert ours.host_syncs == 0
    assert base.host_syncs == 2 * b + 1  # BLIP: multinomial(...).item() per row and direction, int(ptr_queue)
    assert ours.flops < base.flops and ours.saved_bytes < base.saved_bytes and ours.ops < base.ops


def test_no_timed_cases_without_cuda():
    if not torch.cuda.is_available():
        assert blip_retrieval.cases(torch.device("cpu")) == []
