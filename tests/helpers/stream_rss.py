"""Run by test_stream_memory.py in a fresh process: stream ``SHARDS x PER`` samples and print the peak RSS.

``python -m tests.data.stream_rss SHARDS PER``. The samples are made in memory by the test source, in the form
the webdataset tar reader yields them (key, 600 bytes of "image", a 150-character caption), and go through
everything of ours: the shard order, the shuffle buffer, decoding, per-batch tokenising (64 int64 tokens per
caption), batching, position snapshots and the loader's state. Python's tar parsing (the webdataset package,
one shard at a time) is left out: 200k samples of it take over a minute on a 2-core CI machine.
"""
from __future__ import annotations

import json
import resource
import sys

import torch

from blipfast.data.image_stream import ImageTextSource
from blipfast.data.stream import ShardStream, StreamLoader

IMAGE = bytes(range(200)) * 3
PIXELS = torch.zeros(3, 2, 2)  # (one tensor for every sample: making one each would be most of the run time)


class MemorySource(ImageTextSource):
    def __init__(self, per: int):
        super().__init__(self.tokenize64, lambda b: PIXELS, image_decoder=len, text_transform=None)
        self.per = per

    @staticmethod
    def tokenize64(captions):
        return {"input_ids": torch.full((len(captions), 64), len(captions[0]), dtype=torch.int64)}

    def samples(self, url: str):
        s = int(url.rsplit("/", 1)[1][:-4])
        for i in range(self.per):
            key = f"{s:05d}{i:06d}"
            yield {"__key__": key, "__url__": url, "jpg": IMAGE, "txt": f"a photo of {key} on a table ".encode() * 5}


def main(shards: int, per: int) -> None:
    urls = [f"mem://data/{s:05d}.tar" for s in range(shards)]
    loader = StreamLoader(ShardStream(urls, MemorySource(per), batch_size=250, shuffle_buffer=2000, seed=1))
    n, want = 0, shards * per
    for batch in loader:
        n += batch["input_ids"].shape[0]
        if n >= want:
            break
    json.dump({"samples": n, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "state_bytes": len(json.dumps(loader.state_dict()))}, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
