"""The design card's ``pytest benchmarks/ --benchmark`` works on a machine without a GPU, with and without
pytest-benchmark: one skip per suite that says what is missing, exit 0. (With a GPU the command runs the
real benchmarks: tests/gpu/device_session.sh --with-pytest-benchmark.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers.runtime import ROOT

SUITES = {"attention": "attention", "itc": "ITC", "qformer": "Q-Former", "stage1": "stage-1 step",
          "retrieval": "retrieval", "train_data": "train data path",
          "blip_pretrain": "BLIP pre-training", "blip_retrieval": "BLIP retrieval fine-tuning",
          "blip_vqa": "BLIP VQA rank inference", "blip2_finetune": "BLIP-2 fine-tuning step",
          "eval": "eval caption generation"}


def test_every_benchmark_suite_is_checked_here():
    assert {p.stem[len("test_"):] for p in (ROOT / "benchmarks").glob("test_*.py")} == set(SUITES)


def _pytest(args, cwd):
    run = subprocess.run([sys.executable, "-m", "pytest", *args, "-q", "-rs", "-p", "no:cacheprovider"], cwd=cwd,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return run.returncode, run.stdout + run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command runs the real benchmarks")
@pytest.mark.parametrize("plugin", ["installed", "missing"])
def test_card_command_skips_each_suite_with_its_reason_without_a_gpu(plugin):
    extra = [] if plugin == "installed" else ["-p", "no:benchmark"]  # as if pytest-benchmark were not installed
    if plugin == "installed":
        pytest.importorskip("pytest_benchmark")
    rc, out = _pytest(["benchmarks/", "--benchmark", *extra], ROOT)
    assert rc == 0, out[-3000:]
    assert f"{len(SUITES)} skipped" in out and "error" not in out.lower()
    for suite, what in SUITES.items():
        if plugin == "installed":
            assert f"the {what} benchmarks need a CUDA device" in out, out[-3000:]
        else:
            assert f"benchmarks/test_{suite}.py" in out
    if plugin == "missing":
        assert out.count("pytest-benchmark is not installed") == len(SUITES)
        assert out.count("also needs a CUDA device") == len(SUITES)


def test_benchmark_flag_is_pytest_benchmarks_benchmark_only(tmp_path):
    """--benchmark turns on --benchmark-only: a test without the benchmark fixture is skipped, a benchmark runs."""
    pytest.importorskip("pytest_benchmark")
    shutil.copy(ROOT / "benchmarks" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text("def test_plain():\n    pass\n\n"
                                        "def test_timed(benchmark):\n    benchmark.pedantic(sum, args=([1, 2],), rounds=2)\n")
    rc, out = _pytest(["--benchmark"], tmp_path)
    assert rc == 0 and "1 passed, 1 skipped" in out and "--benchmark-only active" in out, out[-3000:]
    rc, out = _pytest([], tmp_path)
    assert rc == 0 and "2 passed" in out, out[-3000:]
