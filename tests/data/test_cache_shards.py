"""``blipfast cache-features`` on WebDataset shards: each rank caches its slice of the input shards, resumes per
shard after an interruption, the last rank to finish writes the index; the stored tokens are the vision tower's;
bad samples are skipped and counted; ``--gpu-decode``'s CPU fallback gives the pixels of the processor's torchvision
backend bit for bit, within a few 8-bit levels of the PIL path the references take (the CUDA path is a GPU test)."""
from __future__ import annotations

import io
import json
import os
from collections import Counter

import pytest
import torch

from blipfast.data.cache_shards import cache_feature_shards
from blipfast.data.feature_shards import FeatureShards, decode
from blipfast.testing.shards import sample_files, write_shards, write_tar

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blipfast.testing.data import write_vision

    root = tmp_path_factory.mktemp("cache-shards")
    paths = write_shards(str(root / "shards"), 4, 5)
    return {"paths": paths, "spec": str(root / "shards" / "{00000..00003}.tar"),
            "vision": write_vision(str(root / "vit")), "keys": {f"{s:05d}{i:04d}" for s in range(4) for i in range(5)}}


def _cache(data, out, **kw):
    kw = {"batch_size": 2, "shard_size": 3, "dtype": "fp32", "device": "cpu", "progress": False,
          "log": lambda m: None, **kw}
    return cache_feature_shards(kw.pop("spec", data["spec"]), data["vision"], out, **kw)


def _rows(out) -> dict:
    """{key: (tokens fp32, captions, image id)} of every row of the feature shards in ``out``."""
    from safetensors import safe_open

    rows = {}
    for url in FeatureShards(out).urls:
        with safe_open(url, framework="pt") as f:
            meta = f.metadata()
            tok = decode(f.get_tensor("tokens"), f.get_tensor("scale") if "scale" in f.keys() else None,
                         torch.float32)
            for k, c, i, t in zip(json.loads(meta["keys"]), json.loads(meta["captions"]),
                                  f.get_tensor("image_id").tolist(), tok):
                assert k not in rows, f"{k} written twice"
                rows[k] = (t, c, i)
    return rows


def _reference_tokens(data, key: str) -> torch.Tensor:
    """The tower's tokens of sample ``key``'s image through its processor (PIL), computed here."""
    import tarfile

    from PIL import Image

    from blipfast.data.vision import load_vision_tower, preprocess

    tower, processor = load_vision_tower(data["vision"])
    with tarfile.open(data["paths"][int(key[:5])]) as tf:
        img = Image.open(io.BytesIO(tf.extractfile(f"{key}.jpg").read())).convert("RGB")
    with torch.no_grad():
        return tower(preprocess(processor, img)[None])[0]


def test_ranks_split_the_shards_the_last_one_writes_the_index(data, tmp_path):
    out = str(tmp_path / "feats")
    first = _cache(data, out, rank=1, world=2)  # rank 1 first: input shards 1 and 3
    assert (first["input_shards"], first["written"]) == (2, 10) and "index" not in first
    assert not os.path.exists(os.path.join(out, "index.json"))
    last = _cache(data, out, rank=0, world=2, num_workers=2)
    index = last["index"]
    assert (index["images"], index["pairs"], index["dtype"]) == (20, 20, "fp32")
    assert {s["file"][:6] for s in index["shards"]} == {"r00000", "r00001"}
    rows = _rows(out)
    assert set(rows) == data["keys"]
    key = "000020003"
    torch.testing.assert_close(rows[key][0], _reference_tokens(data, key), rtol=1e-5, atol=1e-5)
    assert rows[key][2] == 20003 and rows[key][1][0].startswith("a ")  # the raw caption, a list per image
    # a rerun finds everything done and rewrites the index; another world size is refused
    again = _cache(data, out, rank=0, world=2)
    assert (again["already_done"], again["written"]) == (2, 0) and again["index"]["images"] == 20
    with pytest.raises(ValueError, match="another meta"):
        _cache(data, out, rank=0, world=3)


def test_an_interrupted_rank_resumes_per_shard(data, tmp_path, monkeypatch):
    import blipfast.data.vision as vision

    out = str(tmp_path / "feats")
    real = vision.load_vision_tower

    def failing(*a, **kw):  # the tower fails on its 6th batch: shard 0 done, 4 rows of shard 1 written
        tower, proc = real(*a, **kw)
        calls = [0]
        forward = tower.forward

        def fwd(px):
            calls[0] += 1
            if calls[0] == 6:
                raise RuntimeError("node lost")
            return forward(px)

        tower.forward = fwd
        return tower, proc

    monkeypatch.setattr(vision, "load_vision_tower", failing)
    with pytest.raises(RuntimeError, match="node lost"):
        _cache(data, out, dtype="bf16")
    monkeypatch.setattr(vision, "load_vision_tower", real)
    progress = json.load(open(os.path.join(out, "rank-00000.json")))
    assert [(s["next"], s["done"]) for s in progress["sources"].values()] == [(5, True), (4, False)]
    done = _cache(data, out, dtype="bf16")
    assert done["written"] < 20 and done["index"]["images"] == 20
    assert set(_rows(out)) == data["keys"]  # each image once


