"""Caption metrics equal pycocoevalcap's own numbers when run the way LAVIS' captioning task runs it (COCO
annotation file, ``COCO.loadRes``, ``COCOEvalCap.evaluate``: PTB tokenizer included), corpus and per image;
captions with line separators are sanitised (no misalignment, no hang); a missing Java runtime is a clear message.

The tests that run Java (the tokenizer, METEOR) skip with a reason where pycocoevalcap or Java is missing; CI
installs both (pyproject's test extra, .ci/run's headless JRE). METEOR's start costs seconds, so the whole
pipeline runs twice here: the toolkit once, ``blipfast eval caption`` once.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from blipfast import cli
from blipfast.evaluation import caption as C

pytest.importorskip("pycocoevalcap", reason="pip install 'blipfast[eval]' (pycocoevalcap) for the caption metrics")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime (`java` on PATH): the PTB "
                                "tokenizer and METEOR need one (apt-get install default-jre-headless)")

# image id -> (references, prediction); brackets, quotes, non-ASCII, an empty and a punctuation-only prediction
DATA = {
    391895: (["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road "
              "on the countryside.", "A man riding on the back of a motorcycle."], "a man riding a motorcycle on a "
             "dirt road"),
    522418: (["A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
              "A woman marking a cake with the back of a chef's knife."], "a woman cutting a cake with a knife"),
    184613: (["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella next to "
              "a herd of cattle.", "a young boy barefoot holding an umbrella touching the horn of a cow"],
             "a boy with an umbrella (and a cow)"),
    318219: (["A young boy standing in front of a computer keyboard.", "a little boy wearing headphones and "
              "looking at a computer monitor", "A young kid with head phones on using a computer."],
             "a \"little\" boy at a computer"),
    554625: (["a boy wearing headphones using one computer in a long row of computers", "A little boy with "
              "earphones on listening to something.", "A group of people sitting at desk using computers."],
             "."),
    397133: (["A man is in a kitchen making pizzas.", "Man in apron standing on front of oven with pans and "
              "bakeware", "A baker is working in the kitchen rolling dough."], ""),
    37777: (["The dining table near the kitchen has a bowl of fruit on it.", "A small kitchen has various "
             "appliances and a table.", "The kitchen is clean and ready for us to see."],
            "a kitchen with a table and a bowl of fruit"),
    87038: (["a café with tables and chairs outside", "people sitting at an outdoor café",
             "A person riding a bike past a café."], "a café with people sitting outside"),
}
SEPARATORS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def _dirty(text: str, k: int) -> str:
    """``text`` with its first space replaced by a line separator (which the sanitiser turns back into one)."""
    return text.replace(" ", SEPARATORS[k % len(SEPARATORS)], 1)


def _coco_files(tmp_path):
    gt = {"images": [{"id": i} for i in DATA],
          "annotations": [{"image_id": i, "caption": c, "id": n} for n, (i, c) in
                          enumerate((i, c) for i, (refs, _) in DATA.items() for c in refs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": p} for i, (_, p) in DATA.items()]))
    return str(tmp_path / "gt.json"), str(tmp_path / "res.json")


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory, request):
    """pycocoevalcap's numbers, the LAVIS way (``coco_caption_eval``), SPICE left out."""
    if shutil.which("java") is None:
        pytest.skip("no Java runtime")
    import pycocoevalcap.eval as E
    from pycocotools.coco import COCO

    class NoSpice:  # SPICE would download Stanford CoreNLP
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    gt, res = _coco_files(tmp_path_factory.mktemp("coco"))
    mp = pytest.MonkeyPatch()
    mp.setattr(E, "Spice", NoSpice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(gt)
            ev = E.COCOEvalCap(coco, coco.loadRes(res))
            ev.evaluate()
    finally:
        mp.undo()
    metrics = {k: v for k, v in ev.eval.items() if k != "SPICE"}
    per_image = {i: {k: v for k, v in e.items() if k not in ("SPICE", "image_id")} for i, e in ev.imgToEval.items()}
    return metrics, per_image


@pytest.mark.slow
@needs_java
def test_eval_caption_equals_the_toolkit(tmp_path, toolkit, capsys, monkeypatch):
    metrics, per_image = toolkit
    assert set(metrics) == set(C.METRICS)
    assert per_image[554625]["CIDEr"] == 0.0 and per_image[397133]["Bleu_1"] < 1e-6  # "." and "" score 0
    # the same set as blipfast caption writes it (JSON lines, COCO file names, separators inside the captions)
    # against a Karpathy-split list with a separator in a reference
    preds = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": _dirty(p, k)}
             for k, (i, (_, p)) in enumerate(DATA.items())]
    refs = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [_dirty(r, k + j) for j, r in enumerate(rs)]}
            for k, (i, (rs, _)) in enumerate(DATA.items())]
    assert sum(any(s in p["caption"] for s in SEPARATORS) for p in preds) >= 6
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    (tmp_path / "test.json").write_text(json.dumps(refs))
    monkeypatch.setattr(C, "spice_unavailable_reason", lambda: "no Stanford CoreNLP here (test)")
    rc = cli.main(["eval", "caption", "--predictions", str(tmp_path / "pred.jsonl"), "--references",
                   str(tmp_path / "test.json"), "--out", str(tmp_path / "m.json"),
                   "--per-image", str(tmp_path / "per_image.json"), "--meteor-workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    # exactly the toolkit's numbers (same scorers on the same tokens), corpus and per image
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    mine = json.loads((tmp_path / "per_image.json").read_text())
    assert {int(k): v for k, v in mine.items()} == per_image
    assert f"CIDEr{metrics['CIDEr']:>13.3f}" in out and "SPICE: unavailable: no Stanford CoreNLP here" in out


@needs_java
def test_line_separators_misalign_the_raw_tokenizer_not_ours():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {1: [{"caption": "a dog\rruns."}], 2: [{"caption": "a cat\u2028sleeps"}], 3: [{"caption": "a bird"}]}
    with contextlib.redirect_stderr(io.StringIO()):
        raw = PTBTokenizer().tokenize(caps)
    # pycocoevalcap: "\r" and U+2028 split lines, so image 2 gets image 1's second half and image 3 is shifted
    assert raw[2] == ["runs"] and raw[3] == ["a cat"]
    ours = C.ptb_tokenize({k: [v[0]["caption"]] for k, v in caps.items()})
    assert ours == {1: ["a dog runs"], 2: ["a cat sleeps"], 3: ["a bird"]}
    # brackets survive as -lrb- / -rrb- (the toolkit's punctuation list has them in upper case only)
    assert C.ptb_tokenize({0: ["A (red) bus."]}) == {0: ["a -lrb- red -rrb- bus"]}


def test_sanitize_caption():
    assert C.sanitize_caption("a\nb\rc\r\nd\x0be\x0cf\x1cg\x1dh\x1ei\x85j\u2028k\u2029l") == "a b c  d e f g h i j k l"
    assert C.sanitize_caption("a\tb  c") == "a\tb  c"  # tabs and spaces are the tokenizer's business


def test_java_missing_is_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(C.ScorerUnavailableError, match="apt-get install -y default-jre-headless"):
        C.score_captions({1: "a dog"}, {1: ["a dog"]})
    gt, res = _coco_files(tmp_path)
    assert cli.main(["eval", "caption", "--predictions", res, "--references", gt]) == 2
    err = capsys.readouterr().err
    assert "needs a Java runtime" in err and "`java` is not on PATH" in err and "Traceback" not in err
    # a `java` that does not run (macOS' stub without a JDK)
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Unable to locate a Java Runtime.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(C.shutil, "which", lambda name: str(fake))
    with pytest.raises(C.ScorerUnavailableError, match="Unable to locate a Java Runtime"):
        C.check_java()


def test_spice_required_but_unavailable(monkeypatch):
    monkeypatch.setattr(C, "check_java", lambda: "java")
    monkeypatch.setattr(C, "spice_unavailable_reason", lambda: "no CoreNLP")
    with pytest.raises(RuntimeError, match="SPICE cannot run: no CoreNLP"):
        C.score_captions({1: "a dog"}, {1: ["a dog"]}, spice=True)


def test_spice_reason_names_the_missing_jars(monkeypatch, tmp_path):
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    monkeypatch.setattr(C, "_toolkit_dir", lambda: str(tmp_path))
    assert "stanford-corenlp-3.6.0.jar" in C.spice_unavailable_reason()
    for jar in C.SPICE_JARS:
        (tmp_path / "spice" / "lib" / jar).write_bytes(b"")
    assert C.spice_unavailable_reason() is None


def test_bad_input_before_any_java(monkeypatch):
    monkeypatch.setattr(C, "check_java", lambda: pytest.fail("Java must not start on bad input"))
    with pytest.raises(ValueError, match="no prediction for 1 of 2"):
        C.score_captions({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(TypeError, match="image 1"):
        C.score_captions({1: None}, {1: ["a"]})
    with pytest.raises(ValueError, match="references of image 1"):
        C.score_captions({1: "a"}, {1: "a"})
