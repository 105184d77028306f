"""The counted BLIP pre-training step (blipfast/bench/blip_pretrain.py) on a tiny configuration, on meta tensors with
the GPU's dispatch: blipfast syncs nothing where BLIP's step syncs once per drawn negative and once for the queue
pointer; it computes fewer FLOPs (the image K/V once per image instead of once per text pass), saves fewer bytes and
dispatches fewer operators. The timed suite needs CUDA."""
from __future__ import annotations

import torch

from blipfast.bench import blip_pretrain
from tests.helpers.blip_pretrain import tiny_config


def test_counted_step_on_a_tiny_config():
    b = 6
    rows = dict(blip_pretrain.counted(batch=b, text_len=9, config=tiny_config(queue_size=12)))
    base, ours = rows[blip_pretrain.BASELINE], rows["blipfast BlipPretrain"]
    assert ours.host_syncs == 0
    assert base.host_syncs == 2 * b + 1  # BLIP: multinomial(...).item() per row and direction, int(queue_ptr)
    assert ours.flops < base.flops and ours.saved_bytes < base.saved_bytes and ours.ops < base.ops


def test_counted_report_and_no_timed_cases_without_cuda():
    table, payload = blip_pretrain.counted_report(batch=4)
    assert "blipfast BlipPretrain" in table and payload["rows"]["blipfast BlipPretrain"]["host_syncs"] == 0
    assert payload["ratio"]["flops"] < 0.9 and payload["ratio"]["saved_bytes"] < 0.8
    if not torch.cuda.is_available():
        assert blip_pretrain.cases(torch.device("cpu")) == []
