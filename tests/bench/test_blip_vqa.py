"""The counted BLIP VQA rank inference (blipfast/bench/blip_vqa.py) on a tiny configuration, on meta tensors with the
GPU's dispatch: blipfast syncs nothing where BLIP's ``rank_answer`` syncs once (its boolean index), and computes
fewer FLOPs (the question's decoder K/V once per question instead of once per candidate, the [DEC] position once per
question, no last position) with fewer operators. The timed suite needs CUDA."""
from __future__ import annotations

import pytest
import torch

from blipfast.bench import blip_vqa
from tests.helpers.blip_tasks import vqa_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counted_rank_inference_on_a_tiny_config():
    rows = dict(blip_vqa.counted(questions=3, k=4, answers=11, answer_len=5, question_len=7, config=vqa_config()))
    base, ours = rows[blip_vqa.BASELINE], rows[blip_vqa.OURS]
    assert base.host_syncs == 1 and ours.host_syncs == 0
    assert ours.flops < 0.8 * base.flops and ours.ops < 0.8 * base.ops
    assert ours.saved_bytes == base.saved_bytes == 0  # inference: nothing kept for a backward
    # more candidates: the gap grows (BLIP projects the question states to K/V once per candidate)
    rows = dict(blip_vqa.counted(questions=3, k=8, answers=11, answer_len=5, question_len=7, config=vqa_config()))
    assert rows[blip_vqa.OURS].flops < 0.75 * rows[blip_vqa.BASELINE].flops


def test_no_timed_cases_without_cuda():
    if not torch.cuda.is_available():
        assert blip_vqa.cases(torch.device("cpu")) == []
