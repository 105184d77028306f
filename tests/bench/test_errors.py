"""`blipfast bench` and the pytest-benchmark harness never hide blipfast's own errors: a case of blipfast
(or a required baseline, or a suite that cannot build its cases) that raises makes `blipfast bench` exit
non-zero naming it, and fails the harness's test; only a baseline marked optional reports n/a. The cases
here are real calls into blipfast on the CPU (a bad argument makes blipfast raise its ValueError), swapped
in for a suite's cases."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blipfast import cli, ops
from blipfast.bench import qformer as qformer_suite
from blipfast.bench.common import Case
from tests.helpers.runtime import ROOT

GROUP = "attention causal B=1 L=4"


def _q():
    return torch.randn(1, 4, 1, 8)


def blipfast_ok():
    q = _q()
    return ops.qformer_attention(q, q, q, num_query=2, mode="causal", backend="torch")


def blipfast_raises():  # blipfast's own validation raises: a failure of blipfast, not a missing baseline
    q = _q()
    return ops.qformer_attention(q, q, q, num_query=2, mode="sideways", backend="torch")


def baseline_ok():
    q = _q().transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def baseline_missing_library():
    return importlib.import_module("blipfast_test_no_such_attention_library")


OPTIONAL = "the no-such attention library is not installed"


def _bench(monkeypatch, capsys, tmp_path, cases):
    monkeypatch.setattr(qformer_suite, "cases", lambda device, dtype, quick: cases)
    rc = cli.main(["bench", "--only", "qformer", "--device", "cpu", "--iters", "2", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_failing_blipfast_case_fails_the_run_after_the_table(monkeypatch, capsys, tmp_path):
    rc, out, err = _bench(monkeypatch, capsys, tmp_path, [
        Case(GROUP, "blipfast", blipfast_ok),
        Case(GROUP, "blipfast (bad mode)", blipfast_raises),
        Case(GROUP, "sdpa", baseline_ok, baseline=True),
    ])
    assert rc == 1
    assert "FAILED: ValueError: qformer_attention: mode must be one of" in out  # in the table
    assert f"FAILED: {GROUP} / blipfast (bad mode)" in err and "Traceback" in err and "blipfast_raises" in err
    assert "sdpa" in out and "blipfast " in out  # the other cases still ran and are in the table
    (path,) = tmp_path.glob("*.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["blipfast (bad mode)"]["failed"] and not rows["blipfast"]["failed"]
    assert rows["blipfast"]["ms"] is not None and rows["blipfast"]["speedup_vs_best_baseline"] is not None


def test_a_missing_optional_baseline_is_na_and_exits_0(monkeypatch, capsys, tmp_path):
    rc, out, err = _bench(monkeypatch, capsys, tmp_path, [
        Case(GROUP, "blipfast", blipfast_ok),
        Case(GROUP, "no-such-lib", baseline_missing_library, baseline=True, optional=OPTIONAL),
    ])
    assert rc == 0, err
    assert f"n/a: {OPTIONAL} (ModuleNotFoundError: No module named" in out
    assert "FAILED" not in out + err


def test_a_required_baseline_that_raises_fails(monkeypatch, capsys, tmp_path):
    rc, out, err = _bench(monkeypatch, capsys, tmp_path, [
        Case(GROUP, "blipfast", blipfast_ok),
        Case(GROUP, "no-such-lib", baseline_missing_library, baseline=True),  # not marked optional
    ])
    assert rc == 1 and f"FAILED: {GROUP} / no-such-lib" in err


def test_a_suite_that_cannot_build_its_cases_fails(monkeypatch, capsys, tmp_path):
    def broken(device, dtype, quick):
        raise RuntimeError("the Q-Former could not be built")

    monkeypatch.setattr(qformer_suite, "cases", broken)
    rc = cli.main(["bench", "--only", "qformer", "--device", "cpu", "--out", ""])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "FAILED: RuntimeError: the Q-Former could not be built" in out
    assert "FAILED: qformer suite / building the cases" in err


def test_progress_is_a_tqdm_bar_on_stderr(monkeypatch, capsys, tmp_path):
    rc, out, err = _bench(monkeypatch, capsys, tmp_path, [
        Case(GROUP, "blipfast", blipfast_ok),
        Case(GROUP, "sdpa", baseline_ok, baseline=True),
    ])
    assert rc == 0
    assert "qformer: 100%" in err and "2/2" in err  # tqdm's bar over the suite's cases
    assert "timing" not in out and "%|" not in out


def test_only_a_baseline_can_be_optional():
    with pytest.raises(ValueError, match="only a baseline can be optional"):
        Case(GROUP, "blipfast", blipfast_ok, optional="whatever")


def test_harness_fails_on_blipfast_error_and_skips_missing_optional_baseline(tmp_path):
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(f"""
        import pytest
        from _harness import run_case
        from blipfast.bench.common import Case
        from tests.bench.test_errors import GROUP, OPTIONAL, baseline_missing_library, blipfast_ok, blipfast_raises

        CASES = [Case(GROUP, "blipfast", blipfast_ok),
                 Case(GROUP, "blipfast (bad mode)", blipfast_raises),
                 Case(GROUP, "no-such-lib", baseline_missing_library, baseline=True, optional=OPTIONAL)]

        @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
        def test_case(benchmark, case):
            run_case(benchmark, case, "test", rounds=2)
    """))
    env_path = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": env_path})
    tail = run.stdout[-3000:]
    assert run.returncode == 1, tail
    assert "1 failed, 1 passed, 1 skipped" in tail
    assert "FAILED test_suite.py::test_case[blipfast (bad mode)] - ValueError" in tail
    assert "ValueError: qformer_attention: mode must be one of" in run.stdout
    assert f"n/a: {OPTIONAL} (ModuleNotFoundError" in tail
