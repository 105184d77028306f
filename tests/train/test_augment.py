"""``blipfast train --augment``: the trainer's images go through the task recipe's train transform
(blipfast.data.transforms, itself tested against the references' pipelines in tests/data/test_transforms.py),
seeded by (seed, epoch, pair index) for image folders and by the reading of a sample for WebDataset shards, so that
loader workers and resume draw the same views; the refusals and the defaults."""
from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch
import yaml

from blipfast.data import GlobalBatchSampler, ImageTextDataset, collate, read_annotations
from blipfast.data.image_stream import image_text_loader
from blipfast.data.transforms import StreamAugment, TrainTransform, train_transform
from blipfast.data.vision import load_image, load_image_processor
from blipfast.train.config import read_run_config
from tests.helpers.train import TINY_BLIP, make_trainer, tiny_args, write_blip_vision, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("torchvision", reason="the train transforms are torchvision's (a dependency: pip install -e .)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), 12)




def _image(dataset, p):
    return load_image(os.path.join(dataset["root"], dataset["rows"][p]["image"]))


def test_trainer_augments_images_with_the_recipes_transform(dataset, tmp_path):
    """BLIP-2 stage 1 on images: LAVIS' blip2_image_train at the vision processor's size, mean and std; each item
    is the transform of its image at (epoch, pair index); the sampler hands out the epoch; config.yaml records
    the resolved choice. --augment none: the processor's pixels, as before."""
    t = make_trainer(tiny_args(str(tmp_path / "s1"), dataset["data"], dataset["root"], dataset["vision"]))
    try:
        aug, proc = t.dataset.augment, load_image_processor(dataset["vision"])
        assert isinstance(aug, TrainTransform) and aug.recipe == "blip2_image_train" and aug.randaugment is None
        assert (aug.size, aug.seed) == (16, 7) and aug.mean == tuple(proc.image_mean) and aug.std == tuple(proc.image_std)
        assert t.cfg["augment"] == "reference" and t.sampler.with_epoch
        batch = next(iter(t.sampler))
        assert all(isinstance(v, tuple) and v[0] == 0 for v in batch)
        epoch, p = 3, 5
        item = t.dataset[(epoch, p)]
        assert torch.equal(item["pixel_values"], aug(_image(dataset, p), epoch, p))
        assert not torch.equal(item["pixel_values"], t.dataset[(epoch + 1, p)]["pixel_values"])
        assert torch.equal(t.dataset[p]["pixel_values"], aug(_image(dataset, p), 0, p))  # a bare index: epoch 0
    finally:
        t.close()
    t = make_trainer(tiny_args(str(tmp_path / "none"), dataset["data"], dataset["root"], dataset["vision"],
                           extra=("--augment", "none")))
    try:
        assert t.dataset.augment is None and not t.sampler.with_epoch
        from blipfast.data.vision import preprocess

        want = preprocess(load_image_processor(dataset["vision"]), _image(dataset, 2))
        assert torch.equal(t.dataset[2]["pixel_values"], want)
    finally:
        t.close()


def test_blip_pretraining_augments_with_randaugment_at_min_scale_0_2(dataset, tmp_path):
    """BLIP (v1) pre-training: Salesforce BLIP's pretrain transform (crop scale 0.2-1, RandomAugment(2, 5))."""
    vit = write_blip_vision(str(tmp_path / "vit"))
    t = make_trainer(tiny_args(str(tmp_path / "run"), dataset["data"], dataset["root"], vit, model=TINY_BLIP,
                           extra=("--max-txt-len", "10")))
    try:
        aug = t.dataset.augment
        assert aug.recipe == "blip-pretrain" and aug.randaugment is not None and aug.size == 16
        assert torch.equal(t.dataset[(1, 4)]["pixel_values"], aug(_image(dataset, 4), 1, 4))
    finally:
        t.close()


def test_loader_workers_draw_what_one_process_draws(dataset):
    """The same batches, augmented, from 0 and 2 loader workers (the draws depend on (seed, epoch, index) only)
    across an epoch boundary."""
    ann = read_annotations(dataset["data"], dataset["root"])
    text = {"input_ids": torch.zeros(len(ann), 3, dtype=torch.long)}
    aug = train_transform("blip-finetune", load_image_processor(dataset["vision"]), seed=11)
    ds = ImageTextDataset(ann, dataset["root"], None, text, augment=aug)

    def batches(workers):
        sampler = GlobalBatchSampler(len(ds), 4, seed=3, with_epoch=True)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(5)]  # 3 per epoch

    one, two = batches(0), batches(2)
    for a, b in zip(one, two):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    first = {int(i): px for i, px in zip(one[0]["index"], one[0]["pixel_values"])}
    later = {int(i): px for b in one[3:] for i, px in zip(b["index"], b["pixel_values"])}
    shared = set(first) & set(later)
    assert shared and all(not torch.equal(first[i], later[i]) for i in shared)  # epoch 1: new views


