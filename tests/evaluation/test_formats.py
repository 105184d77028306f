"""The readers of prediction and reference files, and the errors that name the file and the row."""
from __future__ import annotations

import json

import pytest

from blipfast.evaluation import formats as F
from blipfast.evaluation.nlvr2 import nlvr2_accuracy


def _write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ids():
    assert F.canonical_id("391895") == 391895 == F.canonical_id(391895)
    assert F.canonical_id("dev-850-0-0") == "dev-850-0-0"
    for bad in (True, 1.5, None, ""):
        with pytest.raises(ValueError):
            F.canonical_id(bad)
    assert F.id_from_name("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert F.id_from_name("flickr30k-images/1007129816.jpg") == 1007129816
    assert F.id_from_name("val/0013ea2087020901.jpg") == "0013ea2087020901"


def test_caption_references_coco_and_karpathy(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}, {"id": 3}],
            "annotations": [{"image_id": 3, "caption": "b1", "id": 1}, {"image_id": 7, "caption": "a1", "id": 2},
                            {"image_id": 7, "caption": "a2", "id": 3}]}
    t = F.read_caption_references(_write(tmp_path / "gt.json", coco))
    assert list(t.items()) == [(7, ["a1", "a2"]), (3, ["b1"])]  # the images' order, annotations in file order
    karpathy = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["x", "y"]},
                {"image": "flickr/1007129816.jpg", "caption": "z"},
                {"image": "flickr/1007129816.jpg", "caption": "w"},  # one row per caption: merged
                {"image": "val/0013ea2087020901.jpg", "img_id": 0, "caption": ["n"]}]  # nocaps: img_id
    t = F.read_caption_references(_write(tmp_path / "k.json", karpathy))
    assert dict(t) == {391895: ["x", "y"], 1007129816: ["z", "w"], 0: ["n"]}
    assert t.names["0013ea2087020901.jpg"] == 0
    assert dict(F.read_caption_references(_jsonl(tmp_path / "k.jsonl", karpathy))) == dict(t)


def test_caption_predictions_formats(tmp_path):
    refs = F.read_caption_references(_write(tmp_path / "k.json", [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["x"]},
        {"image": "val/0013ea2087020901.jpg", "img_id": 0, "caption": ["n"]}]))
    coco = F.read_caption_predictions(_write(tmp_path / "res.json", [{"image_id": 391895, "caption": "a"},
                                                                     {"image_id": "0", "caption": "b"}]), refs)
    assert dict(coco) == {391895: "a", 0: "b"}
    # blipfast caption's JSON lines: the image path as given; ids through the references' file names or the name
    ours = F.read_caption_predictions(_jsonl(tmp_path / "p.jsonl", [
        {"image": "/data/coco/val2014/COCO_val2014_000000391895.jpg", "caption": "a"},
        {"image": "nocaps/0013ea2087020901.jpg", "caption": "b"}]), refs)
    assert dict(ours) == {391895: "a", 0: "b"}
    assert ours.rows[0].endswith("p.jsonl:2")


