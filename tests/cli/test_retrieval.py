"""Retrieval evaluation: recall@K (a hand-checked gallery, LAVIS' _report_metrics transcribed with numpy), the
annotation/feature readers and ``blipfast retrieval`` end to end on a gallery, model and feature cache written here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from blipfast import Blip2Retrieval, Blip2Stage1, cli, convert
from blipfast.retrieval import format_metrics, load_features, pre_caption, read_annotations, recall_at_k, tokenize
from blipfast.testing.retrieval import VCFG, hf_retrieval_model, stage1_config, write_gallery, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


def lavis_report_metrics(scores_i2t, scores_t2i, txt2img, img2txt):
    """LAVIS RetrievalTask._report_metrics (numpy, argsort per row)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < r)[0]) / len(ranks) for r in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < r)[0]) / len(ranks) for r in (1, 5, 10)]
    out = dict(zip(("txt_r1", "txt_r5", "txt_r10"), tr), **dict(zip(("img_r1", "img_r5", "img_r10"), ir)))
    out["txt_r_mean"], out["img_r_mean"] = sum(tr) / 3, sum(ir) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out


def test_recall_hand_checked():
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    s_i2t = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],   # best caption 0.9, first: rank 0
                          [0.5, 0.6, 0.1, 0.7, 0.9, 0.2],   # best caption 0.7, text 4 above it: rank 1
                          [0.9, 0.8, 0.7, 0.6, 0.1, 0.05]])  # best caption 0.1, four above: rank 4
    s_t2i = torch.tensor([[0.2, 0.5, 0.1],   # rank 1
                          [0.9, 0.1, 0.2],   # rank 0
                          [0.3, 0.3, 0.1],   # tie with image 0 counts against it: rank 1
                          [0.1, 0.8, 0.2],   # rank 0
                          [0.1, 0.2, 0.3],   # rank 0
                          [0.4, 0.5, 0.3]])  # rank 2
    m = recall_at_k(s_i2t, s_t2i, img2txt, txt2img)
    expect = {"txt_r1": 100 / 3, "txt_r5": 100.0, "txt_r10": 100.0, "txt_r_mean": 700 / 9,
              "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 250 / 3,
              "r_mean": (700 / 9 + 250 / 3) / 2, "agg_metrics": 700 / 9}
    assert m.keys() == expect.keys()
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
    # dicts keyed by index (LAVIS' dataset attributes), numpy and tensors give the same
    m2 = recall_at_k(s_i2t.numpy(), s_t2i.numpy(), dict(enumerate(img2txt)), torch.tensor(txt2img))
    assert m2 == m
    table = format_metrics(m)
    assert "image -> text" in table and "33.33" in table and "80.56" in table


