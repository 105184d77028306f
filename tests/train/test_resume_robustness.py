"""``blipfast train`` at its edges (issue 17): a run stopped before its first checkpoint resumes / restarts from step
0, a corrupt newest checkpoint falls back to the newest complete one, a diverged loss stops with its own exit code,
a changed annotation file is refused on resume, a stopped run exits with the "resumable" code, files get the user's
umask, and bad options are messages. Tiny CPU runs of tests/helpers/train.py (a few steps each)."""
from __future__ import annotations

import os

import pytest
import torch

from blipfast.cli import build_parser, main
from blipfast.files import verify_manifest
from blipfast.options import EXIT_NOT_FINITE, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from blipfast.testing.data import write_jsonl
from blipfast.train import checkpoint as ckpt
from blipfast.train.checkpoint import list_checkpoints
from tests.helpers.train import read_log, tiny_args, weights, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), 12)


def _args(out, ds, steps=3, extra=(), data=None):
    return tiny_args(str(out), data or ds["data"], ds["root"], ds["vision"], steps=steps, extra=tuple(extra))


def _err(capsys) -> str:
    c = capsys.readouterr()
    return c.out + c.err


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(dataset, tmp_path, capsys):
    """Killed after set-up (config.yaml written, no checkpoint): --resume starts from step 0 with the saved
    configuration, and the same command is allowed to start it again; both equal an uninterrupted run."""
    from blipfast.train.config import resolve
    from blipfast.train.loop import Trainer

    full = tmp_path / "full"
    assert main(_args(full, dataset)) == EXIT_OK
    for name in ("resumed", "rerun"):
        out = tmp_path / name
        cfg, given = resolve(build_parser(["train"]).parse_args(_args(out, dataset)))
        tr = Trainer(cfg, given, log=lambda *a: None)  # set up, then "killed" before any step
        tr.runlog.close()
        tr.close()
        assert os.path.isfile(out / "config.yaml") and not list_checkpoints(str(out))
        argv = ["train", "--resume", str(out), "--no-progress"] if name == "resumed" else _args(out, dataset)
        assert main(argv) == EXIT_OK
        assert "stopped before its first checkpoint" in _err(capsys)
        assert [r["loss"] for r in read_log(str(out))] == [r["loss"] for r in read_log(str(full))]
        wf, wo = weights(str(full)), weights(str(out))
        assert all(torch.equal(wf[k], wo[k]) for k in wf)
    # a run with a checkpoint is still never overwritten
    assert main(_args(full, dataset)) == EXIT_USAGE
    assert "already holds a run" in _err(capsys)


@pytest.mark.parametrize("log_every", [1, 4])
def test_a_diverged_loss_stops_with_its_exit_code_and_a_resumable_folder(dataset, tmp_path, capsys, log_every):
    """A learning rate of 1e12 makes the loss NaN at step 2: the run stops there (found at the log row, or when the
    next step fails on the NaN temperature), exit 65, no NaN row in the log, no checkpoint of the NaN weights; the
    folder starts again with other options."""
    out = tmp_path / "run"
    extra = ("--lr", "1e12", "--warmup-steps", "0", "--schedule", "cosine-per-step", "--log-every", str(log_every))
    assert main(_args(out, dataset, steps=6, extra=extra)) == EXIT_NOT_FINITE
    err = _err(capsys)
    assert "loss is not finite at step 2 (loss nan" in err and "must be finite and > 0" not in err
    assert "Traceback" not in err and not list_checkpoints(str(out))
    assert all(r["step"] < 2 for r in read_log(str(out)))
    if log_every == 1:  # the same --out trains again with a sane learning rate
        assert main(_args(out, dataset, steps=2)) == EXIT_OK


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_complete_one(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, dataset, steps=4, extra=("--save-every", "2"))) == EXIT_OK
    c2, c4 = list_checkpoints(str(out))
    assert verify_manifest(c2) == [] and verify_manifest(c4) == []
    want = {k: v.clone() for k, v in weights(c4).items()}  # a copy: safetensors maps the file it reads
    # a truncated model.safetensors: named, skipped (renamed .broken), steps 3-4 again give the same weights
    path = os.path.join(c4, "model.safetensors")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    assert main(["train", "--resume", str(out), "--no-progress"]) == EXIT_OK
    err = _err(capsys)
    assert "checkpoint-00000004: model.safetensors has" in err and "renamed checkpoint-00000004.broken" in err
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert all(torch.equal(want[k], v) for k, v in weights(c4).items())
    # an explicitly named broken checkpoint (its state.pt deleted) is refused with the file's name
    os.remove(os.path.join(c4, "state.pt"))
    assert main(["train", "--resume", c4, "--no-progress"]) == EXIT_USAGE
    assert "state.pt is missing" in _err(capsys)
    # every checkpoint broken: refused, naming each, nothing renamed or written
    open(os.path.join(c2, "state.pt"), "w").close()
    assert main(["train", "--resume", str(out), "--no-progress"]) == EXIT_USAGE
    err = _err(capsys)
    assert "no complete checkpoint" in err and "checkpoint-00000002: state.pt has 0 bytes" in err and \
        "checkpoint-00000004: state.pt is missing" in err


