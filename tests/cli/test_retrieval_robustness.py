"""``blipfast retrieval`` at its edges (issue 17): a NaN image feature is named, metrics.json stays valid JSON (null)
and the exit code says "not finite"; duplicated images and empty captions are reported; damaged models and a
too-short --max-txt-len are messages; the help shows the defaults. The tiny gallery and model of
blipfast.testing.retrieval."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from blipfast import cli
from blipfast.data.features import FORMAT
from blipfast.options import EXIT_NOT_FINITE, EXIT_OK, EXIT_USAGE
from blipfast.testing.retrieval import VCFG, hf_retrieval_model, write_gallery, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    torch.manual_seed(0)
    ann, images = write_gallery(root, 4, [2])
    rows = json.loads(ann.read_text())
    rows.append(dict(rows[0]))  # image 0 listed twice
    rows[1]["caption"] = [rows[1]["caption"][0], " .!"]  # an empty caption after LAVIS' processing
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON lines: a row per line
    model = root / "model"
    hf_retrieval_model().save_pretrained(model)
    write_tokenizer(model)
    return {"root": root, "ann": ann, "images": images, "model": model, "names": [r["image"] for r in rows]}


def _features(folder, names, bad: str):
    """A one-shard feature cache (blipfast.data.features' format) of random tokens, NaN in image ``bad``."""
    folder.mkdir()
    tokens = (VCFG["image_size"] // VCFG["patch_size"]) ** 2 + 1
    keys = sorted(set(names))
    feats = torch.randn(len(keys), tokens, VCFG["hidden_size"])
    feats[keys.index(bad), 3, 5] = float("nan")
    save_file({"features": feats.contiguous()}, str(folder / "shard-00000.safetensors"))
    index = {"format": FORMAT, "dtype": "fp32", "tokens": tokens, "width": VCFG["hidden_size"], "skipped": {},
             "shards": [{"file": "shard-00000.safetensors", "images": keys}]}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def _run(tiny, out, *extra, model=None):
    return cli.main(["retrieval", "--data", str(tiny["ann"]), "--model", str(model or tiny["model"]), "--k", "2",
                     "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out), *extra])


def test_nan_features_are_named_and_metrics_json_is_valid(tiny, tmp_path, capsys):
    feats = _features(tmp_path / "feats", tiny["names"], bad="img_2.png")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _run(tiny, out, "--features", str(feats)) == EXIT_NOT_FINITE
    finally:
        os.umask(old)
    assert os.stat(out / "scores.safetensors").st_mode & 0o777 == 0o644  # safetensors alone writes 0600
    err = capsys.readouterr().err
    assert "the features of 1 image(s) are not finite" in err and "img_2.png" in err
    assert "ann.json:5: image 'img_0.png' is listed again (first at line 1)" in err
    assert "ann.json:2: caption(s) [2] of 2 are empty" in err
    info = json.loads((out / "metrics.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert info["metrics"]["txt_r1"] is None and info["nonfinite_images"] == ["img_2.png"]
    assert len(info["warnings"]) == 2
    # finite features: exit 0, the same warnings
    ok = _features(tmp_path / "ok", tiny["names"], bad="img_2.png")
    index = json.loads((ok / "index.json").read_text())
    save_file({"features": torch.randn(4, index["tokens"], index["width"])}, str(ok / "shard-00000.safetensors"))
    assert _run(tiny, tmp_path / "out2", "--features", str(ok)) == EXIT_OK
    assert isinstance(json.loads((tmp_path / "out2" / "metrics.json").read_text())["metrics"]["txt_r1"], float)


def test_bad_models_and_options_are_messages(tiny, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny["model"], broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:2000])
    args = ("--images", str(tiny["images"]))
    for model, extra, msg in ((broken, (), "cannot load a Blip2ForImageTextRetrieval"),
                              (None, ("--max-txt-len", "1"), "--max-txt-len must be >= 2"),
                              (None, ("--max-txt-len", "41"), "exceeds the model's max_position_embeddings (40)")):
        assert _run(tiny, tmp_path / "x", *args, *extra, model=model) == EXIT_USAGE, msg
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (msg, err)
    w.unlink()
    assert _run(tiny, tmp_path / "x", *args, model=broken) == EXIT_USAGE
    assert "cannot load" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for want in ("(default: LAVIS' 128 for BLIP-2, the model's k_test for BLIP: 256 as BLIP's COCO recipe)", "pass (default 1024)", "(default 64)", "(default 35, as LAVIS)",
                 "processes (default 4)", "(default: ./retrieval_out)", f"{EXIT_NOT_FINITE} image features"):
        assert want in text, want