def test_recall_equals_lavis_on_random_galleries():
    g = torch.Generator().manual_seed(0)
    for n_img, caps in ((7, 1), (30, 5), (12, 3)):
        n_txt = n_img * caps
        img2txt = [list(range(i * caps, (i + 1) * caps)) for i in range(n_img)]
        txt2img = [t // caps for t in range(n_txt)]
        perm = torch.randperm(n_txt, generator=g)  # captions not in image order
        img2txt = [[int(perm[t]) for t in c] for c in img2txt]
        txt2img = [0] * n_txt
        for i, c in enumerate(img2txt):
            for t in c:
                txt2img[t] = i
        s_i2t = torch.randn(n_img, n_txt, generator=g, dtype=torch.float64)
        s_t2i = torch.randn(n_txt, n_img, generator=g, dtype=torch.float64)
        ours = recall_at_k(s_i2t, s_t2i, img2txt, txt2img)
        ref = lavis_report_metrics(s_i2t.numpy(), s_t2i.numpy(), txt2img, img2txt)
        for k in ref:
            assert ours[k] == pytest.approx(ref[k], abs=1e-9), (n_img, caps, k)


def test_recall_nan_and_errors():
    s_i2t, s_t2i = torch.rand(3, 6), torch.rand(6, 3)
    img2txt, txt2img = [[0, 1], [2, 3], [4, 5]], [0, 0, 1, 1, 2, 2]
    bad = s_i2t.clone()
    bad[1, 0] = float("nan")
    m = recall_at_k(bad, s_t2i, img2txt, txt2img)
    assert math.isnan(m["txt_r1"]) and math.isnan(m["r_mean"]) and not math.isnan(m["img_r1"])
    with pytest.raises(ValueError, match="score_t2i"):
        recall_at_k(s_i2t, s_t2i[:, :2], img2txt, txt2img)
    with pytest.raises(ValueError, match="img2txt"):
        recall_at_k(s_i2t, s_t2i, img2txt[:2], txt2img)
    with pytest.raises(ValueError, match="img2txt"):
        recall_at_k(s_i2t, s_t2i, [[0], [1], [9]], txt2img)
    with pytest.raises(ValueError, match="txt2img"):
        recall_at_k(s_i2t, s_t2i, img2txt, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="score_i2t"):
        recall_at_k(torch.ones(3, 6, dtype=torch.long), s_t2i, img2txt, txt2img)


def test_annotations_and_captions(tmp_path):
    assert pre_caption('A Dog, "running"!!  on the   GRASS.\n') == "a dog, running on the grass"
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    ann = [{"image": "a.jpg", "caption": ["One.", "Two!"]}, {"image": "b.jpg", "caption": "Three"}]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(e) for e in ann))
    for name in ("a.json", "a.jsonl"):
        g = read_annotations(tmp_path / name)
        assert g.images == ["a.jpg", "b.jpg"] and g.texts == ["one", "two", "three"]
        assert g.img2txt == [[0, 1], [2]] and g.txt2img == [0, 0, 1]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(ValueError, match="caption"):
        read_annotations(tmp_path / "bad.json")


def _write_features(folder, names, feats, shards=2):
    """A feature cache in the format of `blipfast cache-features` (blipfast.data.features): safetensors shards of
    [rows, L, width] bf16 tokens named "features", rows in another order than the annotation, and index.json."""
    from blipfast.data.features import FORMAT

    folder.mkdir()
    order = list(reversed(range(len(names))))
    per = math.ceil(len(order) / shards)
    index = {"format": FORMAT, "dtype": "bf16", "tokens": int(feats.shape[1]), "width": int(feats.shape[2]),
             "shards": [], "skipped": {}}
    for s in range(shards):
        rows = order[s * per:(s + 1) * per]
        name = f"shard-{s:05d}.safetensors"
        save_file({"features": feats[rows].to(torch.bfloat16).contiguous()}, str(folder / name))
        index["shards"].append({"file": name, "images": [names[i] for i in rows]})
    (folder / "index.json").write_text(json.dumps(index))


