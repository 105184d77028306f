"""Feature shards: written per rank and per source, resumable, indexed, streamed as (image, caption) pairs; the
fp8 (e4m3, per-token scale) storage error on ViT-like tokens; the ordered shard reader that feeds the writer."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from blipfast.data.feature_shards import (FeatureShards, FeatureShardWriter, decode, encode, feature_text_loader,
                                          write_index)
from blipfast.data.image_stream import ImageTextSource
from blipfast.data.stream import ShardReader

from tests.helpers.wds import number_tensor, raw_number, tokenize_lengths, write_shards


def vit_like(b: int, n: int = 257, width: int = 1408) -> torch.Tensor:
    """Pre-LayerNorm ViT tokens: per-token scales spread over ~2 decades and a few outlier channels ~30x the
    rest (as EVA / CLIP ViTs have), a CLS token larger than the patches."""
    x = torch.randn(b, n, width) * torch.exp(torch.randn(b, n, 1) * 0.8)
    out = torch.randperm(width)[:4]
    x[..., out] *= 30
    x[:, 0] *= 4
    return x


def test_fp8_storage_error_on_vit_like_tokens():
    x = vit_like(4)
    q, scale = encode(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1] and scale.dtype == torch.float32
    y = decode(q, scale, torch.float32)
    err = (y - x).abs()
    # e4m3 rounds to 3 mantissa bits: at most 2**-4 of a normal value, half a subnormal step (2**-10 of the
    # token's scale) below 2**-6
    assert (err <= x.abs() * 2**-4 + scale.unsqueeze(-1) * 2**-10 * 1.0001).all()
    rel = (err.norm() / x.norm()).item()
    per_token = (err.norm(dim=-1) / x.norm(dim=-1)).max().item()
    bf16 = ((x.bfloat16().float() - x).norm() / x.norm()).item()
    assert rel < 0.03 and per_token < 0.05, (rel, per_token)
    assert 4 < rel / bf16 < 16  # fp8 costs ~8x bf16's rounding (3 mantissa bits against 7)
    assert encode(torch.zeros(2, 3, 8), "fp8")[1].eq(1).all()  # an all-zero token: a finite scale, zeros back
    assert decode(*encode(torch.zeros(2, 3, 8), "fp8")).eq(0).all()
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)  # the CPU table
    torch.testing.assert_close(decode(every, torch.ones(()), torch.float32), every.float(), rtol=0, atol=0,
                               equal_nan=True)
    with pytest.raises(ValueError, match="--dtype must be one of"):
        encode(x, "int8")


def _write(out, dtype, rank=0, sources=("a", "b"), rows=5, shard_size=3, start=0, meta=None):
    """Rows ``start..start+rows-1`` of each source, in batches of 2, each image with 1 to 3 captions."""
    w = FeatureShardWriter(out, rank=rank, dtype=dtype, shard_size=shard_size, meta=meta or {"vision": "tiny"})
    data = {}
    for src in sources:
        for lo in range(start, start + rows, 2):
            offs = list(range(lo, min(lo + 2, start + rows)))
            keys = [f"{src}{rank}-{o:04d}" for o in offs]
            caps = [[f"caption {j} of {k}" for j in range(1 + o % 3)] for k, o in zip(keys, offs)]
            tok = torch.randn(len(offs), 5, 8, dtype=torch.float32)
            w.add(f"shard-{src}.tar", offs, keys, [100 * rank + o for o in offs], caps, tok)
            data.update({k: (tok[i], caps[i], 100 * rank + offs[i]) for i, k in enumerate(keys)})
        w.end_source(f"shard-{src}.tar")
    w.close()
    return data


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp8"])
def test_feature_shards_stream_every_pair_with_its_tokens(tmp_path, dtype):
    out = str(tmp_path / "feats")
    data = {**_write(out, dtype, rank=0), **_write(out, dtype, rank=1, sources=("c",))}
    index = write_index(out)
    shards = FeatureShards(out)
    assert (shards.dtype, shards.tokens, shards.width, shards.meta) == (dtype, 5, 8, {"vision": "tiny"})
    pairs = sum(len(c) for _, c, _ in data.values())
    assert (shards.images, shards.pairs, len(shards.urls)) == (15, pairs, len(index["shards"]))
    assert all(os.path.basename(u).startswith(("r00000-", "r00001-")) for u in shards.urls)
    assert pairs % 3 == 0
    ld = feature_text_loader(out, tokenize=tokenize_lengths, batch_size=3, shuffle_buffer=5, text_transform=None,
                             dtype=torch.float32, with_keys=True)
    seen = Counter()
    it = iter(ld)
    for _ in range(pairs // 3):  # one pass: every (image, caption) pair once
        b = next(it)
        for i, key in enumerate(b["__key__"]):
            tok, caps, image_id = data[key]
            q, scale = encode(tok, dtype)
            assert torch.equal(b["image_embeds"][i], decode(q, scale, torch.float32))
            assert b["image_id"][i].item() == image_id
            assert b["input_ids"][i].item() in {len(c) for c in caps}
            seen[key] += 1
    assert seen == Counter({k: len(c) for k, (_, c, _) in data.items()})
    raw = next(iter(feature_text_loader(out, tokenize=tokenize_lengths, batch_size=4, dtype=None, with_keys=True)))
    for i, key in enumerate(raw["__key__"]):  # as stored, decoded later (on the device)
        q, scale = encode(data[key][0], dtype)
        assert raw["image_embeds"].dtype == q.dtype and torch.equal(raw["image_embeds"][i].view(torch.uint8),
                                                                      q.view(torch.uint8))
        assert ("image_scale" in raw) == (dtype == "fp8")
        assert dtype != "fp8" or torch.equal(raw["image_scale"][i], scale)


def test_a_rank_resumes_per_shard_and_refuses_other_settings(tmp_path):
    out = str(tmp_path)
    w = FeatureShardWriter(out, rank=2, dtype="fp8", shard_size=4, meta={"vision": "v"})
    assert w.resume_offset("s.tar") == 0
    tok = torch.randn(10, 3, 4)
    for lo in (0, 3, 6):  # rows 0-5 reach shard_size at the second batch and are written; 6-8 are lost
        w.add("s.tar", list(range(lo, lo + 3)), [f"k{i}" for i in range(lo, lo + 3)], list(range(lo, lo + 3)),
              [f"c{i}" for i in range(lo, lo + 3)], tok[lo:lo + 3])
    del w  # killed: no close()
    w = FeatureShardWriter(out, rank=2, dtype="fp8", shard_size=4, meta={"vision": "v"})
    assert w.resume_offset("s.tar") == 6 and w.resume_offset("t.tar") == 0
    w.add("s.tar", [6, 7, 8, 9], [f"k{i}" for i in range(6, 10)], list(range(6, 10)), [f"c{i}" for i in range(6, 10)],
          tok[6:])
    w.end_source("s.tar")
    assert w.resume_offset("s.tar") is None
    index = write_index(out)
    assert [s["images"] for s in index["shards"]] == [6, 4] and index["images"] == 10
    from safetensors import safe_open

    keys = []
    for u in FeatureShards(out).urls:
        with safe_open(u, "pt") as f:
            keys += json.loads(f.metadata()["keys"])
    assert keys == [f"k{i}" for i in range(10)]
    for kw, what in (({"dtype": "bf16", "meta": {"vision": "v"}}, "another dtype"),
                     ({"dtype": "fp8", "meta": {"vision": "w"}}, "another meta")):
        with pytest.raises(ValueError, match=what):
            FeatureShardWriter(out, rank=2, shard_size=4, **kw)
    FeatureShardWriter(out, rank=3, dtype="bf16", meta={"vision": "v"}).add(
        "u.tar", [0], ["x"], [0], ["c"], torch.randn(1, 3, 4))  # buffered, never written: rank 3 has no shard
    assert write_index(out)["images"] == 10
    FeatureShardWriter(out, rank=4, dtype="bf16", meta={"vision": "v"}).close()  # a rank without rows
    w = FeatureShardWriter(out, rank=5, dtype="bf16", meta={"vision": "v"})
    w.add("u.tar", [0], ["x"], [0], ["c"], torch.randn(1, 3, 4))
    w.end_source("u.tar")
    with pytest.raises(ValueError, match="ranks of .* wrote features with different dtype"):
        write_index(out)


def test_writer_input_errors(tmp_path):
    w = FeatureShardWriter(str(tmp_path), dtype="bf16")
    cases = [((["s", [0], ["k"], [0], ["c"], torch.randn(3, 4)]), "tokens must be a float tensor"),
             ((["s", [0], ["k"], [0], ["c"], torch.ones(1, 3, 4, dtype=torch.int64)]), "tokens must be a float"),
             ((["s", [0, 1], ["k"], [0], ["c"], torch.randn(1, 3, 4)]), "offsets: 2 entries for 1 rows"),
             ((["s", [0], ["k"], [0], ["c"], torch.full((1, 3, 4), float("nan"))]), "non-finite values")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            w.add(*args)
    w.add("s", [0], ["k"], [0], ["c"], torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match=r"tokens: \[3, 5\] per row"):
        w.add("s", [1], ["k"], [0], ["c"], torch.randn(1, 3, 5))
    for kw, msg in (({"dtype": "fp4"}, "--dtype"), ({"shard_size": 0}, "--shard-size")):
        with pytest.raises(ValueError, match=msg):
            FeatureShardWriter(str(tmp_path / "x"), **kw)
    with pytest.raises(ValueError, match="no index.json"):
        FeatureShards(str(tmp_path))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no rank"):
        write_index(str(tmp_path / "empty"))


def test_a_broken_feature_shard_is_skipped_not_a_crash(tmp_path, capfd):
    out = str(tmp_path)
    data = _write(out, "bf16", sources=("a", "b"), rows=4, shard_size=100)
    write_index(out)
    urls = FeatureShards(out).urls
    open(urls[0], "wb").write(b"broken")
    ld = feature_text_loader(out, tokenize=tokenize_lengths, batch_size=1, shuffle_buffer=1, text_transform=None,
                             with_keys=True)
    it = iter(ld)
    b_pairs = sum(len(data[k][1]) for k in data if k.startswith("b"))
    keys = [next(it)["__key__"][0] for _ in range(b_pairs + 1)]  # a pass and the first pair of the next
    assert set(keys) == {k for k in data if k.startswith("b")} and ld.bad_samples >= 1
    assert f"skipped a part of shard {urls[0]}: unreadable feature shard" in capfd.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_reader_reads_each_job_in_order_from_its_offset(tmp_path, workers):
    pytest.importorskip("webdataset")
    urls = write_shards(str(tmp_path), 3, [5, 4, 6])
    jobs = [(urls[0], 0), (urls[1], 3), (urls[2], 6)]  # the third is done already: only its end marker comes
    source = ImageTextSource(None, number_tensor, image_decoder=raw_number, text_transform=None)
    rows = {}
    ends = []
    for b in DataLoader(ShardReader(jobs, source, batch_size=2), batch_size=None, num_workers=workers,
                        collate_fn=lambda x: x):
        rows.setdefault(b["__source__"], []).extend(zip(b["__offsets__"], b.get("__key__", [])))
        assert b.get("caption", []) == [f"caption of sample {int(k)}" for k in b.get("__key__", [])]
        if b["__end__"]:
            ends.append(b["__source__"])
    assert sorted(ends) == sorted(urls)
    assert rows[urls[0]] == [(o, f"{o:09d}") for o in range(5)]
    assert rows[urls[1]] == [(o, f"{5 + o:09d}") for o in (3,)]
    assert rows.get(urls[2], []) == []
