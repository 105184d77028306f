"""METEOR on several Java processes (:mod:`blipfast.evaluation.meteor`) gives pycocoevalcap's ``Meteor`` numbers
exactly, corpus and per image, for any number of workers and any split of the images between them; a METEOR
process that dies (or never answers while another dies) is a clear error, and no child process is left behind.

The tests that run METEOR skip where Java or pycocoevalcap is missing (CI installs both). Each METEOR process costs
seconds of CPU to start (its paraphrase table), so the processes are shared: one pycocoevalcap ``Meteor``, one
3-worker and one 2-worker scorer. One worker: test_caption.py's comparison with the toolkit runs
``--meteor-workers 1``.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import threading

import pytest

from blipfast import cli
from blipfast.evaluation import caption as C
from blipfast.evaluation import meteor as M

pytest.importorskip("pycocoevalcap", reason="pip install 'blipfast[eval]' (pycocoevalcap) for the caption metrics")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime (`java` on PATH): METEOR "
                                "needs one (apt-get install default-jre-headless)")

WORDS = ("a man woman dog cat two people riding sitting on in at the of with street table bike horse red blue "
         "small large café naïve façade 東京 タワー straße ümlaut emoji-😀 it's don't o'clock 3 100 1,000 "
         "-lrb- -rrb- , . ! ? ; : ' \" ( ) & % $ #").split()
ODD = ["", ".", "!!", "a", "a  dog  runs", "a ||| dog", "|||", "A DOG ON A BIKE", "  leading and trailing  ",
       "dog " * 40, "東京 タワー の 夜景", "😀 😀 😀", "a\tdog"]


def _caption(rng) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(1, 18)))


def make_set(n: int, seed: int = 0) -> tuple[dict, dict]:
    """(gts, res) of ``n`` images keyed as pycocoevalcap's scorers see them: 1-6 references (some duplicated, some
    odd), one hypothesis (the odd ones first, then random words often sharing the references')."""
    rng = random.Random(seed)
    gts, res = {}, {}
    for i in range(n):
        refs = [_caption(rng) for _ in range(rng.randint(1, 6))]
        if i % 7 == 3:
            refs = refs + refs[:1]  # a duplicated reference
        if i % 11 == 5:
            refs[0] = ODD[(i // 11) % len(ODD)] or "x"
        hyp = ODD[i] if i < len(ODD) else (
            " ".join(rng.sample(" ".join(refs).split(), k=min(5, len(" ".join(refs).split()))))
            if i % 3 else _caption(rng))
        gts[i], res[i] = refs, [hyp]
    return gts, res


def _subset(gts, res, keys):
    return {k: gts[k] for k in keys}, {k: res[k] for k in keys}


@pytest.fixture(scope="module")
def data():
    return make_set(300)


@pytest.fixture(scope="module")
def toolkit():
    """pycocoevalcap's own single-process ``Meteor`` (killed at the end)."""
    if shutil.which("java") is None:
        pytest.skip("no Java runtime")
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    yield m
    m.meteor_p.kill()
    m.meteor_p.wait()


@pytest.fixture(scope="module")
def three():
    if shutil.which("java") is None:
        pytest.skip("no Java runtime")
    with M.MeteorScorer(3) as s:
        yield s
    assert all(p.returncode is not None for p in s.processes)


def _children() -> set:
    """The pids of this process's children (zombies included); Linux."""
    kids = set()
    for f in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(f) as fh:
            kids.update(int(p) for p in fh.read().split())
    return kids


@pytest.mark.slow
@needs_java
def test_parallel_equals_pycocoevalcap(data, toolkit, three, monkeypatch):
    gts, res = data
    want = toolkit.compute_score(gts, res)
    assert 0 < want[0] < 1 and len(want[1]) == 300 and want[1][0] == 0.0  # the empty hypothesis scores 0
    assert len(set(want[1])) > 150  # scores that tell the images apart
    # batches of 7: 43 unequal shares of the 300 images between the 3 processes, the last batch partial
    monkeypatch.setattr(M, "BATCH", 7)
    assert three.compute_score(gts, res) == want  # floats, bit for bit: corpus and every image
    # the same scorer again, on images in another order and a subset: the order of gts is the order of the scores
    keys = list(range(299, 0, -13))
    sub = _subset(gts, res, keys)
    assert three.compute_score(*sub) == toolkit.compute_score(*sub)
    # more workers than images: one process per image (2); then the same 2 processes on all the images
    pair = _subset(gts, res, [17, 4])
    before = _children()
    with M.MeteorScorer(9, images=2) as two:
        assert two.workers == 2 and len(two.processes) == 2
        monkeypatch.setattr(M, "BATCH", 1)
        assert two.compute_score(*pair) == toolkit.compute_score(*pair)
        assert three.compute_score(*pair) == toolkit.compute_score(*pair)  # a process with nothing to do
        monkeypatch.setattr(M, "BATCH", 32)
        assert two.compute_score(gts, res) == want
    assert not (_children() - before)  # both killed and reaped
    # line separators inside a caption become spaces (a raw newline would stall the protocol)
    dirty = {0: ["a dog\non a\u2028bike"], 1: ["two\rcats"]}, {0: ["a\x0bdog"], 1: ["cats\n"]}
    clean = {0: ["a dog on a bike"], 1: ["two cats"]}, {0: ["a dog"], 1: ["cats "]}
    assert three.compute_score(*dirty) == toolkit.compute_score(*clean)


def test_default_workers(monkeypatch):
    monkeypatch.setattr(M.os, "cpu_count", lambda: 16)
    assert M.default_workers(0) == 1 and M.default_workers(2000) == 1
    assert M.default_workers(2 * M.MIN_IMAGES_PER_WORKER) == 2 and M.default_workers(25000) == M.MAX_WORKERS == 8
    monkeypatch.setattr(M.os, "cpu_count", lambda: 2)
    assert M.default_workers(25000) == 2
    monkeypatch.setattr(M.os, "cpu_count", lambda: None)
    assert M.default_workers(25000) == 1


def test_bad_input_before_any_java(monkeypatch, tmp_path):
    monkeypatch.setattr(M.subprocess, "Popen", lambda *a, **k: pytest.fail("no process must start"))
    monkeypatch.setattr(C, "check_java", lambda: pytest.fail("Java must not start on bad input"))
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="meteor_workers must be a positive integer"):
            M.MeteorScorer(bad)
        with pytest.raises(ValueError, match="meteor_workers"):
            C.score_captions({1: "a dog"}, {1: ["a dog"]}, meteor_workers=bad)
    with pytest.raises(ValueError, match="same images"):
        M.meteor_score({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError, match="image 1 must have exactly one hypothesis"):
        M.meteor_score({1: ["a"]}, {1: ["a", "b"]})
    with pytest.raises(ValueError, match="image 1 .* UTF-8"):
        M.meteor_score({1: ["a"]}, {1: ["\ud800"]})
    # the command line: --meteor-workers reaches score_captions, a bad value is exit status 2 with the message
    (tmp_path / "gt.json").write_text('[{"image": "COCO_val2014_000000000001.jpg", "caption": ["a dog"]}]')
    (tmp_path / "res.json").write_text('[{"image_id": 1, "caption": "a dog"}]')
    argv = ["eval", "caption", "--predictions", str(tmp_path / "res.json"), "--references", str(tmp_path / "gt.json")]
    seen = []
    monkeypatch.setattr(C, "score_captions", lambda *a, **k: seen.append(k["meteor_workers"]) or
                        C.CaptionScores(metrics={"METEOR": 1.0}, coverage={"scored": 1, "references": 1}))
    assert cli.main(argv + ["--meteor-workers", "3"]) == 0 and cli.main(argv) == 0 and seen == [3, None]
    monkeypatch.undo()
    monkeypatch.setattr(C, "check_java", lambda: pytest.fail("Java must not start on bad input"))
    assert cli.main(argv + ["--meteor-workers", "0"]) == 2


def _fake_meteor(monkeypatch, tmp_path, script: str) -> None:
    """METEOR's command replaced by ``script`` (sh), run in ``tmp_path``."""
    path = tmp_path / "fake_meteor.sh"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    monkeypatch.setattr(M, "meteor_command", lambda java="java": ([str(path)], str(tmp_path)))


def _run_bounded(fn, seconds: float = 120):
    """``fn()``'s exception (or None), failing the test if it does not return within ``seconds`` (a hang)."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "METEOR hung"
    return box.get("error")


@needs_java
def test_missing_jar_is_a_clear_error(monkeypatch, tmp_path):
    java = shutil.which("java")
    monkeypatch.setattr(M, "meteor_command", lambda j="java": ([java, "-jar", str(tmp_path / "no-such.jar")],
                                                               str(tmp_path)))
    before = _children()
    err = _run_bounded(lambda: M.meteor_score({1: ["a dog"], 2: ["a cat"]}, {1: ["a dog"], 2: ["a cat"]},
                                              workers=2))
    assert isinstance(err, RuntimeError) and str(err).startswith("METEOR failed (worker ")
    assert "no-such.jar" in str(err) and "exit status 1" in str(err)  # Java's own message, from its stderr
    assert not (_children() - before)


def test_a_dead_worker_ends_the_others(monkeypatch, tmp_path):
    """One process answers nothing and never exits; the other answers a line and dies: the error names the dead
    one's exit status and stderr, the silent one is killed, nothing hangs, nothing is left."""
    _fake_meteor(monkeypatch, tmp_path, f'if mkdir "{tmp_path}/first" 2>/dev/null; then exec sleep 600; fi\n'
                 'read line; echo "1.0 2.0"; echo "java.lang.OutOfMemoryError: Java heap space" >&2; exit 3\n')
    before = _children()
    gts = {i: ["a dog"] for i in range(100)}
    scorer = M.MeteorScorer(2, images=100)
    try:
        err = _run_bounded(lambda: scorer.compute_score(gts, {i: ["a dog"] for i in range(100)}))
    finally:
        scorer.close()
    assert isinstance(err, RuntimeError)
    assert "METEOR failed (worker" in str(err) and "exit status 3" in str(err) and "OutOfMemoryError" in str(err)
    assert all(p.returncode is not None for p in scorer.processes)
    assert not (_children() - before)
    # a process that exits at once (`false`): the same clear error from score_captions' path, nothing left
    _fake_meteor(monkeypatch, tmp_path, "exit 1\n")
    err = _run_bounded(lambda: M.meteor_score(gts, {i: ["a cat"] for i in range(100)}, workers=3))
    assert isinstance(err, RuntimeError) and "METEOR failed" in str(err) and "exit status 1" in str(err)
    assert "no message on stderr" in str(err)
    assert not (_children() - before)
    with pytest.raises(RuntimeError, match="closed"):
        scorer.compute_score(gts, gts)


def test_a_command_that_cannot_start(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "meteor_command", lambda java="java": ([str(tmp_path / "missing")], str(tmp_path)))
    with pytest.raises(RuntimeError, match="METEOR could not start"):
        M.meteor_score({1: ["a"]}, {1: ["a"]}, workers=2)
