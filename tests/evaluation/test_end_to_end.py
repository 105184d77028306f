"""``blipfast eval caption | vqa --model``: a tiny random BLIP-2 folder generates the predictions of the reference
file's own inputs; the predictions file is written, holds what ``blipfast caption`` / ``blipfast vqa`` generate with
the same settings, and scoring it with ``--predictions`` gives the same metrics. Captions and answers are random
words here: the tests check the pipeline, the files and the agreement, not the numbers."""
from __future__ import annotations

import json
import shutil

import pytest

from blipfast import cli
from blipfast.testing import blip2 as T

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--max-new-tokens", "5", "--no-progress"]  # LAVIS' lengths are the defaults; short texts keep tests fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An OPT BLIP-2 folder and 3 images under root/val/."""
    root = tmp_path_factory.mktemp("e2e")
    model = T.save_folder(T.blip2("opt"), root / "model", "opt")
    (root / "val").mkdir()
    T.write_images(root / "val", 3)
    return root, str(model)


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _load(path):
    return json.loads(open(path).read())


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime (`java` on PATH): the PTB "
                                "tokenizer and METEOR of the caption metrics need one")


@needs_java
def test_caption_end_to_end_equals_prediction_mode(tiny, tmp_path, capsys):
    """Karpathy-split list in, COCO results JSON out (beside --out), the captions of `blipfast caption --settings
    coco` (the default settings), and the metrics of `eval caption --predictions` on that file."""
    pytest.importorskip("pycocoevalcap", reason="pip install 'blipfast[eval]' (pycocoevalcap) for the caption metrics")
    root, model = tiny
    refs = _write(tmp_path / "test.json", [
        {"image": f"val/img{i}.png", "caption": [f"a man riding a bus {i}", "a photo of a red car on the street"]}
        for i in range(3)])
    out = tmp_path / "run" / "metrics.json"
    assert cli.main(["eval", "caption", "--model", model, "--data", refs, "--images", str(root), "--out", str(out),
                     "--no-spice", "--batch-size", "2", "--min-new-tokens", "2", *FAST]) == 0
    err = capsys.readouterr().err
    assert "blipfast eval caption: 3 captions -> " in err and "Traceback" not in err
    pred = tmp_path / "run" / "predictions.json"
    rows = _load(pred)
    assert [(r["image_id"], r["image"]) for r in rows] == [(f"img{i}", f"val/img{i}.png") for i in range(3)]
    jsonl = tmp_path / "c.jsonl"
    assert cli.main(["caption", "--model", model, "--images", str(root / "val"), "--output", str(jsonl),
                     "--settings", "coco", "--min-new-tokens", "2", *FAST]) == 0
    assert [r["caption"] for r in rows] == [json.loads(line)["caption"] for line in jsonl.read_text().splitlines()]
    again = tmp_path / "again.json"
    assert cli.main(["eval", "caption", "--predictions", str(pred), "--references", refs, "--no-spice", "--out",
                     str(again)]) == 0
    metrics = _load(out)
    assert metrics == _load(again) and set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L",
                                                        "CIDEr"}