def _jpegs(paths) -> dict:
    out = {}
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    from PIL import Image

                    out[m.name[:-4]] = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
    return out


class _Recording(StreamAugment):
    def __init__(self, transform):
        super().__init__(transform)
        self.calls = []

    def __call__(self, image, *, key, epoch, draw=None):
        self.calls.append((key, epoch, draw))
        return super().__call__(image, key=key, epoch=epoch, draw=draw)


def test_shard_stream_augments_each_reading(tmp_path):
    """WebDataset shards: each reading of a sample is augmented with its pass and a hash of its unique draw
    position, the same on every run; a resampled stream reading an image twice draws two views."""
    from blipfast.testing.shards import write_shards

    urls = write_shards(str(tmp_path / "shards"), 2, 4, image_size=20)
    images = _jpegs(urls)
    base = TrainTransform("blip2_image_train", 16, seed=2)

    def run(**kw):
        rec = _Recording(base)
        it = iter(image_text_loader(urls, tokenize=None, image_transform=rec, batch_size=4, seed=5,
                                    shuffle_buffer=2, **kw))
        return rec, [next(it) for _ in range(4)]

    rec, out = run()
    px = torch.cat([b["pixel_values"] for b in out])
    assert [e for _, e, _ in rec.calls] == [0] * 8 + [1] * 8
    for (key, epoch, draw), got in zip(rec.calls, px):
        assert torch.equal(got, base(images[key], epoch, StreamAugment.index(key, draw)))
    again, out2 = run()
    assert again.calls == rec.calls and torch.equal(px, torch.cat([b["pixel_values"] for b in out2]))
    rec, out = run(resampled=True)
    px = torch.cat([b["pixel_values"] for b in out])
    seen = {}
    for (key, _, _), got in zip(rec.calls, px):
        seen.setdefault(key, []).append(got)
    twice = [v for v in seen.values() if len(v) > 1]
    assert twice and all(not torch.equal(v[0], v[1]) for v in twice)


def test_refusals_and_old_runs(dataset, tmp_path):
    """--augment reference with a feature cache is refused (a cache holds one view); a run folder written before
    --augment existed resumes without augmentation; a bad value names the option."""
    from blipfast.cli import main

    out = str(tmp_path / "refused")
    assert main(tiny_args(out, dataset["data"], features=str(tmp_path / "nofeats"),
                          extra=("--augment", "reference"))) == 2
    assert not os.path.exists(out)
    with pytest.raises(SystemExit):
        main(tiny_args(str(tmp_path / "bad"), dataset["data"], dataset["root"], dataset["vision"],
                       extra=("--augment", "randaugment")))
    run = tmp_path / "old"
    run.mkdir()
    with open(run / "config.yaml", "w") as fh:
        yaml.safe_dump({"data": dataset["data"], "out": str(run), "seed": 1, "steps": 3}, fh)
    assert read_run_config(str(run))["augment"] == "none"


def test_nlvr2_augments_each_image_on_its_own(tmp_path):
    """NLVR2 (BLIP's nlvr_dataset transforms the two images separately): the left image seeded with index 2p, the
    right one with 2p + 1."""
    from blipfast.data.nlvr2 import Nlvr2Dataset, make_synthetic_nlvr2, read_nlvr2

    paths = make_synthetic_nlvr2(str(tmp_path / "nlvr"), n=6, image_size=24)
    ann = read_nlvr2(paths["data"], paths["images"])
    aug = TrainTransform("blip-finetune", 16, seed=4)
    ds = Nlvr2Dataset(ann, paths["images"], None, {"input_ids": torch.zeros(len(ann), 3, dtype=torch.long)},
                      augment=aug)
    p, epoch = 2, 1
    px = ds[(epoch, p)]["pixel_values"]
    left, right = load_image(ann.image_path(paths["images"], p)), load_image(ann.image_path2(paths["images"], p))
    assert px.shape == (2, 3, 16, 16)
    assert torch.equal(px[0], aug(left, epoch, 2 * p)) and torch.equal(px[1], aug(right, epoch, 2 * p + 1))
