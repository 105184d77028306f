"""``blipfast eval vqa | gqa | nlvr2 | retrieval`` end to end on small files (``caption``: test_caption.py)."""
from __future__ import annotations

import json

import pytest
import torch

from blipfast import cli
from blipfast.retrieval import format_metrics, recall_at_k


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _vqa_files(tmp_path):
    def answers(*words):
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    ann = {"annotations": [
        {"question_id": 1001, "image_id": 1, "question_type": "how many", "answer_type": "number",
         "answers": answers(*["2"] * 8, "two", "3")},
        {"question_id": 1002, "image_id": 1, "question_type": "what color is the", "answer_type": "other",
         "answers": answers(*["red"] * 2, *["dark red"] * 8)},
        {"question_id": 1003, "image_id": 2, "question_type": "is the", "answer_type": "yes/no",
         "answers": answers(*["yes"] * 10)}]}
    questions = {"questions": [{"question_id": q["question_id"], "image_id": q["image_id"], "question": "?"}
                               for q in ann["annotations"]]}
    return _write(tmp_path / "a.json", ann), _write(tmp_path / "q.json", questions)


def test_eval_vqa(tmp_path, capsys):
    a, q = _vqa_files(tmp_path)
    # blipfast vqa's JSON lines, with the question_id its input carried
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "COCO_val2014_000000000001.jpg", "question": "?", "question_id": 1001, "answer": "Two"},
        {"image": "COCO_val2014_000000000001.jpg", "question": "?", "question_id": 1002, "answer": "red"},
        {"image": "COCO_val2014_000000000002.jpg", "question": "?", "question_id": 1003, "answer": "yes."}]))
    out = tmp_path / "m.json"
    assert cli.main(["eval", "vqa", "--predictions", str(tmp_path / "p.jsonl"), "--annotations", a, "--questions", q,
                     "--out", str(out)]) == 0
    # 1001: "2" by 8 humans -> 100; 1002: "red" by 2 -> 60; 1003: "yes" -> 100
    expected = {"overall": 86.67, "perAnswerType": {"number": 100.0, "other": 60.0, "yes/no": 100.0},
                "perQuestionType": {"how many": 100.0, "what color is the": 60.0, "is the": 100.0}}
    assert json.loads(out.read_text()) == expected
    text = capsys.readouterr().out
    assert "Overall Accuracy is: 86.67" in text and "other : 60.00" in text and "what color is the : 60.00" in text
    # a missing prediction is an error; --allow-missing scores the rest and reports the coverage
    res = _write(tmp_path / "res.json", [{"question_id": 1001, "answer": "2"}, {"question_id": 1003, "answer": "no"}])
    assert cli.main(["eval", "vqa", "--predictions", res, "--annotations", a]) == 2
    assert "no prediction for 1 of 3 reference ids (first: 1002)" in capsys.readouterr().err
    assert cli.main(["eval", "vqa", "--predictions", res, "--annotations", a, "--allow-missing", "--out",
                     str(out)]) == 0
    assert "coverage: 2 of 3 references scored" in capsys.readouterr().out
    assert json.loads(out.read_text())["coverage"] == {"scored": 2, "references": 3}
    assert json.loads(out.read_text())["overall"] == 50.0
    # the official 2021 rule: "Two" against disagreeing humans is normalised on both sides (still 100), but
    # "yes." against ten equal "yes" is not normalised at all (0)
    assert cli.main(["eval", "vqa", "--predictions", str(tmp_path / "p.jsonl"), "--annotations", a, "--rule",
                     "official", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["perQuestionType"] == {"how many": 100.0, "what color is the": 60.0,
                                                              "is the": 0.0}


@pytest.mark.parametrize("content, message", [
    ('[{"question_id": 1001, "answer": "2"}, {"question_id": 1001, "answer": "3"}]', r"\[1\]: id 1001 again"),
    ('[{"question_id": 1001, "answer": "2"}, {"question_id": 7, "answer": "3"}]', r"\[1\]: id 7 is not in"),
    ('[{"question_id": 1001, "answer": 2}]', r"\[0\]: \"answer\" must be a string"),
    ('{"question_id": 1001, "answer": "2"}\n{"question_id": 1002, ', r"p.json:2 is not JSON"),
])
def test_eval_vqa_bad_predictions(tmp_path, capsys, content, message):
    import re

    a, _ = _vqa_files(tmp_path)
    (tmp_path / "p.json").write_text(content)
    assert cli.main(["eval", "vqa", "--predictions", str(tmp_path / "p.json"), "--annotations", a]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blipfast eval vqa: error: ") and re.search(message, err), err


def test_eval_gqa_and_nlvr2(tmp_path, capsys):
    refs = _write(tmp_path / "testdev.json", [{"question_id": "20968157", "image": "n1.jpg", "answer": "t-shirt"},
                                              {"question_id": "20968158", "image": "n1.jpg", "answer": "no"}])
    preds = _write(tmp_path / "pred.json", [{"questionId": "20968157", "prediction": "T-shirt"},
                                            {"questionId": "20968158", "prediction": "yes"}])
    out = tmp_path / "g.json"
    assert cli.main(["eval", "gqa", "--predictions", preds, "--references", refs, "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"accuracy": 50.0} and "accuracy       50.00" in capsys.readouterr().out
    assert cli.main(["eval", "gqa", "--predictions", preds, "--references", refs, "--normalize", "none",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"accuracy": 0.0}
    dev = tmp_path / "dev.json"
    dev.write_text("".join(json.dumps({"identifier": i, "sentence": "s", "label": lab}) + "\n" for i, lab in
                           [("dev-7-0-0", "True"), ("dev-7-1-0", "False"), ("dev-7-0-1", "False")]))
    csv = tmp_path / "pred.csv"
    csv.write_text("dev-7-0-0,True\ndev-7-1-0,False\ndev-7-0-1,True\n")
    assert cli.main(["eval", "nlvr2", "--predictions", str(csv), "--references", str(dev), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"accuracy": pytest.approx(200 / 3), "consistency": 50.0}
    assert "consistency    50.00" in capsys.readouterr().out


def test_eval_retrieval_reuses_recall_at_k(tmp_path, capsys):
    from safetensors.torch import save_file

    data = _write(tmp_path / "ann.json", [{"image": f"{i}.jpg", "caption": [f"c{i}a", f"c{i}b"]} for i in range(5)])
    g = torch.Generator().manual_seed(0)
    i2t, t2i = torch.randn(5, 10, generator=g), torch.randn(10, 5, generator=g)
    save_file({"score_i2t": i2t, "score_t2i": t2i}, str(tmp_path / "scores.safetensors"))
    out = tmp_path / "r.json"
    assert cli.main(["eval", "retrieval", "--scores", str(tmp_path / "scores.safetensors"), "--data", data,
                     "--out", str(out)]) == 0
    expected = recall_at_k(i2t, t2i, [[2 * i, 2 * i + 1] for i in range(5)], [t // 2 for t in range(10)])
    assert json.loads(out.read_text()) == pytest.approx(expected)
    assert format_metrics(expected) in capsys.readouterr().out
    save_file({"score_i2t": i2t[:4], "score_t2i": t2i}, str(tmp_path / "bad.safetensors"))
    assert cli.main(["eval", "retrieval", "--scores", str(tmp_path / "bad.safetensors"), "--data", data]) == 2
    assert "score_i2t is [4, 10] but" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    assert cli.main(["eval", "retrieval", "--scores", str(tmp_path / "junk.safetensors"), "--data", data]) == 2
    assert "is not a safetensors file" in capsys.readouterr().err