def test_vqa_end_to_end_equals_prediction_mode(tiny, tmp_path, capsys):
    """LAVIS' VQA list (question_id, question, image, answer list) in; the questions go through LAVIS' blip_question
    processor before the default prompt: the answers `blipfast vqa` gives the processed questions."""
    root, model = tiny
    questions = ["What is the man riding?", "How MANY dogs (here)", "is it red"]
    data = _write(tmp_path / "vqa_val_eval.json", [
        {"question_id": 10 + i, "question": q, "image": f"val/img{i}.png", "answer": ["man"] * 4 + ["two"] * 6}
        for i, q in enumerate(questions)])
    out = tmp_path / "metrics.json"
    pred = tmp_path / "answers.json"
    assert cli.main(["eval", "vqa", "--model", model, "--data", data, "--images", str(root), "--out", str(out),
                     "--save-predictions", str(pred), *FAST]) == 0
    rows = _load(pred)
    assert [(r["question_id"], r["question"], r["image"]) for r in rows] == \
        [(10 + i, q, f"val/img{i}.png") for i, q in enumerate(questions)]
    processed = ["what is the man riding?", "how many dogs here", "is it red"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"val/img{i}.png", "question": q}) + "\n"
                             for i, q in enumerate(processed)))
    assert cli.main(["vqa", "--model", model, "--data", str(jsonl), "--image-root", str(root), "--output",
                     str(tmp_path / "a.jsonl"), *FAST]) == 0
    assert [r["answer"] for r in rows] == [json.loads(line)["answer"]
                                           for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert cli.main(["eval", "vqa", "--predictions", str(pred), "--annotations", data, "--out",
                     str(tmp_path / "again.json")]) == 0
    assert _load(out) == _load(tmp_path / "again.json")
    assert set(_load(out)) == {"overall", "perAnswerType", "perQuestionType"}


def test_vqa_official_pair_finds_images_by_id(tiny, tmp_path):
    """The official question + annotation pair: question text from the question file, the image by the id in its
    file name under --images."""
    root, model = tiny
    images = tmp_path / "val2014"
    images.mkdir()
    for i in range(2):
        shutil.copy(root / "val" / f"img{i}.png", images / f"COCO_val2014_{i + 7:012d}.png")
    answers = [{"answer": "man", "answer_id": k + 1} for k in range(10)]
    ann = _write(tmp_path / "A.json", {"annotations": [
        {"question_id": 70, "image_id": 7, "question_type": "what is", "answer_type": "other", "answers": answers},
        {"question_id": 80, "image_id": 8, "question_type": "how many", "answer_type": "number", "answers": answers}]})
    qs = _write(tmp_path / "Q.json", {"questions": [{"question_id": 70, "image_id": 7, "question": "what is this"},
                                                    {"question_id": 80, "image_id": 8, "question": "how many"}]})
    out = tmp_path / "m" / "metrics.json"
    assert cli.main(["eval", "vqa", "--model", model, "--annotations", ann, "--questions", qs, "--images",
                     str(images), "--out", str(out), *FAST]) == 0
    rows = _load(tmp_path / "m" / "predictions.json")
    assert [(r["question_id"], r["image"]) for r in rows] == [(70, "COCO_val2014_000000000007.png"),
                                                             (80, "COCO_val2014_000000000008.png")]
    assert cli.main(["eval", "vqa", "--predictions", str(tmp_path / "m" / "predictions.json"), "--annotations", ann,
                     "--out", str(tmp_path / "again.json")]) == 0
    assert _load(out) == _load(tmp_path / "again.json")
    assert set(_load(out)["perAnswerType"]) == {"other", "number"}


@pytest.mark.parametrize("case, message", [
    ("missing image", r"--images: .*img9.png is not a file \(the image of .*vqa.json\[1\]\)"),
    ("no question", r"--data: .*vqa.json\[0\] has no \"question\""),
    ("malformed", r"vqa.json:2 is not JSON"),
    ("no images flag", r"--images is required with --model"),
    ("images without model", r"--images belongs to the end-to-end mode"),
    ("no references", r"--annotations \(or --data\) is required"),
])
def test_bad_input_is_a_usage_error(tiny, tmp_path, capsys, case, message):
    """Refused before the model loads, exit status 2, the file and row named, no traceback."""
    import re

    root, model = tiny
    rows = [{"question_id": 1, "question": "what", "image": "val/img0.png", "answer": ["a"]},
            {"question_id": 2, "question": "how", "image": "val/img9.png" if case == "missing image" else
             "val/img1.png", "answer": ["b"]}]
    if case == "no question":
        del rows[0]["question"]
    path = tmp_path / "vqa.json"
    path.write_text('{"question_id": 1}\n{"question_id": ' if case == "malformed" else json.dumps(rows))
    source = ["--predictions", str(path)] if case == "images without model" else ["--model", model]
    data = [] if case == "no references" else ["--data", str(path)]
    images = [] if case == "no images flag" else ["--images", str(root)]
    assert cli.main(["eval", "vqa", *source, *data, *images]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blipfast eval vqa: error: ") and re.search(message, err), err
    assert "Traceback" not in err


def test_predictions_and_model_are_exclusive(tiny, tmp_path, capsys):
    _, model = tiny
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "caption", "--predictions", "p.json", "--model", model, "--data", "r.json"])
    assert e.value.code == 2
    assert "argument --model: not allowed with argument --predictions" in capsys.readouterr().err
