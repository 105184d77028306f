"""``blipfast train`` on streams: WebDataset shards in img2dataset's layout (``blipfast.testing.shards``) and the
feature shards ``cache-features`` writes from them. One epoch reads every sample once; an interrupted and resumed
run reads the same samples in the same order and trains the same weights bit for bit (loader workers included);
bad samples are counted in the log; fp8 feature shards train like bf16 ones; refused option combinations."""
from __future__ import annotations

import io
import json
import os
from collections import Counter

import pytest
import torch

from blipfast.cli import main
from blipfast.testing.shards import sample_files, write_demo, write_tar
from blipfast.train.streams import read_keys
from blipfast.options import EXIT_STOPPED
from tests.helpers.train import read_log, tiny_args, weights

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("webdataset")

N_SHARDS, PER = 4, 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    d = write_demo(str(root), N_SHARDS, PER)
    d["spec"] = os.path.join(str(root), "shards", "{00000..00003}.tar")
    d["keys"] = {f"{s:05d}{i:04d}" for s in range(N_SHARDS) for i in range(PER)}
    return d


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stream_args(out, demo, steps, *, features=None, extra=()):
    args = tiny_args(out, None if features else demo["spec"], vision=None if features else demo["vision"],
                     features=features, steps=steps)
    return args + ["--tokenizer", demo["tokenizer"], "--log-keys", "--shuffle-buffer", "5"] + list(extra)


def test_shards_one_epoch_reads_every_sample_once_and_resume_is_bit_identical(demo, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    extra = ("--num-workers", "2", "--save-every", "3")
    assert main(stream_args(full, demo, 8, extra=extra)) == 0
    assert main(stream_args(part, demo, 8, extra=extra + ("--stop-after", "5"))) == EXIT_STOPPED
    assert len(read_log(part)) == 5
    with open(os.path.join(part, "keys-rank00000.txt"), "a") as fh:  # written after the last checkpoint: dropped
        fh.write("5\tstale keys\n")
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    kf, kp = read_keys(full), read_keys(part)
    assert sorted(kf) == list(range(8)) and kp == kf
    # 32 samples, batch 4: the 8 steps of the epoch read every sample once, from both loader workers' shards
    assert Counter(k for ks in kf.values() for k in ks) == Counter(demo["keys"])
    rf, rp = read_log(full), read_log(part)
    keys = ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "epoch")
    assert [[r[k] for k in keys] for r in rp] == [[r[k] for k in keys] for r in rf]
    assert rf[-1]["epoch"] == 1.0 and all(r["bad_samples"] == 0 and r["data_wait_s"] >= 0 for r in rf)
    wf, wp = weights(full), weights(part)
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    state = torch.load(os.path.join(part, "checkpoint-00000008", "state.pt"), weights_only=True)
    (pos,) = state["data_streams"]
    assert pos["batches"] == 8 and len(pos["workers"]) == 2
    # the stream's position needs the same number of loader workers
    assert main(["train", "--resume", part, "--no-progress", "--num-workers", "1", "--stop-after", "9"]) == 2


def test_feature_shards_fp8_and_bf16_from_cache_features(demo, tmp_path, capsys):
    runs = {}
    for dtype in ("bf16", "fp8"):
        feats = str(tmp_path / f"feats-{dtype}")
        assert main(["cache-features", "--data", demo["spec"], "--vision", demo["vision"], "--out", feats,
                     "--dtype", dtype, "--batch-size", "5", "--num-workers", "0", "--no-progress",
                     "--device", "cpu"]) == 0
        with open(os.path.join(feats, "index.json")) as fh:
            index = json.load(fh)
        assert (index["format"], index["dtype"], index["images"], index["pairs"]) == \
            ("blipfast-feature-shards", dtype, 32, 32)
        out = str(tmp_path / dtype)
        assert main(stream_args(out, demo, 8, features=feats)) == 0  # no --data: the captions are in the shards
        runs[dtype] = read_log(out)
        assert Counter(k for ks in read_keys(out).values() for k in ks) == Counter(demo["keys"])
    assert "32 pairs over 32 images, 32 samples per epoch" in capsys.readouterr().out
    # fp8 stores each token to ~2 % (e4m3 with a per-token scale): the same run within a few thousandths
    for a, b in zip(runs["bf16"], runs["fp8"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.01), (a["step"], a["loss"], b["loss"])
    assert [r["loss"] for r in runs["bf16"]] != [r["loss"] for r in runs["fp8"]]


def test_bad_samples_are_skipped_and_counted(demo, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "bad"
    folder.mkdir()
    good = Image.new("RGB", (20, 20), (200, 30, 30))
    buf = io.BytesIO()
    good.save(buf, format="JPEG")
    for s in range(2):
        files = []
        for i in range(6):
            files += sample_files(f"{s:05d}{i:04d}", buf.getvalue(), "a red square", 20, 20)
        files += [(f"{s:05d}0006.jpg", b"not a jpeg"), (f"{s:05d}0006.txt", b"a broken image")]  # undecodable
        files += [(f"{s:05d}0007.jpg", buf.getvalue())]  # no caption
        write_tar(str(folder / f"{s:05d}.tar"), files)
    out = str(tmp_path / "run")
    args = tiny_args(out, str(folder), vision=demo["vision"], steps=4) + [
        "--tokenizer", demo["tokenizer"], "--samples-per-epoch", "12"]
    assert main(args) == 0
    rows = read_log(out)
    # 12 good samples a pass; step 4 takes samples of the second pass, so every bad one of the first was met
    assert 4 <= rows[-1]["bad_samples"] <= 8 and rows[-1]["epoch"] == pytest.approx(4 / 3, abs=1e-4)
    assert [r["bad_samples"] for r in rows] == sorted(r["bad_samples"] for r in rows)
    err = capsys.readouterr().err
    assert "skipped sample '000010006' of shard" in err and "cannot decode .jpg" in err and "no caption" in err


def test_refused_option_combinations(demo, tmp_path, capsys):
    out = str(tmp_path / "x")
    base = tiny_args(out, demo["spec"], vision=demo["vision"], steps=1)
    ann = tmp_path / "ann.jsonl"
    ann.write_text('{"image": "a.png", "caption": "a cat"}\n')
    feats = tmp_path / "feats"  # what training reads of feature shards before anything else: the index's format
    feats.mkdir()
    (feats / "index.json").write_text('{"format": "blipfast-feature-shards"}')
    cases = [
        (base, "--tokenizer DIR is needed with WebDataset shards"),
        (tiny_args(out, demo["spec"], steps=1) + ["--tokenizer", demo["tokenizer"]], "need --vision MODEL_DIR"),
        (base + ["--tokenizer", demo["tokenizer"], "--images", out], "--images is for annotation files"),
        (tiny_args(out, str(ann), str(tmp_path), demo["vision"], steps=1) + ["--resampled"],
         "options of streamed data"),
        (tiny_args(out, str(ann), features=str(feats), steps=1), "feature shards hold their captions"),
        (tiny_args(out, features=demo["vision"], steps=1), "needs that --data"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err
        assert not os.path.exists(out)
    # a stream without a recorded size needs --samples-per-epoch
    os.remove(os.path.join(os.path.dirname(demo["shards"][0]), "00000_stats.json"))
    try:
        assert main(base + ["--tokenizer", demo["tokenizer"]]) == 2
        assert "--samples-per-epoch is required" in capsys.readouterr().err
    finally:
        with open(os.path.join(os.path.dirname(demo["shards"][0]), "00000_stats.json"), "w") as fh:
            json.dump({"successes": PER}, fh)
