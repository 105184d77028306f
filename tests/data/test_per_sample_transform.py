"""An image transform marked ``per_sample`` (a random augmentation) gets each sample's key, the pass over the shards
it was read in and a position unique to that reading, so it can seed its draws and stay deterministic and
resumable."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from blipfast.data.image_stream import image_text_loader

from tests.helpers.wds import raw_number, tokenize_lengths, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("webdataset")


class Recorder:
    per_sample = True

    def __init__(self):
        self.calls = []

    def __call__(self, image, *, key, epoch, draw):
        self.calls.append((key, epoch, draw))
        return torch.tensor([image, epoch], dtype=torch.int64)


def _run(urls, batches, **kw):
    rec = Recorder()
    it = iter(image_text_loader(urls, tokenize=tokenize_lengths, image_transform=rec, image_decoder=raw_number,
                                text_transform=None, batch_size=3, seed=5, shuffle_buffer=4, **kw))
    out = [next(it)["pixel_values"] for _ in range(batches)]
    return rec.calls, out


def test_per_sample_transform_gets_key_epoch_and_a_unique_draw(tmp_path):
    urls = write_shards(str(tmp_path), 2, 3)  # 6 samples: 2 batches a pass
    calls, out = _run(urls, 4)
    assert [e for _, e, _ in calls] == [0] * 6 + [1] * 6
    assert Counter(k for k, _, _ in calls[:6]) == Counter(k for k, _, _ in calls[6:]) == \
        Counter(f"{i:09d}" for i in range(6))
    assert len({d for _, _, d in calls}) == 12  # every reading its own position
    assert all(int(k) == int(px[0]) for (k, _, _), px in zip(calls, torch.cat(out)))
    again, _ = _run(urls, 4)
    assert again == calls  # a function of the seed and the data
    resampled, _ = _run(urls, 4, resampled=True)
    assert {e for _, e, _ in resampled} == {0} and len({d for _, _, d in resampled}) == 12
