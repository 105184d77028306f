"""The ``eval`` suite of ``blipfast bench`` (blipfast/bench/eval.py) on a CPU: the caption scorer's case runs on a
small N and reports captions, the generation rows are skipped as needing a CUDA device, and without Java the
scorer's case is skipped with the toolkit's reason (never a failure). The timed generation needs CUDA."""
from __future__ import annotations

import shutil

import pytest
import torch

from blipfast.bench import eval as ev
from blipfast.bench.common import Case, format_table, run_cases
from blipfast.evaluation import caption

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_synthetic_captions_are_deterministic_and_coco_like():
    preds, refs = ev.synthetic_captions(30)
    assert (preds, refs) == ev.synthetic_captions(30) and (preds, refs) != ev.synthetic_captions(30, seed=1)
    assert sorted(preds) == sorted(refs) == list(range(30))
    assert all(len(r) == ev.REFERENCES for r in refs.values())
    lengths = [len(c.split()) for r in refs.values() for c in r]
    assert min(lengths) >= 7 and max(lengths) <= 16
    assert all(set(preds[i].lower().replace(",", "").rstrip(".").split()) & set(" ".join(refs[i]).lower().split())
               for i in preds)


def test_scorer_captions_default():
    assert ev.scorer_captions(CPU, quick=False) == ev.scorer_captions(CPU, quick=True) == 2000
    assert ev.scorer_captions(torch.device("cuda"), quick=False) == 25000
    assert ev.scorer_captions(torch.device("cuda"), quick=True) == 2000


@pytest.mark.skipif(shutil.which("java") is None, reason="the caption scorer needs a Java runtime (none here)")
def test_quick_suite_on_cpu_runs_the_scorer_and_skips_generation():
    pytest.importorskip("pycocoevalcap")
    cases = ev.cases(CPU, quick=True, captions=40)
    assert [c.group for c in cases] == ["eval caption generation", f"{ev.GROUP_SCORER} N=40"]
    results = run_cases(cases, CPU, warmup=1, iters=3)
    gen, scorer = results
    assert gen.ms is None and gen.error == "skipped: needs a CUDA device" and not gen.failed
    assert scorer.name == ev.SCORER and not scorer.failed and scorer.error is None
    assert len(scorer.ms_all) == 1 and scorer.ms > 0 and scorer.peak_mem_mb is None  # one call, host work
    assert scorer.params == dict(captions=40, references=5, spice="off")
    text = ev.images_per_s(results)
    assert "40 captions x 5 references" in text and "captions/s" in text and "images/s" not in text
    assert "skipped: needs a CUDA device" in format_table(results)


def test_without_java_the_scorer_is_skipped_with_the_reason(monkeypatch):
    def no_java():
        raise caption.ScorerUnavailableError(caption.JAVA_HELP.format(problem="`java` is not on PATH"))

    monkeypatch.setattr(caption, "check_java", no_java)
    called = []
    case = ev.scorer_case(CPU, quick=True, captions=10)
    case.fn = lambda: called.append(1)
    [r] = run_cases([case], CPU, warmup=1, iters=3)
    assert not called and r.ms is None and not r.failed
    assert r.error.startswith("skipped: the COCO caption toolkit") and "default-jre-headless" in r.error
    assert ev.images_per_s([r]) == ""


def test_generation_rate_and_fraction_from_results():
    """images/s of each generation row and scorer time / generation time of the same N captions."""
    gen = Case("eval caption BLIP-2 OPT-2.7b B=16", ev.OURS_BLIP2, lambda: None,
               params=dict(images=16, shape="OPT-2.7b"))
    scorer = Case(f"{ev.GROUP_SCORER} N=1000", ev.SCORER, lambda: None, params=dict(captions=1000, references=5))
    results = run_cases([gen, scorer], CPU, warmup=0, iters=1)
    results[0].ms, results[1].ms = 500.0, 2000.0  # 32 images/s: 1000 captions in 31.25 s; scored in 2 s
    text = ev.images_per_s(results)
    assert "32.0 images/s" in text and "2.0 s (500 captions/s)" in text
    assert "scorer / generation of the same 1000 captions, OPT-2.7b" in text and ": 0.064" in text


def test_case_limits_and_skip():
    """Case.max_warmup / max_iters cap the run's counts; a skipped case is never called."""
    calls = []
    capped = Case("g", "capped", lambda: calls.append("c"), max_warmup=0, max_iters=2, measure_memory=False)
    free = Case("g", "free", lambda: calls.append("f"))
    skipped = Case("g", "skipped", lambda: calls.append("s"), skip="why")
    results = run_cases([capped, free, skipped], CPU, warmup=1, iters=3)
    assert calls.count("c") == 2 and calls.count("f") == 4 and "s" not in calls
    assert [len(r.ms_all) for r in results] == [2, 3, 0] and results[2].error == "skipped: why"
