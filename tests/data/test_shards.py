"""Shard specs (brace patterns, folders, list files, URLs), dataset sizes and image ids from sample keys."""
from __future__ import annotations

import json
import os

import pytest

from blipfast.data.shards import (dataset_size, expand_shards, is_remote, key_image_id, looks_like_shards,
                                  samples_per_epoch)

from tests.helpers.wds import write_shards

pytest.importorskip("webdataset")


@pytest.fixture
def shards(tmp_path):
    return write_shards(str(tmp_path), 3, 2)


def test_brace_pattern_folder_and_list_file_name_the_same_shards(tmp_path, shards):
    assert expand_shards(f"{tmp_path}/{{00000..00002}}.tar") == shards
    (tmp_path / "notes.txt").write_text("not a shard")
    assert expand_shards(str(tmp_path)) == shards
    lst = tmp_path / "sub" / "list.txt"
    lst.parent.mkdir()
    lst.write_text("# my shards\n\n../00000.tar\n" + shards[1] + "\npipe:cat " + shards[2] + "\n")
    got = expand_shards(str(lst))
    assert [os.path.normpath(u) for u in got[:2]] == shards[:2] and got[2] == "pipe:cat " + shards[2]
    assert expand_shards([shards[0], f"{tmp_path}/{{00001..00002}}.tar"]) == shards
    assert expand_shards(f"{shards[0]}::{shards[2]}") == [shards[0], shards[2]]


def test_urls_and_commands_are_not_checked_local_paths_are(tmp_path, shards):
    urls = ["https://host/data/{0..1}.tar", "pipe:aws s3 cp s3://b/x.tar -"]
    assert expand_shards(urls) == ["https://host/data/0.tar", "https://host/data/1.tar", urls[1]]
    assert is_remote("s3://b/x.tar") and is_remote("pipe:cat x") and not is_remote(shards[0])
    with pytest.raises(ValueError, match=r"--data: 2 of 4 shard\(s\) do not exist.*00004\.tar"):
        expand_shards(f"{tmp_path}/{{00001..00004}}.tar")
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="--data"):
            expand_shards(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        expand_shards(str(empty))
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="names no shards"):
        expand_shards(str(tmp_path / "blank.txt"))


def test_looks_like_shards_tells_shards_from_annotation_files(tmp_path, shards):
    (tmp_path / "a.jsonl").write_text('{"image": "x.jpg", "caption": "c"}\n')
    (tmp_path / "list.txt").write_text(shards[0] + "\n")
    (tmp_path / "other.txt").write_text("hello\n")
    assert looks_like_shards(str(tmp_path)) and looks_like_shards(shards[0]) and looks_like_shards(
        str(tmp_path / "list.txt")) and looks_like_shards("x/{000..009}.tar") and looks_like_shards("pipe:cat a")
    assert not looks_like_shards(str(tmp_path / "a.jsonl")) and not looks_like_shards(str(tmp_path / "other.txt"))
    assert not looks_like_shards(str(tmp_path / "sub-less")) and not looks_like_shards("")


def test_dataset_size_reads_sizes_json_len_or_img2dataset_stats(tmp_path, shards):
    assert dataset_size(shards) is None and dataset_size(["https://h/0.tar"]) is None
    for s, n in zip(shards, (7, 8, 9)):
        with open(s[:-4] + "_stats.json", "w") as fh:
            json.dump({"successes": n, "failed_to_download": 3}, fh)
    assert dataset_size(shards) == 24 and dataset_size(shards[1:]) == 17
    (tmp_path / "__len__").write_text("1000\n")
    assert dataset_size(shards) == 1000
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 5, "00001.tar": 6}))
    assert dataset_size(shards[:2]) == 11
    with pytest.raises(ValueError, match="no size for shard '00002.tar'"):
        dataset_size(shards)
    assert samples_per_epoch(shards[:2], None) == 11 and samples_per_epoch(shards, 4) == 4
    with pytest.raises(ValueError, match="--samples-per-epoch is required"):
        samples_per_epoch(["https://h/0.tar"], None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--samples-per-epoch must be"):
            samples_per_epoch(shards, bad)


def test_key_image_id():
    assert key_image_id("000010023") == 10023 and key_image_id("0") == 0
    h = key_image_id("images/cat_01")
    assert h == key_image_id("images/cat_01") and 0 <= h < 2**63 and h != key_image_id("images/cat_02")
    big = "9" * 30
    assert 0 <= key_image_id(big) < 2**63 and key_image_id("١٢") != 12  # non-ASCII digits are hashed