def test_caption_errors_name_file_and_row(tmp_path):
    refs = F.read_caption_references(_write(tmp_path / "gt.json", {"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]}))
    dup = _write(tmp_path / "dup.json", [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"},
                                         {"image_id": 1, "caption": "c"}])
    with pytest.raises(ValueError, match=r"dup.json\[2\]: id 1 again \(first at .*dup.json\[0\]\)"):
        F.read_caption_predictions(dup, refs)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not JSON"):
        F.read_caption_predictions(str(bad_line), refs)
    with pytest.raises(ValueError, match=r"\[1\]: \"caption\" must be a string"):
        F.read_caption_predictions(_write(tmp_path / "n.json", [{"image_id": 1, "caption": "a"},
                                                                {"image_id": 2, "caption": 5}]), refs)
    with pytest.raises(ValueError, match=r"needs an \"image_id\""):
        F.read_caption_predictions(_write(tmp_path / "m.json", [{"caption": "a"}]), refs)
    unknown = F.read_caption_predictions(_write(tmp_path / "u.json", [{"image_id": 1, "caption": "a"},
                                                                      {"image_id": 9, "caption": "b"}]), refs)
    with pytest.raises(ValueError, match=r"u.json\[1\]: id 9 is not in .*gt.json"):
        F.select(unknown, refs)
    partial = F.read_caption_predictions(_write(tmp_path / "p.json", [{"image_id": 2, "caption": "a"}]), refs)
    with pytest.raises(ValueError, match=r"p.json: no prediction for 1 of 2 reference ids \(first: 1\)"):
        F.select(partial, refs)
    assert F.select(partial, refs, allow_missing=True) == ([2], {"scored": 1, "references": 2})
    with pytest.raises(ValueError, match="has no reference caption"):
        F.read_caption_references(_write(tmp_path / "e.json", {"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="is not in \"images\""):
        F.read_caption_references(_write(tmp_path / "f.json", {"images": [{"id": 1}], "annotations": [
            {"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]}))
    with pytest.raises(ValueError, match="is not a file"):
        F.read_caption_references(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="empty"):
        F.read_caption_predictions(_write(tmp_path / "empty.json", "[]"), refs)


def test_vqa_references(tmp_path):
    ann = {"annotations": [
        {"question_id": 5, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": "x", "answer_confidence": "yes", "answer_id": 1}]},
        {"question_id": 6, "question_type": "is the", "answer_type": "yes/no", "answers": [{"answer": "no"}]}]}
    a = _write(tmp_path / "a.json", ann)
    t = F.read_vqa_references(a, _write(tmp_path / "q.json", {"questions": [{"question_id": 5}, {"question_id": 6}]}))
    assert list(t) == [5, 6] and t.key == "question_id" and t[6]["answer_type"] == "yes/no"
    with pytest.raises(ValueError, match="hold different questions"):
        F.read_vqa_references(a, _write(tmp_path / "q2.json", {"questions": [{"question_id": 5}]}))
    lavis = [{"question_id": 9, "question": "?", "image": "x.jpg", "answer": ["a", "b"]}]
    assert F.read_vqa_references(_write(tmp_path / "l.json", lavis))[9]["answers"] == ["a", "b"]
    vizwiz = [{"image": "VizWiz_val_00000000.jpg", "answers": [{"answer": "a", "answer_confidence": "yes"}],
               "answer_type": "other"}]
    v = F.read_vqa_references(_write(tmp_path / "v.json", vizwiz))
    assert v.key == "image" and list(v) == ["VizWiz_val_00000000.jpg"]
    p = F.read_answer_predictions(_write(tmp_path / "vp.json", [{"image": "VizWiz_val_00000000.jpg", "answer": "a"}]),
                                  key="image")
    assert dict(p) == {"VizWiz_val_00000000.jpg": "a"}
    with pytest.raises(ValueError, match=r"l2.json\[0\]: \"answers\" must be"):
        F.read_vqa_references(_write(tmp_path / "l2.json", [{"question_id": 1, "answers": []}]))
    # blipfast vqa's JSON lines carry the input's question_id; GQA's own keys are accepted too
    ours = F.read_answer_predictions(_jsonl(tmp_path / "o.jsonl", [
        {"image": "a.jpg", "question": "?", "question_id": "5", "answer": "x"},
        {"questionId": 6, "prediction": "no"}]))
    assert dict(ours) == {5: "x", 6: "no"}
    with pytest.raises(ValueError, match=r"o2.jsonl:1 needs a \"question_id\""):
        F.read_answer_predictions(_jsonl(tmp_path / "o2.jsonl", [{"image": "a.jpg", "answer": "x"}]))


def test_gqa_references(tmp_path):
    official = {"201307251": {"imageId": "n1", "question": "?", "answer": "no"}, "20968157": {"answer": "left"}}
    assert dict(F.read_gqa_references(_write(tmp_path / "g.json", official))) == {201307251: "no", 20968157: "left"}
    lavis = [{"question_id": "201307251", "image": "n1.jpg", "answer": "no"}]
    assert dict(F.read_gqa_references(_write(tmp_path / "l.json", lavis))) == {201307251: "no"}


def test_nlvr2(tmp_path):
    dev = [{"identifier": f"dev-1-{p}-{s}", "sentence": "...", "label": lab}
           for (p, s), lab in zip([(0, 0), (1, 0), (0, 1), (1, 1)], ["True", "False", "True", "True"])]
    refs = F.read_nlvr2_references(_jsonl(tmp_path / "dev.json", dev))
    assert refs == {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-0-1": True, "dev-1-1-1": True}
    csv = tmp_path / "pred.csv"
    csv.write_text("dev-1-0-0,True\ndev-1-1-0,true\ndev-1-0-1,False\ndev-1-1-1,False\n")
    preds = F.read_nlvr2_predictions(str(csv))
    res = nlvr2_accuracy(preds, refs)
    # right: 1 of 4; sentence 0 (pairs 0, 1) has a wrong one, sentence 1 too -> consistency 0
    assert res["accuracy"] == 25.0 and res["consistency"] == 0.0
    preds["dev-1-1-0"] = False
    assert nlvr2_accuracy(preds, refs)["consistency"] == 50.0
    # the BLIP / LAVIS list has no identifiers: rows are keyed by their index (LAVIS' instance_id)
    blip = [{"images": ["a.png", "b.png"], "sentence": "s", "label": "True"},
            {"images": ["c.png", "d.png"], "sentence": "t", "label": "False"}]
    refs2 = F.read_nlvr2_references(_write(tmp_path / "nlvr_dev.json", blip))
    preds2 = F.read_nlvr2_predictions(_write(tmp_path / "p.json", [{"instance_id": "0", "prediction": 1},
                                                                   {"instance_id": "1", "prediction": 1}]))
    assert nlvr2_accuracy(preds2, refs2) == {"accuracy": 50.0, "coverage": {"scored": 2, "references": 2}}
    bad = tmp_path / "bad.csv"
    bad.write_text("dev-1-0-0,True\ndev-1-1-0,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: a label must be True/False"):
        F.read_nlvr2_predictions(str(bad))