def test_bad_samples_are_skipped_counted_and_named(data, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    import tarfile

    with tarfile.open(data["paths"][0]) as tf:
        jpeg = tf.extractfile("000000000.jpg").read()
    files = sample_files("k0", jpeg, "a good one", 32, 32) + [("k1.jpg", b"\xff\xd8\xffbroken"), ("k1.txt", b"x")]
    files += [("k2.jpg", jpeg)]  # no caption
    write_tar(str(folder / "00000.tar"), files)
    for gpu_decode in (False, True):
        out = str(tmp_path / f"feats-{gpu_decode}")
        counts = _cache(data, out, spec=str(folder / "00000.tar"), gpu_decode=gpu_decode)
        assert (counts["written"], counts["bad_samples"]) == (1, 2)
        assert set(_rows(out)) == {"k0"}
    err = capsys.readouterr().err
    assert "sample 'k1'" in err and "sample 'k2'" in err and "00000.tar" in err


def test_gpu_decode_cpu_fallback_is_the_torchvision_backend_near_the_pil_path(data, tmp_path):
    """The decoder's pixels are the torchvision backend's on the decoded image bit for bit; the PIL backend (what
    the default path and the references use) differs by resampling only: a few 8-bit levels; the cached tokens of
    both paths are close."""
    import tarfile

    from PIL import Image

    from blipfast.data.gpu_decode import BatchImageDecoder
    from blipfast.data.vision import load_image_processor

    tv = load_image_processor(data["vision"], backend="torchvision")
    pil = load_image_processor(data["vision"])
    assert "Pil" in type(pil).__name__ and "Pil" not in type(tv).__name__
    with tarfile.open(data["paths"][0]) as tf:
        jpegs = [tf.extractfile(f"00000{i:04d}.jpg").read() for i in range(3)]
    got, kept, errors = BatchImageDecoder(tv, "cpu")(jpegs)
    assert kept == [0, 1, 2] and not errors
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    assert torch.equal(got, tv(images=images, return_tensors="pt")["pixel_values"].float())
    step = 1 / 255 / min(pil.image_std)  # one 8-bit level after normalisation
    diff = (got - pil(images=images, return_tensors="pt")["pixel_values"]).abs().max().item()
    assert 0 < diff <= 8 * step, diff
    a, b = str(tmp_path / "pil"), str(tmp_path / "decode")
    _cache(data, a)
    _cache(data, b, gpu_decode=True)
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        torch.testing.assert_close(ra[k][0], rb[k][0], atol=0.1, rtol=0.1, msg=k)


def test_the_command_writes_feature_shards_and_refuses_what_does_not_fit(data, tmp_path, capsys):
    from blipfast.cli import main

    out = str(tmp_path / "feats")
    base = ["cache-features", "--vision", data["vision"], "--out", out, "--no-progress", "--device", "cpu",
            "--num-workers", "0"]
    assert main(base + ["--data", data["spec"], "--dtype", "fp8"]) == 0
    assert "20 image(s) written" in capsys.readouterr().out
    shards = FeatureShards(out)
    assert (shards.dtype, shards.images) == ("fp8", 20)
    assert Counter(os.path.basename(u)[:6] for u in shards.urls) == Counter({"r00000": len(shards.urls)})
    for extra, msg in ((["--data", data["spec"], "--images", str(tmp_path)], "--images is for annotation files"),
                       (["--data", str(tmp_path / "a.jsonl")], "--images DIR is needed"),
                       (["--data", str(tmp_path / "a.jsonl"), "--images", str(tmp_path), "--dtype", "fp8"],
                        "--dtype fp8 is for WebDataset shards")):
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_decode_on_cuda_is_close_to_the_cpu_decoders():
    """nvJPEG and libjpeg-turbo may round the IDCT differently: the pixels agree to a couple of 8-bit levels."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import numpy as np
    from PIL import Image
    from transformers import BlipImageProcessor

    from blipfast.data.gpu_decode import BatchImageDecoder

    rng = np.random.default_rng(0)
    datas = []
    for h, w in ((300, 400), (224, 224), (517, 333)):
        arr = (rng.random((h, w, 3)) * 64 + np.linspace(0, 190, w)[None, :, None]).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        datas.append(buf.getvalue())
    datas.append(b"\xff\xd8\xffbroken")
    proc = BlipImageProcessor(size={"height": 364, "width": 364})
    gpu, kept, errors = BatchImageDecoder(proc, "cuda")(datas)
    cpu, kept_cpu, _ = BatchImageDecoder(proc, "cpu")(datas)
    assert kept == kept_cpu == [0, 1, 2] and list(errors) == [3] and gpu.is_cuda
    diff = (gpu.cpu() - cpu).abs() * torch.tensor(proc.image_std).view(1, 3, 1, 1) * 255  # in 8-bit levels
    assert diff.max() <= 4 and diff.mean() <= 0.5, (diff.max(), diff.mean())
