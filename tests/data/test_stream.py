"""The shard stream: split by process and worker, shuffled, deterministic, resumable, and robust to bad samples.

Shards hold raw 4-byte "images" (the sample number) decoded by a test decoder, so every batch can be checked
against its keys; the bad-sample test uses real 1x1 PNGs and PIL.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from blipfast.data.image_stream import ImageTextSource, image_text_loader
from blipfast.data.stream import BadSamples, ShardStream, StreamLoader

from tests.helpers.wds import (number_tensor, png_bytes, raw_number, sample_files, tokenize_lengths, write_shard,
                          write_shards)

pytest.importorskip("webdataset")


def loader(urls, **kw):
    kw.setdefault("batch_size", 4)
    return image_text_loader(urls, tokenize=tokenize_lengths, image_transform=number_tensor,
                             image_decoder=raw_number, text_transform=None, with_keys=True, **kw)


def take(ld, n: int) -> list:
    """The keys of the next ``n`` batches, each batch checked against its keys."""
    out = []
    it = iter(ld)
    for _ in range(n):
        b = next(it)
        nums = [int(k) for k in b["__key__"]]
        assert b["pixel_values"].flatten().tolist() == nums
        assert b["image_id"].tolist() == nums and b["image_id"].dtype == torch.int64
        assert b["input_ids"].flatten().tolist() == [len(f"caption of sample {k}") for k in nums]
        out.append(b["__key__"])
    return out


def flat(batches) -> list:
    return [k for b in batches for k in b]


def test_every_pass_reads_every_sample_once_split_over_processes_and_workers(tmp_path):
    urls = write_shards(str(tmp_path), 8, 5)  # 40 samples, 4 logical workers x 2 shards x 5 samples
    everything = {f"{k:09d}" for k in range(40)}
    passes = [[], []]
    for rank in range(4):  # four processes of one worker each
        keys = flat(take(loader(urls, rank=rank, world=4, batch_size=5, shuffle_buffer=4), 4))
        passes[0] += keys[:10]
        passes[1] += keys[10:]
    assert Counter(passes[0]) == Counter(everything) and Counter(passes[1]) == Counter(everything)
    assert passes[0] != passes[1]  # another shard order and buffer draws in the second pass
    both = []
    for rank in range(2):  # two processes of two DataLoader workers each
        both += flat(take(loader(urls, rank=rank, world=2, num_workers=2, batch_size=5, shuffle_buffer=4), 4))
    assert Counter(both) == Counter(everything)


def test_same_arguments_same_batches_another_seed_another_order(tmp_path):
    urls = write_shards(str(tmp_path), 4, 6)
    a = take(loader(urls, seed=3, shuffle_buffer=5), 6)
    assert take(loader(urls, seed=3, shuffle_buffer=5), 6) == a
    b = take(loader(urls, seed=4, shuffle_buffer=5), 6)
    assert b != a and sorted(flat(b)) == sorted(flat(a))
    assert flat(take(loader(urls, shuffle_buffer=1), 6)) != sorted(flat(a))  # the shard order is shuffled too
    resampled = flat(take(loader(urls, resampled=True, shuffle_buffer=5), 12))
    assert max(Counter(resampled).values()) > 1  # shards drawn with replacement: 48 draws from 24 samples


@pytest.mark.parametrize("resampled,workers", [(False, 2), (True, 2), (False, 0)])
def test_a_resumed_stream_continues_exactly(tmp_path, resampled, workers):
    """Interrupted after k batches (before the first snapshot, between snapshots, in a buffer drain at a pass
    end, twice in a row) and resumed from the JSON state: the batches of one uninterrupted run."""
    urls = write_shards(str(tmp_path), 6, [7, 5, 9, 4, 6, 8])
    files = []
    for k in (100, 101):
        files += sample_files(f"{k:09d}", k)
    write_shard(str(tmp_path / "extra.tar"), files + [("000000102.jpg", (102).to_bytes(4, "little"))])  # no caption
    urls.append(str(tmp_path / "extra.tar"))
    kw = dict(num_workers=workers, batch_size=3, shuffle_buffer=6, snapshot_every=2, resampled=resampled, seed=11)
    total = 40
    ref_loader = loader(urls, **kw)
    ref = take(ref_loader, total)
    assert ref_loader.bad_samples > 0
    # (each DataLoader with workers starts processes: fewer cuts there)
    for cuts in ([1], [5, 6], [13, 30]) if workers else ([1], [3], [5], [8, 9], [13, 14, 30], [20, 27]):
        got, state, done = [], None, 0
        for cut in cuts + [total]:
            ld = loader(urls, state=state, **kw)
            got += take(ld, cut - done)
            state, done = json.loads(json.dumps(ld.state_dict())), cut
        assert got == ref, cuts
        assert ld.bad_samples == ref_loader.bad_samples


def test_resume_refuses_another_stream(tmp_path):
    urls = write_shards(str(tmp_path), 4, 3)
    ld = loader(urls, seed=1)
    take(ld, 2)
    state = ld.state_dict()
    with pytest.raises(ValueError, match=r"--resume: .*seed \(1, now 2\)"):
        loader(urls, seed=2, state=state)
    with pytest.raises(ValueError, match=r"--resume: .*num_workers"):
        loader(urls, seed=1, num_workers=2, state=state)
    with pytest.raises(ValueError, match=r"--resume: .*shards"):
        loader(urls[:3], seed=1, state=state)
    with pytest.raises(ValueError, match="no data-stream position"):
        loader(urls, seed=1, state={"step": 3})


def _pixel(im):
    return torch.tensor(im.getpixel((0, 0)), dtype=torch.uint8)


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, capfd):
    png, txt = png_bytes(7), b"a photo"
    a = [("000000000.png", png), ("000000000.txt", txt),
         ("000000001.txt", txt),                                     # no image
         ("000000002.png", png),                                     # no caption
         ("000000003.png", b"\x89PNG not really"), ("000000003.txt", txt),  # an image that does not decode
         ("000000004.webp", png), ("000000004.txt", b"  "),          # an empty caption
         ("000000005.png", png), ("000000005.json", json.dumps({"caption": "from json", "url": "u"}).encode()),
         ("000000006.png", png), ("000000006.png", png), ("000000006.txt", txt),  # a file twice: reported, kept once
         ("000000007.png", png)]                                     # its caption is in the next shard
    b = [("000000007.txt", txt), ("000000008.jpg", png), ("000000008.txt", txt)]
    c = [("000000009.png", png), ("000000009.txt", txt), ("000000010.png", png * 40), ("000000010.txt", txt)]
    paths = [str(tmp_path / f"{n}.tar") for n in "abcd"]
    for p, files in zip(paths, (a, b, c)):
        write_shard(p, files)
    data = open(paths[2], "rb").read()
    open(paths[2], "wb").write(data[:512 * 5 + 100])  # truncated in the middle of sample 10's image
    open(paths[3], "wb").write(b"this is not a tar file" * 30)
    urls = paths + ["pipe:exit 3"]
    stream = ShardStream(urls, ImageTextSource(tokenize_lengths, _pixel, text_transform=None), batch_size=1,
                         shuffle=False)
    ld = StreamLoader(stream, with_keys=True)
    it = iter(ld)
    batches = [next(it) for _ in range(5)]
    assert [b["__key__"][0] for b in batches] == ["000000000", "000000005", "000000006", "000000008", "000000009"]
    assert all(b["pixel_values"].tolist() == [[7, 7, 7]] for b in batches)
    assert batches[1]["input_ids"].tolist() == [[len("from json")]]
    err = capfd.readouterr().err
    expected = {"000000001": "no image (looked for .jpg, .png, .webp)", "000000002": "no caption (looked for "
                ".txt, .json['caption'])", "000000003": "cannot decode .png: UnidentifiedImageError",
                "000000004": "empty caption", "000000007": "no caption"}
    for key, why in expected.items():
        assert f"skipped sample '{key}' of shard {paths[0]}: {why}" in err, (key, why)
    assert f"skipped a part of shard {paths[0]}: ValueError: 000000006.png: duplicate file name" in err
    assert f"skipped sample '000000007' of shard {paths[1]}: no image" in err
    assert f"skipped a part of shard {paths[2]}: ReadError: unexpected end of data (after member " \
           f"'000000009.txt')" in err  # reported once
    assert ld.bad_samples == 8
    assert next(it)["__key__"] == ["000000000"]  # the second pass: after the foreign and failing shards
    err = capfd.readouterr().err
    assert f"skipped a part of shard {paths[3]}: ReadError: invalid header (at its start)" in err
    assert "skipped a part of shard pipe:exit 3: " in err  # (the words depend on when the exit is seen)
    assert ld.bad_samples == 10


def test_bad_sample_warnings_are_rate_limited(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("blipfast.data.stream.time.monotonic", lambda: clock[0])
    report = BadSamples(burst=2, every=60.0)
    for i in range(5):
        report("s.tar", f"k{i}", "no image", i + 1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "'k0'" in lines[0] and "'k1'" in lines[1]
    clock[0] += 61
    report("s.tar", "k5", "no caption", 6)
    line = capsys.readouterr().err
    assert "'k5' of shard s.tar: no caption (6 skipped by this worker; 3 more not shown)" in line


def test_a_stream_without_usable_samples_fails_with_a_clear_error(tmp_path):
    urls = write_shards(str(tmp_path), 2, 3)
    source = ImageTextSource(tokenize_lengths, number_tensor, image_decoder=raw_number, image_key="webp")
    with pytest.raises(ValueError, match=r"5 samples in a row could not be used .*no image.*--image-key"):
        next(iter(StreamLoader(ShardStream(urls, source, batch_size=2, max_bad_run=5))))
    empty = str(tmp_path / "empty.tar")
    write_shard(empty, [])
    with pytest.raises(ValueError, match="shard.* in a row hold no sample"):
        next(iter(loader([empty, empty])))
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 process\(es\) x 2 loader worker\(s\)"):
        loader(urls + urls[:1], world=2, num_workers=2)
    loader(urls + urls[:1], world=2, num_workers=2, resampled=True)  # resampling needs no shard per worker
    for kw, msg in (({"batch_size": 0}, "batch_size"), ({"rank": 2, "world": 2}, "rank must be < world"),
                    ({"shuffle_buffer": -1}, "shuffle_buffer"), ({"caption_key": ";"}, "--caption-key")):
        with pytest.raises(ValueError, match=msg):
            loader(urls, **kw)


def test_pipe_commands_and_list_files_stream_like_local_shards(tmp_path):
    urls = write_shards(str(tmp_path), 3, 4)
    lst = tmp_path / "shards.txt"
    lst.write_text("".join(f"pipe:cat {u}\n" for u in urls))
    assert take(loader(str(lst), shuffle_buffer=3), 8) == take(loader(f"{tmp_path}/{{00000..00002}}.tar",
                                                                      shuffle_buffer=3), 8)
