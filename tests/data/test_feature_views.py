"""``blipfast cache-features --views N``: N augmented views of every image in an annotation file's cache, each the
recipe's train transform at (seed, epoch = view, index = view_index(key)); training cycles through them, one view
per pair and epoch, the same on resume and with loader workers."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.cli import main
from blipfast.data import FeatureCache, FeatureTextDataset, GlobalBatchSampler, cache_features, load_vision_tower
from blipfast.data import read_annotations
from blipfast.data.features import view_index, view_of
from blipfast.data.transforms import train_transform
from blipfast.data.vision import load_image
from blipfast.options import EXIT_STOPPED
from blipfast.testing.data import write_images, write_jsonl, write_vision
from tests.helpers.train import read_log, tiny_args, weights

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("torchvision", reason="the train transforms are torchvision's (a dependency: pip install -e .)")

KW = dict(batch_size=3, shard_size=4, num_workers=0, progress=False, device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    rows = write_images(str(root), 8)
    return {"root": str(root), "rows": rows, "data": write_jsonl(str(root / "ann.jsonl"), rows),
            "vision": write_vision(str(root / "vit"))}


def test_views_are_the_train_transform_through_the_tower(data, tmp_path):
    """Shards [n, V, N, width]; view v of an image is the tower's tokens of the recipe's transform at (seed, v,
    view_index(key)), rounded to the cache's dtype; index.json records views, recipe, seed and the rule."""
    out = str(tmp_path / "feats")
    counts = cache_features(data["data"], data["root"], data["vision"], out, views=3, seed=5, **KW)
    assert counts["written"] == 8
    with open(os.path.join(out, "index.json")) as fh:
        index = json.load(fh)
    assert (index["views"], index["augment"], index["seed"]) == (3, "blip2_image_train", 5) and "view_rule" in index
    cache = FeatureCache(out)
    tower, proc = load_vision_tower(data["vision"])
    aug = train_transform("blip2_image_train", proc, 5)
    assert cache.views == 3 and cache.get(os.path.normpath(data["rows"][0]["image"])).shape == (cache.tokens,
                                                                                                 cache.width)
    for r in data["rows"][:3]:
        key = os.path.normpath(r["image"])
        image = load_image(os.path.join(data["root"], r["image"]))
        px = torch.stack([aug(image, v, view_index(key)) for v in range(3)])
        want = tower(px).to(torch.bfloat16)
        got = torch.stack([cache.get(key, v) for v in range(3)])
        assert torch.equal(got, want), key
        assert not torch.equal(got[0], got[1])
    with pytest.raises(ValueError, match="view"):
        cache.get(key, 3)


def test_view_choices_are_checked_and_a_cache_keeps_its_views(data, tmp_path):
    out = str(tmp_path / "feats")
    with pytest.raises(ValueError, match="copies of the same view"):
        cache_features(data["data"], data["root"], data["vision"], out, views=2, augment="none", **KW)
    with pytest.raises(ValueError, match="--augment"):
        cache_features(data["data"], data["root"], data["vision"], out, views=2, augment="crop", **KW)
    with pytest.raises(ValueError, match="--views"):
        cache_features(data["data"], data["root"], data["vision"], out, views=0, **KW)
    cache_features(data["data"], data["root"], data["vision"], out, views=2, **KW)
    for kw in (dict(views=3), dict(views=2, seed=1), dict(views=1)):
        with pytest.raises(ValueError, match="view"):
            cache_features(data["data"], data["root"], data["vision"], out, **kw, **KW)
    assert cache_features(data["data"], data["root"], data["vision"], out, views=2, **KW)["already_present"] == 8
    assert main(["cache-features", "--data", str(tmp_path / "x.tar"), "--vision", data["vision"], "--out",
                 str(tmp_path / "s"), "--views", "2"]) == 2


def test_training_cycles_through_every_view():
    """view_of: over V consecutive epochs every pair reads each of its V views once, pairs from different starts."""
    for views in (2, 3, 5):
        for p in range(20):
            assert sorted(view_of(views, 7, e, p) for e in range(3, 3 + views)) == list(range(views))
        assert len({view_of(views, 7, 0, p) for p in range(40)}) == views
    assert view_of(1, 7, 4, 9) == 0


def test_trainer_reads_a_view_per_epoch_and_resumes_exactly(data, tmp_path, capsys):
    """The trainer's dataset hands out view_of(V, seed, epoch, p); 12 steps (4 epochs) in one go equal 6 +
    --resume, losses and weights; the start-up log names the views."""
    feats = str(tmp_path / "feats")
    assert main(["cache-features", "--data", data["data"], "--images", data["root"], "--vision", data["vision"],
                 "--out", feats, "--views", "3", "--num-workers", "0", "--no-progress", "--device", "cpu"]) == 0
    ann = read_annotations(data["data"], None, check_images=False)
    cache = FeatureCache(feats)
    ds = FeatureTextDataset(ann, cache, {"input_ids": torch.zeros(len(ann), 2, dtype=torch.long)}, seed=7)
    sampler = GlobalBatchSampler(len(ds), 4, seed=7, with_epoch=True)
    it = iter(sampler)
    for _ in range(4):  # 2 micro-steps per epoch
        for epoch, p in next(it):
            key = ann.images[ann.image_index[p]]
            assert torch.equal(ds[(epoch, p)]["image_embeds"], cache.get(key, view_of(3, 7, epoch, p)))
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = dict(features=feats, steps=12, extra=("--save-every", "3"))
    assert main(tiny_args(full, data["data"], **args)) == 0
    assert "3 augmented views per image (blip2_image_train), one per visit" in capsys.readouterr().out
    assert main(tiny_args(part, data["data"], **dict(args, extra=args["extra"] + ("--stop-after", "6")))) \
        == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    assert [r["loss"] for r in read_log(full)] == [r["loss"] for r in read_log(part)]
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    one = str(tmp_path / "one-view")  # view 0 only (a cache of one view) trains differently
    feats1 = str(tmp_path / "feats1")
    cache_features(data["data"], data["root"], data["vision"], feats1, **KW)
    assert main(tiny_args(one, data["data"], features=feats1, steps=12)) == 0
    assert [r["loss"] for r in read_log(one)][4:] != [r["loss"] for r in read_log(full)][4:]
