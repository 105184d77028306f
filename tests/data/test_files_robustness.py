"""The data layer at its edges (issue 17): an annotation line that is not UTF-8 is a skipped row named FILE:LINE
(JSON lines and a JSON list), a byte-order mark is not part of row 1; cache-features reads again an image it
skipped once its file changed (or with --retry-skipped); feature shards get the user's umask (safetensors writes
0600)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.data.annotations import read_annotations, read_gallery
from blipfast.data.features import FeatureCache, cache_features
from blipfast.testing.data import write_images, write_jsonl, write_vision

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _rows(n):
    return [json.dumps({"image": f"img/{i:04d}.png", "caption": f"a red circle {i}"}).encode() for i in range(n)]


def test_a_line_that_is_not_utf8_is_a_skipped_row_and_a_bom_is_ignored(tmp_path):
    rows = _rows(4)
    rows[2] = b'{"image": "img/0002.png", "caption": "caf\xe9 au lait"}'  # latin-1
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_bytes(BOM + b"\n".join(rows) + b"\n")
    ann = read_annotations(str(jsonl), check_images=False)
    col = rows[2].index(b"\xe9") + 1
    assert ann.lines == [1, 2, 4] and ann.bad == [f"{jsonl}:3: not valid UTF-8 (byte 0xe9 at column {col}) (skipped)"]
    listed = tmp_path / "ann.json"
    listed.write_bytes(BOM + b"[\n" + b",\n".join(rows) + b"\n]\n")
    ann = read_annotations(str(listed), check_images=False)
    assert ann.lines == [2, 3, 5] and ann.bad[0].startswith(f"{listed}:4: not valid UTF-8 (byte 0xe9")
    with pytest.raises(ValueError, match=":3: not valid UTF-8"):  # an evaluation never drops a row
        read_gallery(str(jsonl))
    # a caption holding U+2028 (a line separator for str.splitlines, valid inside JSON) stays one row
    jsonl.write_text(json.dumps({"image": "a.png", "caption": "two\u2028lines"}, ensure_ascii=False) + "\n")
    assert read_annotations(str(jsonl), check_images=False).captions == ["two\u2028lines"]


def test_cache_features_retries_a_skipped_image_whose_file_changed(tmp_path, umask_022):
    rows = write_images(str(tmp_path), 3)
    good = (tmp_path / rows[1]["image"]).read_bytes()
    (tmp_path / rows[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    data = write_jsonl(str(tmp_path / "ann.jsonl"), rows)
    vit = write_vision(str(tmp_path / "vit"))
    out = str(tmp_path / "feats")
    logs = []
    kw = dict(batch_size=4, num_workers=0, progress=False, device="cpu", log=logs.append)
    assert cache_features(data, str(tmp_path), vit, out, **kw)["skipped"] == 1
    assert cache_features(data, str(tmp_path), vit, out, **kw)["retried"] == 0  # unchanged: not read again
    assert cache_features(data, str(tmp_path), vit, out, **kw, retry_skipped=True)["skipped"] == 1
    (tmp_path / rows[1]["image"]).write_bytes(good)  # fixed
    c = cache_features(data, str(tmp_path), vit, out, **kw)
    assert (c["retried"], c["written"], c["skipped"], c["total_in_cache"]) == (1, 1, 0, 3)
    assert any("their file changed" in m for m in logs)
    cache = FeatureCache(out)
    assert rows[1]["image"] in cache and not cache.skipped
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name


def test_feature_shards_have_the_umask_mode(tmp_path, umask_022):
    from blipfast.data.feature_shards import FeatureShardWriter

    w = FeatureShardWriter(str(tmp_path / "shards"), shard_size=2)
    w.add("src", [0, 1], ["a", "b"], [0, 1], ["x", "y"], torch.randn(2, 3, 4))
    w.end_source("src")
    (name,) = [n for n in os.listdir(tmp_path / "shards") if n.endswith(".safetensors")]
    assert os.stat(tmp_path / "shards" / name).st_mode & 0o777 == 0o644
