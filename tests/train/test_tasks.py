"""The trainer's task contract (blipfast.train.tasks): the registry by file name, every hook the trainer calls
declared on the base class, --task with its older spellings --stage 2 / --model blip, derived configuration returned
(never written into the options) and recorded in config.yaml."""
from __future__ import annotations

import argparse
import ast
import copy
import inspect
import os

import pytest

from blipfast.train import loop
from blipfast.train.config import add_arguments, read_config_file, resolve, task_of
from blipfast.train.tasks import Task, register, task_class, task_names
from blipfast.train.tasks.base import PRESETS


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return resolve(p.parse_args(list(argv)))[0]


def test_registry_finds_each_task_by_its_file_name():
    assert task_names() == ("blip-caption", "blip-nlvr", "blip-pretrain", "blip-retrieval", "blip-vqa", "blip2-caption",
                            "blip2-retrieval", "blip2-stage1", "blip2-stage2", "blip2-vqa")  # (not _vit.py: shared pieces)
    for name in task_names():
        cls = task_class(name)
        assert issubclass(cls, Task) and cls.name == name and cls.__module__.endswith(name.replace("-", "_"))
        assert cls.title and cls.losses and cls.max_words > 0
    with pytest.raises(ValueError, match="--task: unknown task 'blip3'"):
        task_class("blip3")
    with pytest.raises(TypeError):
        register(object)
    assert set(PRESETS) == {"blip2", "blip", "blip-task", "blip-retrieval", "blip-caption"} and all(set(p) == {"base", "tiny"} for p in PRESETS.values())


def test_every_hook_the_trainer_calls_is_declared_on_the_base_class():
    """The trainer reads nothing from a task that Task does not declare (no getattr probing)."""
    tree = ast.parse(inspect.getsource(loop))
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and ((isinstance(n.value, ast.Name) and n.value.id == "task")
                 or (isinstance(n.value, ast.Attribute) and n.value.attr == "task"))}
    assert {"tokenizer", "build", "tokenize", "step_loss", "step_inputs", "save", "load", "losses", "title",
            "trains_vision", "image_processor", "synthetic", "read_data", "dataset"} <= used
    assert all(hasattr(Task, name) for name in used), sorted(n for n in used if not hasattr(Task, n))
    assert "getattr(self.task" not in inspect.getsource(loop) and "hasattr(task" not in inspect.getsource(loop)
    assert Task({"image_ids": True}).step_inputs(3, 10.0) == {}


def test_task_option_and_its_older_spellings():
    assert task_of({}) == "blip2-stage1"
    assert task_of({"stage": 2}) == "blip2-stage2" and task_of({"model": {"name": "blip"}}) == "blip-pretrain"
    assert task_of({"task": "blip2-stage2", "stage": 2}) == "blip2-stage2"
    with pytest.raises(ValueError, match="--task blip2-stage1 contradicts --stage 2"):
        task_of({"task": "blip2-stage1", "stage": 2})
    with pytest.raises(ValueError, match="--model blip is BLIP"):
        task_of({"stage": 2, "model": {"name": "blip"}})
    old, new = _parse("--stage", "2", "--data", "x"), _parse("--task", "blip2-stage2", "--data", "x")
    assert old == new and new["stage"] == 2 and new["batch_size"] == 64  # the task's recipe
    old, new = _parse("--model", "blip", "--data", "x"), _parse("--task", "blip-pretrain", "--data", "x")
    assert {**old, "model": None} == new and new["lr"] == 3e-4 and new["task"] == "blip-pretrain"
    assert _parse("--data", "x")["task"] == "blip2-stage1" and _parse("--data", "x")["batch_size"] == 100


class _Dist:
    main, world = True, 1

    def barrier(self):
        pass


def test_hooks_return_what_they_derive_and_leave_the_options_alone(tmp_path):
    import torch

    cfg = _parse("--out", str(tmp_path), "--vocab-size", "64", "--max-txt-len", "8", "--preset", "tiny")
    before = copy.deepcopy(cfg)
    task = task_class("blip2-stage1")(cfg)
    ann = type("Ann", (), {"captions": ["a red square", "a blue circle on grass"] * 4})()
    tok, folder = task.tokenizer(cfg, ann, _Dist())
    assert folder == os.path.join(str(tmp_path), "tokenizer") and os.path.isdir(folder)
    model, record = task.build(cfg, tok, 24, torch.device("cpu"), fresh=True)
    assert record == model.config.to_dict() and record["qformer"]["encoder_hidden_size"] == 24
    assert record["qformer"]["hidden_size"] == PRESETS["blip2"]["tiny"]["qformer"]["hidden_size"]
    assert cfg == before  # nothing written into the options
    text = task.tokenize(model, tok, ann.captions, cfg)
    assert text["input_ids"].shape == (8, 8) and text["attention_mask"].dtype == torch.bool
    bad = dict(cfg, model={"qformer": {"encoder_hidden_size": 99}})
    with pytest.raises(ValueError, match="--model: qformer.encoder_hidden_size=99 contradicts the vision model"):
        task.build(bad, tok, 24, torch.device("cpu"), fresh=True)
    with pytest.raises(ValueError, match=r"--model: unknown field\(s\) \['what', 'qformer.hidden_sise'\]"):
        task.build(dict(cfg, model={"what": 1, "qformer": {"hidden_sise": 3}}), tok, 24, torch.device("cpu"), True)


def test_config_yaml_records_the_task_and_resume_keeps_it(tmp_path, capsys):
    from blipfast.cli import main

    out = str(tmp_path / "run")
    args = ["train", "--task", "blip2-stage1", "--out", out, "--steps", "1", "--synthetic-size", "16",
            "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    cfg = read_config_file(os.path.join(out, "config.yaml"))
    assert cfg["task"] == "blip2-stage1" and cfg["stage"] == 1 and cfg["preset"] == "tiny"
    assert cfg["model"]["qformer"]["hidden_size"] == PRESETS["blip2"]["tiny"]["qformer"]["hidden_size"]
    assert main(["train", "--resume", out, "--task", "blip-pretrain"]) == 2
    assert "--task cannot change on resume" in capsys.readouterr().err
