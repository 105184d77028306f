"""``blipfast train --caption-sampling random`` (blipfast/data/datasets.py: OneCaptionPerImage): each visit of an
image reads one of its captions, chosen by (seed, epoch, image), the same with 0 and 2 loader workers and from a
resumed sampler position, other choices in other epochs; an epoch is one pass over the images. End to end: a tiny
run on an annotation file with two captions per image resumes bit-identically and counts epochs in images."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from blipfast.cli import main
from blipfast.data.annotations import read_annotations
from blipfast.data.datasets import (GlobalBatchSampler, OneCaptionPerImage, caption_choice, caption_sampling,
                                    collate, visit)
from blipfast.options import EXIT_STOPPED
from blipfast.testing.data import write_images, write_jsonl
from blipfast.train.config import read_config_file
from tests.helpers.train import read_log, tiny_args, weights, write_dataset


class _Pairs(Dataset):
    """Item (epoch, p) -> its pair index and epoch, as a training dataset sees them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item) -> dict:
        epoch, p = visit(item)
        return {"index": torch.tensor(p), "epoch": torch.tensor(epoch)}


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    """11 images with 1, 2 or 3 captions each (rows of one image not adjacent: images in order of first use)."""
    root = tmp_path_factory.mktemp("ann")
    rows = write_images(str(root), 11)
    lines = []
    for i, r in enumerate(rows):
        caps = [r["caption"], r["caption"] + " again", r["caption"] + " a third time"][:1 + i % 3]
        lines.append({"image": r["image"], "caption": caps[:2]})
        lines += [{"image": r["image"], "caption": c} for c in caps[2:]]
    lines.append({"image": rows[0]["image"], "caption": "image zero, later"})
    return read_annotations(write_jsonl(str(root / "ann.jsonl"), lines), str(root))


def _visits(ds, batch: int, workers: int, start: int, steps: int, seed: int = 5) -> list:
    sampler = GlobalBatchSampler(len(ds), batch, seed=seed, start=start, with_epoch=True)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    out, it = [], iter(loader)
    for _ in range(steps):
        b = next(it)
        out.append(list(zip(b["epoch"].tolist(), b["index"].tolist())))
    return out


def test_each_visit_reads_one_of_the_images_captions(ann):
    ds = OneCaptionPerImage(_Pairs(len(ann)), ann, seed=3)
    n_img = len(ann.images)
    assert len(ds) == n_img == 11 and len(ann) == 22
    owner = ann.image_index
    for epoch in range(4):
        seen = [ds[(epoch, i)]["index"].item() for i in range(n_img)]
        assert [owner[p] for p in seen] == list(range(n_img))  # image i reads a pair of image i
        assert seen == [ds.pair(epoch, i) for i in range(n_img)]
    # independent restatement of the rule: the caption_choice-th pair of the image's pairs in file order
    groups = [[p for p in range(len(ann)) if owner[p] == i] for i in range(n_img)]
    assert [len(g) for g in groups] == [2, 2, 3] + [1, 2, 3] * 2 + [1, 2]
    assert [ds.pair(7, i) for i in range(n_img)] == [g[caption_choice(len(g), 3, 7, i)] for i, g in
                                                     enumerate(groups)]
    # other epochs and seeds draw other captions; over many epochs every caption is drawn about as often
    picks = [[ds.pair(e, i) for i in range(n_img)] for e in range(300)]
    assert picks[0] != picks[1] and [OneCaptionPerImage(_Pairs(len(ann)), ann, seed=4).pair(0, i)
                                     for i in range(n_img)] != picks[0]
    for i, g in enumerate(groups):
        counts = [sum(row[i] == p for row in picks) for p in g]
        assert min(counts) > 300 / len(g) * 0.7, (i, counts)


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic_with_workers_and_exact_on_resume(ann, workers):
    ds = OneCaptionPerImage(_Pairs(len(ann)), ann, seed=3)
    ref = _visits(ds, 2, 0, 0, 15)  # 5 steps per epoch (11 images, batch 2): three epochs
    assert _visits(ds, 2, workers, 0, 15) == ref
    assert _visits(ds, 2, workers, 7, 8) == ref[7:]  # a resumed position reads what the uninterrupted run reads
    for e in range(3):  # one epoch = one pass over the images: 10 distinct images, each with the epoch's caption
        rows = [v for step in ref[5 * e:5 * e + 5] for v in step]
        assert {v[0] for v in rows} == {e}
        images = [ann.image_index[p] for _, p in rows]
        assert len(set(images)) == 10 and all(p == ds.pair(e, ann.image_index[p]) for _, p in rows)


def test_all_keeps_the_pairs_and_bad_modes_are_refused(ann):
    pairs = _Pairs(len(ann))
    assert caption_sampling(pairs, ann, "all", 0) == (pairs, False)
    ds, per_visit = caption_sampling(pairs, ann, "random", 0)
    assert isinstance(ds, OneCaptionPerImage) and per_visit
    with pytest.raises(ValueError, match="--caption-sampling"):
        caption_sampling(pairs, ann, "first", 0)
    with pytest.raises(ValueError, match="pairs"):
        OneCaptionPerImage(_Pairs(3), ann, 0)
    with pytest.raises(ValueError, match="epoch"):
        caption_choice(2, 0, -1, 0)


def test_train_two_captions_per_image_resumes_bit_identically(tmp_path, capsys):
    """8 images, 2 captions each (capfilt --mode blip2's output shape): an epoch is 2 steps of 4 images; 6 steps in
    one go == 3 (--stop-after) + --resume, losses and weights; --caption-sampling all takes 4 steps per epoch."""
    d = write_dataset(tmp_path / "data", 8)
    two = write_jsonl(os.path.join(d["root"], "two.jsonl"),
                      [{"image": r["image"], "caption": [r["caption"], "a picture of " + r["caption"]]}
                       for r in d["rows"]])
    extra = ("--caption-sampling", "random", "--save-every", "3", "--augment", "none")
    full, part, every = (str(tmp_path / k) for k in ("full", "part", "all"))
    torch.set_num_threads(1)
    assert main(tiny_args(full, two, d["root"], d["vision"], steps=6, extra=extra)) == 0
    assert main(tiny_args(part, two, d["root"], d["vision"], steps=6, extra=extra + ("--stop-after", "3"))) \
        == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    rf, rp = read_log(full), read_log(part)
    assert [r["step"] for r in rp] == list(range(1, 7))
    assert [(r["loss"], r["epoch"]) for r in rp] == [(r["loss"], r["epoch"]) for r in rf]
    assert rf[1]["epoch"] == pytest.approx(1.0)  # 2 steps = one pass over the 8 images
    wf, wp = weights(full), weights(part)
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    assert main(tiny_args(every, two, d["root"], d["vision"], steps=2, extra=("--augment", "none"))) == 0
    assert read_log(every)[1]["epoch"] == pytest.approx(0.5)  # 16 pairs: 4 steps per epoch
    assert read_config_file(os.path.join(full, "config.yaml"))["caption_sampling"] == "random"


def test_streamed_shards_and_unknown_modes_are_refused(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "{00000..00001}.tar"), "--caption-sampling", "random", "--out",
                 str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "--caption-sampling random" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--caption-sampling", "first"])
    assert "--caption-sampling" in capsys.readouterr().err
