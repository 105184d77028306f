"""``blipfast selftest`` (blipfast/selftest/cli.py) and the verdicts in ``blipfast info`` (blipfast/_ext.py): on the CPU
the Triton kernels run under the interpreter; the table, the JSON, the exit status, the cached verdicts."""
from __future__ import annotations

import json

import pytest
import torch

from blipfast import cli
from tests.helpers.mutants import Mutant, outputs
from tests.helpers.selftest import isolated

triton = pytest.importorskip("triton")
from blipfast.kernels import itc as IK  # noqa: E402  (after the triton check)

ARGS = ["selftest", "--device", "cpu", "--ops", "itc_loss", "--dtypes", "fp32", "--no-progress"]


def test_selftest_prints_the_table_writes_json_and_caches_verdicts(monkeypatch, tmp_path, capsys):
    isolated(monkeypatch, tmp_path)
    out = tmp_path / "out" / "selftest.json"
    assert cli.main(ARGS + ["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "op" in text and "error / bound (worst)" in text and "FAIL" not in text
    rows = [line for line in text.splitlines() if line.startswith("itc_loss")]
    assert len(rows) == 2 and all(line.split()[1:3] == ["triton", "float32"] and line.endswith("pass")
                                  for line in rows), text
    got = json.loads(out.read_text())
    assert got["level"] == "quick" and got["failed"] == 0 and got["passed"] == 2
    assert got["verdicts"] == {"itc_loss/triton/float32": {"ok": True, "error": None, "cases": 2}}
    assert got["device"]["gpu"] == "cpu (Triton interpreter)" and got["device"]["triton"] == triton.__version__
    measures = got["cases"][0]["measures"]
    assert {m["name"] for m in measures} >= {"loss", "d image_feats", "d temp"} and all(m["ok"] for m in measures)
    # blipfast info shows the verdict the run cached
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    (entry,) = info["selftest"]["devices"]
    assert entry["verdicts"] == {"itc_loss/triton/float32": "pass"} and entry["key"] == got["device"]


def test_a_failed_check_exits_1_and_is_cached(monkeypatch, tmp_path, capsys):
    isolated(monkeypatch, tmp_path)
    Mutant(monkeypatch, IK, "itc_loss_bwd", outputs(lambda di, dt, dtemp: (di / 2, dt, dtemp)))
    assert cli.main(ARGS) == 1
    text = capsys.readouterr().out
    assert "FAIL itc_loss / triton / float32" in text and "d image_feats" in text
    assert cli.main(["info"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["selftest"]["devices"]
    assert entry["verdicts"]["itc_loss/triton/float32"].startswith("FAIL: ")


@pytest.mark.parametrize("bad,word", [(["--dtypes", "fp8"], "--dtypes"), (["--ops", "gelu_mlp"], "gelu_mlp"),
                                      (["--device", "nonsense"], "--device")])
def test_bad_arguments_exit_2(monkeypatch, tmp_path, capsys, bad, word):
    isolated(monkeypatch, tmp_path)
    assert cli.main(["selftest", "--no-progress"] + bad) == 2
    assert word in capsys.readouterr().err


def test_nothing_to_check_on_a_plain_cpu(monkeypatch, tmp_path, capsys):
    """Without TRITON_INTERPRET no fast backend runs on a CPU: nothing to check, exit 0."""
    isolated(monkeypatch, tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["selftest", "--device", "cpu", "--no-progress"]) == 0
    assert "nothing to check" in capsys.readouterr().out


@pytest.mark.gpu
def test_quick_selftest_passes_on_the_gpu(monkeypatch, tmp_path, capsys):
    isolated(monkeypatch, tmp_path)
    assert cli.main(["selftest", "--quick", "--no-progress", "--json", str(tmp_path / "s.json")]) == 0, \
        capsys.readouterr().out
    got = json.loads((tmp_path / "s.json").read_text())
    assert torch.cuda.get_device_name() == got["device"]["gpu"] and got["failed"] == 0