def test_checkpoint_files_are_verified_and_load_errors_name_the_file(tmp_path):
    folder = tmp_path / "checkpoint-00000001"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "state.pt").write_bytes(b"y" * 50)
    assert ckpt.verify_checkpoint(str(folder)) == []  # written before manifests: non-empty files
    from blipfast.files import write_manifest

    write_manifest(str(folder))
    assert ckpt.verify_checkpoint(str(folder)) == []
    (folder / "state.pt").write_bytes(b"z" * 50)  # same size, other bytes
    assert ckpt.verify_checkpoint(str(folder)) == ["state.pt does not match the checksum it was written with"]
    with pytest.raises(ValueError, match="state.pt"):  # torch.load's bare error, with the file named
        ckpt.load_checkpoint(str(folder), lambda f: None)
    from blipfast import convert

    with pytest.raises(ValueError, match="model.safetensors"):
        convert.load_state_dict(folder / "model.safetensors")


def test_a_changed_annotation_file_is_refused_on_resume(dataset, tmp_path, capsys):
    """--stop-after exits 75 (resumable); resuming after the annotation file lost rows is refused, after it changed
    with the same rows it continues with a warning. Checkpoint files have the umask's mode (safetensors: 0600)."""
    data = tmp_path / "ann.jsonl"
    write_jsonl(str(data), dataset["rows"])
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert main(_args(out, dataset, steps=4, data=str(data), extra=("--stop-after", "2"))) == EXIT_STOPPED
    finally:
        os.umask(old)
    assert "stopped at step 2" in _err(capsys)
    (c2,) = list_checkpoints(str(out))
    for name in os.listdir(c2):
        assert os.stat(os.path.join(c2, name)).st_mode & 0o777 == 0o640, name
    write_jsonl(str(data), dataset["rows"][:8])
    assert main(["train", "--resume", str(out), "--no-progress"]) == EXIT_USAGE
    err = _err(capsys)
    assert "annotation file changed" in err and "12 rows" in err and "8 rows" in err
    rows = [dict(r) for r in dataset["rows"]]
    rows[0]["caption"] = "a new caption"
    write_jsonl(str(data), rows)
    assert main(["train", "--resume", str(out), "--no-progress"]) == EXIT_OK
    assert "changed since the run started (same rows and pairs: 12)" in _err(capsys)


def test_bad_options_are_messages(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    for extra, msg in ((("--device", "tpu"), "--device: 'tpu' is not a device"),
                       (("--device", "mps"), "not a device blipfast runs on"),
                       (("--max-txt-len", "1"), "--max-txt-len must be >= 2")):
        assert main(_args(out, dataset, extra=extra)) == EXIT_USAGE
        assert msg in _err(capsys)
        assert not out.exists()
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 3\nlr = [1,\n")
    assert main(_args(out, dataset, extra=("--config", str(toml)))) == EXIT_USAGE
    assert f"cannot parse {str(toml)!r}" in _err(capsys)


def test_help_says_which_default_applies_when(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside the checked texts
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("default: 0.0001; --task blip-caption: 1e-05; --task blip-nlvr: 3e-05; --task blip-pretrain: 0.0003; "
            "--task blip-retrieval: 1e-05; --task blip-vqa: 2e-05; --task blip2-caption: 1e-05; --task "
            "blip2-retrieval: 1e-05; --task blip2-vqa: 1e-05; without --data (the synthetic set): 0.002") in text
    assert "(default: 1000; without --data (the synthetic set): 0)" in text
    assert f"{EXIT_STOPPED} stopped early and resumable" in text and f"{EXIT_NOT_FINITE} the loss is not finite" in text

