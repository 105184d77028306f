"""``blipfast train`` end to end on a CPU, through the command line: images the test writes, a tiny random
Blip2VisionModel the test saves, the loss going down, the run folder's files, training from ``cache-features``
output, exact resume, bad data and bad options.

Every run is a real ``blipfast.cli.main([...])`` call in this process with a tiny Q-Former (2 layers, width 32)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast import Blip2Stage1, Blip2Stage1Config
from blipfast.cli import main
from blipfast.options import EXIT_STOPPED
from blipfast.train.checkpoint import list_checkpoints
from blipfast.train.config import read_config_file
from blipfast.testing.data import write_images, write_jsonl
from tests.helpers.train import NO_DROPOUT, TINY_MODEL, merge, read_log, tiny_args, weights, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), 24)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical comparisons and a shared 2-core CI machine
    yield
    torch.set_num_threads(n)


def _run(args) -> int:
    return main(args)


def test_end_to_end_images_loss_goes_down(dataset, tmp_path):
    out = str(tmp_path / "run")
    rc = _run(tiny_args(out, dataset["data"], dataset["root"], dataset["vision"], steps=30,
                        extra=("--save-every", "10", "--keep", "2", "--save-lavis", "--schedule", "cosine-per-step")))
    assert rc == 0
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert set(r) >= {"step", "loss", "loss_itc", "loss_itm", "loss_lm", "lr", "images_per_s", "memory_mb",
                          "data_wait_s"}
        assert abs(r["loss"] - (r["loss_itc"] + r["loss_itm"] + r["loss_lm"])) < 1e-4
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    # the schedule (cosine-per-step; the reference shapes: tests/train/test_recipes.py): warm-up from 1e-6 to 2e-3
    # over 3 steps, cosine to 1e-4 at step 30
    assert rows[0]["lr"] == pytest.approx(1e-6) and rows[3]["lr"] == pytest.approx(2e-3)
    assert rows[-1]["lr"] == pytest.approx(1e-4)
    # files: config written back resolved, plot, tokenizer, the last two checkpoints
    with open(os.path.join(out, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    cfg = read_config_file(os.path.join(out, "config.yaml"))
    assert cfg["steps"] == 30 and cfg["preset"] == "base" and cfg["tokenizer"] == os.path.join(out, "tokenizer")
    assert cfg["model"]["qformer"]["encoder_hidden_size"] == 24 and cfg["model"]["num_query_tokens"] == 4
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-00000020", "checkpoint-00000030"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # the LAVIS export loads into Blip2Stage1 and equals the safetensors weights
    config = Blip2Stage1Config(**cfg["model"])
    model = Blip2Stage1.from_lavis(os.path.join(out, "checkpoint-00000030", "lavis.pth"), config)
    sd = weights(out)
    for k, v in model.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k
    assert torch.equal(model.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])


def test_training_from_cached_features_equals_training_from_images(dataset, tmp_path):
    """With --augment none (a cache holds the processor's view of each image), training from images and from their
    cached features is the same training; with the default (reference augmentation on images) it is not."""
    feats = str(tmp_path / "feats")
    assert _run(["cache-features", "--data", dataset["data"], "--images", dataset["root"], "--vision",
                 dataset["vision"], "--out", feats, "--batch-size", "5", "--shard-size", "7", "--num-workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0
    with open(os.path.join(feats, "index.json")) as fh:
        index = json.load(fh)
    assert index["dtype"] == "bf16" and len(index["shards"]) > 1
    assert sum(len(s["images"]) for s in index["shards"]) == 24
    a, b = str(tmp_path / "img"), str(tmp_path / "feat")
    assert _run(tiny_args(a, dataset["data"], dataset["root"], dataset["vision"], steps=8,
                          extra=("--augment", "none"))) == 0
    assert _run(tiny_args(b, dataset["data"], features=feats, steps=8)) == 0
    assert read_config_file(os.path.join(b, "config.yaml"))["augment"] == "none"  # auto with --features
    ra, rb = read_log(a), read_log(b)
    for x, y in zip(ra, rb):  # same seed, same tokens (bf16 either way): the same training, bit for bit
        assert [x[k] for k in ("loss", "loss_itc", "loss_itm", "loss_lm")] == \
            [y[k] for k in ("loss", "loss_itc", "loss_itm", "loss_lm")], x["step"]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the images path rounds the ViT tokens to bf16 as the cache stores them: fp32 tokens train differently
    c = str(tmp_path / "fp32")
    assert _run(tiny_args(c, dataset["data"], dataset["root"], dataset["vision"], steps=2,
                          extra=("--feature-dtype", "fp32", "--augment", "none"))) == 0
    assert read_log(c)[1]["loss"] != ra[1]["loss"]
    d = str(tmp_path / "augmented")  # the default on images: the recipe's augmentation
    assert _run(tiny_args(d, dataset["data"], dataset["root"], dataset["vision"], steps=2)) == 0
    assert read_config_file(os.path.join(d, "config.yaml"))["augment"] == "reference"
    assert read_log(d)[0]["loss"] != ra[0]["loss"]


def test_resume_is_bit_identical(dataset, tmp_path):
    """20 steps in one go == 10 steps (--stop-after) + --resume to 20: every logged loss and the final weights,
    with dropout on and two micro-steps per step (so the RNG states and the data position must be restored)."""
    extra = ("--grad-accum", "2", "--save-every", "5")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert _run(tiny_args(full, dataset["data"], dataset["root"], dataset["vision"], steps=20, extra=extra)) == 0
    assert _run(tiny_args(part, dataset["data"], dataset["root"], dataset["vision"], steps=20,
                          extra=extra + ("--stop-after", "10"))) == EXIT_STOPPED
    assert [r["step"] for r in read_log(part)] == list(range(1, 11))
    # a stale row written after the last checkpoint by an interrupted invocation is dropped on resume
    with open(os.path.join(part, "log.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": 11, "loss": -1.0}) + "\n")
    assert _run(["train", "--resume", part, "--no-progress"]) == 0
    rf, rp = read_log(full), read_log(part)
    assert [r["step"] for r in rp] == list(range(1, 21))
    keys = ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "epoch")
    assert [[r[k] for k in keys] for r in rp] == [[r[k] for k in keys] for r in rf]
    wf, wp = weights(full), weights(part)
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    # a checkpoint folder works as --resume too, and the run's options cannot change on resume
    assert _run(["train", "--resume", list_checkpoints(part)[-1], "--no-progress"]) == 0
    assert _run(["train", "--resume", part, "--lr", "1e-3"]) == 2


def test_bad_rows_are_reported_and_skipped(dataset, tmp_path, capsys):
    root = tmp_path
    rows = write_images(str(root), 12, seed=3)
    with open(root / "img" / "corrupt.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    lines = [json.dumps(r) for r in rows[:5]]
    lines.append(json.dumps({"image": "img/missing.png", "caption": "a photo"}))             # line 6
    lines.append(json.dumps({"image": "img/corrupt.png", "caption": "a broken file"}))       # line 7
    lines.append(json.dumps({"image": rows[5]["image"], "caption": " .!  "}))               # line 8: empty
    lines.append("{not json")                                                               # line 9
    lines.append(json.dumps({"image": rows[6]["image"], "caption": ["two", "", "captions"]}))  # line 10
    lines += [json.dumps(r) for r in rows[7:]]
    data = write_jsonl(str(root / "ann.jsonl"), lines)
    out = str(tmp_path / "run")
    assert _run(tiny_args(out, data, str(root), dataset["vision"], steps=6)) == 0
    err = capsys.readouterr()
    text = err.out + err.err
    for line, what in ((6, "does not exist"), (7, "cannot read image"), (8, "empty caption"), (9, "not valid JSON"),
                       (10, "empty caption 2 of 3")):
        assert f"ann.jsonl:{line}: " in text and what in text, (line, what)
    with open(os.path.join(out, "bad_rows.txt")) as fh:
        report = fh.read()
    assert "ann.jsonl:7: cannot read image" in report and "ann.jsonl:6: image" in report
    assert len(read_log(out)) == 6 and list_checkpoints(out)


def test_refused_runs_write_nothing(dataset, tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 4\nbatch_sise: 8\n")
    err = _run_err(tiny_args(out, dataset["data"], dataset["root"], dataset["vision"]) + ["--config", str(cfg)], capsys)
    assert "unknown key 'batch_sise'" in err and "did you mean 'batch_size'" in err
    assert not os.path.exists(out)
    for bad, msg in (([], "--data needs --features"),
                     (["--images", dataset["root"], "--vision", str(tmp_path / "nope")], "--vision"),
                     (["--images", dataset["root"], "--vision", dataset["vision"], "--model",
                       json.dumps({"qformer": {"hidden_sise": 3}})], "qformer.hidden_sise"),
                     (["--images", dataset["root"], "--vision", dataset["vision"], "--model",
                       json.dumps({"qformer": {"encoder_hidden_size": 99}})], "encoder_hidden_size=99"),
                     (["--images", dataset["root"], "--vision", dataset["vision"], "--batch-size", "100"],
                      "fewer than one global batch"),
                     (["--images", dataset["root"], "--vision", dataset["vision"], "--cuda-graph"], "--cuda-graph")):
        args = ["train", "--out", out, "--data", dataset["data"], "--no-progress", "--device", "cpu"] + bad
        assert msg in _run_err(args, capsys), msg
        assert not os.path.exists(out), msg
    # an existing run is never overwritten
    os.makedirs(out)
    open(os.path.join(out, "config.yaml"), "w").close()
    args = tiny_args(out, dataset["data"], dataset["root"], dataset["vision"])
    assert "already holds a run" in _run_err(args, capsys)


def _run_err(args, capsys) -> str:
    assert _run(args) == 2
    return capsys.readouterr().err


def test_config_file_toml_and_yaml_with_the_flags_keys(dataset, tmp_path):
    model = merge(TINY_MODEL, NO_DROPOUT)
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{dataset["data"]}"\nimages = "{dataset["root"]}"\nvision = "{dataset["vision"]}"\n'
                    f'batch-size = 4\nsteps = 3\nmax_txt_len = 8\nvocab_size = 64\nlr = "1e-3"\nbetas = [0.9, 0.98]\n'
                    f'progress = false\ndevice = "cpu"\nlog_every = 1\n'
                    f'[model]\nnum_query_tokens = 4\nembed_dim = 16\n'
                    f'[model.qformer]\n' + "".join(f"{k} = {v}\n" for k, v in model["qformer"].items()))
    out = str(tmp_path / "run")
    assert _run(["train", "--config", str(toml), "--out", out, "--steps", "4"]) == 0  # a flag beats the file
    cfg = read_config_file(os.path.join(out, "config.yaml"))
    assert cfg["steps"] == 4 and cfg["lr"] == 1e-3 and cfg["betas"] == [0.9, 0.98] and cfg["batch_size"] == 4
    assert cfg["model"]["qformer"]["hidden_dropout_prob"] == 0.0
    # the written YAML is itself a valid --config of the same run
    out2 = str(tmp_path / "again")
    assert _run(["train", "--config", os.path.join(out, "config.yaml"), "--out", out2]) == 0
    assert [r["loss"] for r in read_log(out2)] == [r["loss"] for r in read_log(out)]


def test_help_documents_every_option(capsys):
    from blipfast.train.config import OPTIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in OPTIONS:
        assert "--" + name.replace("_", "-") in text, name
    with pytest.raises(SystemExit):
        main(["cache-features", "--help"])
    assert "--shard-size" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint(dataset, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "blipfast.cli"] + tiny_args(out, dataset["data"], dataset["root"], dataset["vision"],
                                                             steps=100000)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.isfile(os.path.join(out, "log.jsonl"))
                                              and len(read_log(out)) >= 2):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, text[-3000:]
    step = read_log(out)[-1]["step"]
    assert "stopped at step" in text and [os.path.basename(p) for p in list_checkpoints(out)] == [
        f"checkpoint-{step:08d}"]


def test_compiled_step_equals_eager_step(dataset, tmp_path):
    """--compile (aot_eager here: the same aten ops, so the same numbers) over the model and the vision tower."""
    torch._dynamo.reset()
    model = merge(TINY_MODEL, NO_DROPOUT)
    eager, comp = str(tmp_path / "eager"), str(tmp_path / "comp")
    assert _run(tiny_args(eager, dataset["data"], dataset["root"], dataset["vision"], steps=3, model=model)) == 0
    assert _run(tiny_args(comp, dataset["data"], dataset["root"], dataset["vision"], steps=3, model=model,
                          extra=("--compile", "--compile-backend", "aot_eager"))) == 0
    assert [r["loss"] for r in read_log(comp)] == [r["loss"] for r in read_log(eager)]