def test_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    ann, images = write_gallery(tmp_path, 6, [2, 3])
    hf = hf_retrieval_model()
    hf.save_pretrained(tmp_path / "model")
    tok = write_tokenizer(tmp_path / "model")
    gallery = read_annotations(ann)
    argv = ["retrieval", "--data", str(ann), "--model", str(tmp_path / "model"), "--k", "4", "--workers", "0",
            "--batch-size", "8", "--image-batch-size", "4", "--device", "cpu", "--no-progress"]

    # 1. images through the HF model's own vision model
    assert cli.main(argv + ["--images", str(images), "--out", str(tmp_path / "out1")]) == 0
    printed = capsys.readouterr().out
    assert "6 images, 15 captions, k = 4" in printed and "image -> text" in printed and "text -> image" in printed
    scores = load_file(str(tmp_path / "out1" / "scores.safetensors"))
    info = json.loads((tmp_path / "out1" / "metrics.json").read_text())
    assert scores["score_i2t"].shape == (6, 15) and scores["score_t2i"].shape == (15, 6)
    assert info["metrics"] == recall_at_k(scores["score_i2t"], scores["score_t2i"], gallery.img2txt, gallery.txt2img)
    assert format_metrics(info["metrics"]) in printed
    # the same numbers as the API on the same inputs (LAVIS' eval transform, tokenisation)
    from blipfast.retrieval import load_images

    model = Blip2Retrieval.from_hf(hf.eval())
    ids, mask = tokenize(tok, gallery.texts)
    pre = load_images(model, images, gallery.images, workers=0)
    ref = model.score_matrices(image_embeds=pre, input_ids=ids, attention_mask=mask, k=4)
    torch.testing.assert_close(scores["score_i2t"], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores["score_t2i"], ref[1], rtol=1e-6, atol=1e-6)

    # 2. cached features (bf16 shards + index): the scores of those very tokens
    _write_features(tmp_path / "feats", gallery.images, pre)
    feats = load_features(tmp_path / "feats", gallery.images)
    assert feats.dtype == torch.bfloat16 and torch.equal(feats, pre.to(torch.bfloat16))
    assert cli.main(argv + ["--features", str(tmp_path / "feats"), "--out", str(tmp_path / "out2")]) == 0
    scores2 = load_file(str(tmp_path / "out2" / "scores.safetensors"))
    ref2 = model.score_matrices(image_embeds=feats, input_ids=ids, attention_mask=mask, k=4)
    torch.testing.assert_close(scores2["score_i2t"], ref2[0], rtol=1e-6, atol=1e-6)

    # 3. a LAVIS checkpoint (+ its ViT through --vision-config) and a blipfast stage-1 state dict: same scores
    stage1 = Blip2Stage1.from_hf(hf, stage1_config())
    lavis = stage1.to_lavis_state_dict()
    vit = {k: v for k, v in hf.state_dict().items() if k.startswith("vision_model.") and "post_layernorm" not in k}
    lavis.update(convert.hf_to_lavis(vit).state_dict)
    convert.save_lavis_checkpoint(lavis, tmp_path / "lavis.pth")
    (tmp_path / "cfg.json").write_text(json.dumps(stage1.config.to_dict()))
    (tmp_path / "vcfg.json").write_text(json.dumps(VCFG))
    common = argv[:3] + argv[5:] + ["--tokenizer", str(tmp_path / "model"), "--config", str(tmp_path / "cfg.json")]
    assert cli.main(common + ["--model", str(tmp_path / "lavis.pth"), "--vision-config", str(tmp_path / "vcfg.json"),
                              "--images", str(images), "--out", str(tmp_path / "out3")]) == 0
    scores3 = load_file(str(tmp_path / "out3" / "scores.safetensors"))
    torch.testing.assert_close(scores3["score_i2t"], scores["score_i2t"], rtol=1e-5, atol=1e-5)
    convert.save_safetensors(stage1.state_dict(), tmp_path / "stage1.safetensors")
    assert cli.main(common + ["--model", str(tmp_path / "stage1.safetensors"), "--features", str(tmp_path / "feats"),
                              "--out", str(tmp_path / "out4")]) == 0
    scores4 = load_file(str(tmp_path / "out4" / "scores.safetensors"))
    torch.testing.assert_close(scores4["score_t2i"], scores2["score_t2i"], rtol=1e-5, atol=1e-5)
    capsys.readouterr()

    # errors are messages with exit code 2, never tracebacks
    (images / gallery.images[2]).unlink()
    assert cli.main(argv + ["--images", str(images), "--out", str(tmp_path / "out5")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(common + ["--model", str(tmp_path / "stage1.safetensors"), "--images", str(images)]) == 2
    assert "vision model" in capsys.readouterr().err
    missing = json.loads((tmp_path / "feats" / "index.json").read_text())
    for shard in missing["shards"]:
        shard["images"] = [k if k != gallery.images[0] else "elsewhere.jpg" for k in shard["images"]]
    (tmp_path / "feats" / "index.json").write_text(json.dumps(missing))
    assert cli.main(argv + ["--features", str(tmp_path / "feats")]) == 2
    assert "not in the feature cache" in capsys.readouterr().err
