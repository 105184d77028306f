"""``blipfast capfilt`` resumed with other settings (issue 17): the settings that decide the rows are stored with
the scores log, a resume that changes one is refused before the models load, ``--restart`` starts the output
again, and the summary records the settings. Tiny random HF BLIP models (blipfast.testing.blip)."""
from __future__ import annotations

import json

import pytest

from blipfast.capfilt import settings_path, side_paths
from blipfast.cli import main
from blipfast.options import EXIT_OK, EXIT_USAGE
from blipfast.testing.blip import write_demo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_demo(str(tmp_path_factory.mktemp("capfilt")))


def _run(tiny, out, *extra):
    return main(["capfilt", "--data", tiny["data"], "--images", tiny["images"], "--captioner", tiny["captioner"],
                 "--filter", tiny["filter"], "--out", str(out), "--batch-size", "3", "--no-progress", "--device",
                 "cpu", *extra])


def test_a_resume_with_other_settings_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _run(tiny, out, "--max-images", "3") == EXIT_OK
    log = side_paths(str(out))[0]
    before = (out.read_text(), open(log).read())
    saved = json.load(open(settings_path(str(out))))
    assert saved["seed"] == 0 and saved["threshold"] == 0.5 and saved["batch_size"] == 3
    capsys.readouterr()
    for extra, what in ((("--seed", "1"), "seed: 0 -> 1"), (("--threshold", "0.7"), "threshold: 0.5 -> 0.7"),
                        (("--batch-size", "2"), "batch_size: 3 -> 2")):
        assert _run(tiny, out, *extra) == EXIT_USAGE, extra  # (a later --batch-size wins over _run's)
        err = capsys.readouterr().err
        assert what in err and "--restart" in err, (extra, err)
        assert (out.read_text(), open(log).read()) == before  # untouched
    # --restart: a new output with the new settings, recorded in the summary
    assert _run(tiny, out, "--seed", "1", "--restart") == EXIT_OK
    summary = json.load(open(side_paths(str(out))[1]))
    assert summary["settings"]["seed"] == 1 and summary["images"] == 7
