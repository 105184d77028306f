"""``blipfast train --schedule reference`` and ``--param-groups reference``: the learning rate the trainer sets and
logs step by step against the references' own scheduler loops (tests/helpers/schedules.py), the
optimizer's groups against each recipe's reference rule, exact resume, config.yaml and the refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blipfast.cli import main
from blipfast.options import EXIT_STOPPED
from blipfast.train import param_groups as G
from blipfast.train.config import read_config_file
from blipfast.train.optim import RecipeSchedule, WarmupCosine, make_optimizer, make_schedule, param_groups
from tests.helpers.train import (TINY_BLIP, make_trainer, read_log, tiny_args, weights, write_blip_vision,
                                 write_dataset)
from tests.helpers.schedules import (LinearWarmupCosineLRScheduler, RecordingOptim, blip_finetune_run,
                                     blip_pretrain_run, lavis_run)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)

TINY_VQA = {"text": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
                     "max_position_embeddings": 40},
            "vision": {"image_size": 16, "hidden_size": 24, "intermediate_size": 48, "num_attention_heads": 2}}
RECIPE = ("--schedule", "reference", "--param-groups", "reference")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), 24)  # batch 4: 6 micro-steps per epoch


def _reference(recipe, cfg, epochs, micro_per_epoch):
    """The learning rate of every iteration (micro-step) as the recipe's reference loop sets it."""
    if recipe == "blip-pretrain":
        return blip_pretrain_run(dict(init_lr=cfg["lr"], min_lr=cfg["min_lr"], warmup_lr=cfg["warmup_lr"],
                                      lr_decay_rate=0.9, warmup_steps=cfg["warmup_steps"]), epochs, micro_per_epoch)
    if recipe == "blip-finetune":
        return blip_finetune_run(dict(init_lr=cfg["lr"], min_lr=cfg["min_lr"], max_epoch=epochs), epochs,
                                 micro_per_epoch)
    sched = LinearWarmupCosineLRScheduler(RecordingOptim(), max_epoch=epochs, min_lr=cfg["min_lr"], init_lr=cfg["lr"],
                                          warmup_steps=cfg["warmup_steps"], warmup_start_lr=cfg["warmup_lr"])
    return lavis_run(sched, epochs, micro_per_epoch)


def _per_step(ref, steps, grad_accum):
    """LAVIS steps the optimizer after the last of ``grad_accum`` iterations: the lr set before that one."""
    return [ref[(s + 1) * grad_accum - 1] for s in range(steps)]


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("recipe,warmup_steps", [("blip2-stage1", 5), ("blip2-stage2", 13), ("blip2-finetune", 0),
                                                 ("blip-pretrain", 4), ("blip-pretrain", 30), ("blip-finetune", 0)])
def test_reference_schedule_is_the_references_loop(recipe, warmup_steps, grad_accum):
    """Four epochs of 8 iterations: every optimizer step's lr, as the trainer computes it and writes it into every
    group (a float, or a capturable optimizer's tensor), equals the reference loop's."""
    epochs, micro = 4, 8
    steps = epochs * micro // grad_accum
    cfg = dict(schedule="reference", lr=3e-4, warmup_lr=1e-6, min_lr=1e-6 if recipe == "blip-pretrain" else 1e-5,
               warmup_steps=warmup_steps, steps=steps, grad_accum=grad_accum)
    want = _per_step(_reference(recipe, cfg, epochs, micro), steps, grad_accum)
    w = torch.nn.Parameter(torch.zeros(2, 2))
    for lr in (0.0, torch.tensor(0.0)):
        opt = torch.optim.AdamW([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=lr)
        sched = make_schedule(opt, cfg, recipe, micro)
        assert isinstance(sched, RecipeSchedule)
        got = []
        for s in range(steps):
            assert sched.value(s) == want[s]
            got.append([float(g["lr"]) for g in opt.param_groups])
            sched.step()
        rounded = [float(torch.tensor(v, dtype=lr.dtype)) if isinstance(lr, torch.Tensor) else v for v in want]
        assert got == [[v, v] for v in rounded]  # a tensor lr holds the value in its dtype (float32, as the trainer's)
    if recipe == "blip-pretrain":  # epochs 1-3 decay by 0.9 per epoch
        assert want[-1] == 3e-4 * 0.9 ** 3
    if recipe == "blip-finetune":  # no warm-up: epoch 0 at --lr whatever --warmup-lr says
        assert want[0] == 3e-4


def test_default_schedule_is_todays_cosine():
    cfg = dict(lr=2e-3, warmup_lr=1e-6, min_lr=1e-4, warmup_steps=3, steps=20, grad_accum=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_schedule(opt, cfg, "blip2-stage1", 7)
    old = WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 2e-3, 1e-6, 3, 1e-4, 20)
    assert isinstance(sched, WarmupCosine) and [sched.value(s) for s in range(22)] == [old.value(s) for s in range(22)]


def test_schedule_state_round_trips_and_refuses_another_kind():
    cfg = dict(schedule="reference", lr=1e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=4, steps=30, grad_accum=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    a = make_schedule(opt, cfg, "blip2-stage1", 9)
    for _ in range(12):
        a.step()
    b = make_schedule(opt, cfg, "blip2-stage1", 9)
    b.load_state_dict(a.state_dict())
    assert b.step_count == 12 and opt.param_groups[0]["lr"] == a.current() == b.current()
    cos = make_schedule(opt, {**cfg, "schedule": "cosine-per-step"}, "blip2-stage1", 9)
    with pytest.raises(ValueError, match="schedule"):
        cos.load_state_dict(a.state_dict())


def _groups(trainer, rule, **kw):
    named = list(trainer.core.named_parameters())
    return G.group_names(trainer.optimizer.param_groups, named), G.group_names(rule(named, 0.05, **kw), named)




def test_reference_groups_are_the_recipes_rule(dataset, tmp_path):
    """BLIP-2 stage 1: LAVIS' Blip2Base rule (``temp`` decays), the default; BLIP pre-training: one group, all
    decaying; --param-groups lavis: the rule of ``param_groups``."""
    for name, extra in (("s1", RECIPE), ("s1-default", ())):
        t = make_trainer(tiny_args(str(tmp_path / name), dataset["data"], dataset["root"], dataset["vision"],
                                   extra=extra))
        try:
            got, want = _groups(t, G.lavis_blip2_groups)
            assert got == want and [g["weight_decay"] for g in t.optimizer.param_groups] == [0.05, 0.0]
            assert "temp" in got[0] and t.schedule.shape == "linear_warmup_cosine_lr"
        finally:
            t.close()
    t = make_trainer(tiny_args(str(tmp_path / "s1-lavis"), dataset["data"], dataset["root"], dataset["vision"],
                           extra=("--param-groups", "lavis", "--schedule", "cosine-per-step")))
    try:
        named = list(t.core.named_parameters())
        assert G.group_names(t.optimizer.param_groups, named) == \
            G.group_names(param_groups(t.core, 0.05), named)
        assert "temp" in G.group_names(t.optimizer.param_groups, named)[1]
    finally:
        t.close()
    root = tmp_path / "blip"
    vit = write_blip_vision(str(root / "vit"))
    t = make_trainer(tiny_args(str(root / "run"), dataset["data"], dataset["root"], vit, model=TINY_BLIP,
                           extra=RECIPE + ("--max-txt-len", "10")))
    try:
        got, want = _groups(t, G.blip_groups)
        assert got == want and len(got) == 1 and [g["weight_decay"] for g in t.optimizer.param_groups] == [0.05]
        assert any(n.endswith(".bias") for n in got[0])
        assert t.schedule.shape == "linear_warmup_step_lr" and t.schedule.decay_rate == 0.9
        t.run()  # 10 steps: epoch 0 (6 steps, a warm-up over 3) then epoch 1 at 0.9 * lr
        lrs = [r["lr"] for r in read_log(t.cfg["out"])]
        assert lrs == _reference("blip-pretrain", t.cfg, 2, 6)[:10] and lrs[6] == 2e-3 * 0.9
    finally:
        t.close()


def test_blip_finetune_run_logs_the_per_epoch_cosine(tmp_path):
    """blip-vqa (a BLIP fine-tuning recipe) on its synthetic set: 6 steps at Salesforce BLIP's per-epoch cosine
    (no warm-up: epoch 0 at --lr whatever --warmup-lr says)."""
    out = str(tmp_path / "vqa")
    assert main(["train", "--task", "blip-vqa", "--out", out, "--steps", "6", "--batch-size", "4", "--synthetic-size",
                 "8", "--vocab-size", "96", "--log-every", "1", "--no-progress", "--device", "cpu", "--seed", "3",
                 "--model", json.dumps(TINY_VQA), "--schedule", "reference", "--warmup-steps", "0"]) == 0
    cfg, rows = read_config_file(os.path.join(out, "config.yaml")), read_log(out)
    micro = round(1 / rows[0]["epoch"])  # the steps of an epoch (the synthetic set's usable questions / 4)
    lrs = [r["lr"] for r in rows]
    assert lrs == _reference("blip-finetune", cfg, -(-6 // micro), micro)[:6]
    assert lrs[0] == cfg["lr"] > lrs[micro] > lrs[-1] and cfg["warmup_lr"] != cfg["lr"]


def test_reference_run_logs_the_reference_lr_and_resumes_bit_exact(dataset, tmp_path):
    """BLIP-2 stage 1 with both options over 3 epochs of 3 steps (2 micro-steps each): the logged lr is LAVIS'
    loop's, config.yaml records the options, and 4 steps + --resume equal the uninterrupted run bit for bit."""
    extra = RECIPE + ("--grad-accum", "2", "--save-every", "2", "--warmup-steps", "5")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = tiny_args(full, dataset["data"], dataset["root"], dataset["vision"], steps=9, extra=extra)
    assert main(args) == 0
    cfg = read_config_file(os.path.join(full, "config.yaml"))
    assert (cfg["schedule"], cfg["param_groups"]) == ("reference", "reference")
    rows = read_log(full)
    want = _per_step(_reference("blip2-stage1", cfg, 3, 6), 9, 2)
    assert [r["lr"] for r in rows] == want
    # a warm-up over 5 iterations of epoch 0, then one lr per epoch
    assert want[0] < want[1] < want[2] == 2e-3 > want[3] == want[5] > want[6] == want[8]
    assert main(tiny_args(part, dataset["data"], dataset["root"], dataset["vision"], steps=9,
                          extra=extra + ("--stop-after", "4"))) == EXIT_STOPPED
    assert main(["train", "--resume", part, "--no-progress"]) == 0
    keys = ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "epoch")
    assert [[r[k] for k in keys] for r in read_log(part)] == [[r[k] for k in keys] for r in rows]
    wf, wp = weights(full), weights(part)
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)
    assert main(["train", "--resume", part, "--schedule", "cosine-per-step"]) == 2  # the run's, fixed


@pytest.mark.parametrize("flag,value", [("--schedule", "cosine"), ("--param-groups", "blip")])
def test_invalid_values_are_refused(dataset, tmp_path, capsys, flag, value):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:  # argparse's choices
        main(tiny_args(out, dataset["data"], dataset["root"], dataset["vision"], extra=(flag, value)))
    assert exc.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err
    conf = tmp_path / "c.yaml"
    conf.write_text(f"{flag[2:]}: {value}\n")
    assert main(tiny_args(out, dataset["data"], dataset["root"], dataset["vision"], extra=("--config", str(conf)))) == 2
    err = capsys.readouterr().err
    assert f"{flag[2:].replace('-', '_')} must be one of" in err and "reference" in err
    assert not os.path.exists(out)


def test_a_task_without_a_reference_is_refused(dataset, tmp_path, capsys, monkeypatch):
    from blipfast.train.tasks import task_class

    """Asked for explicitly, a reference the task's recipe lacks is refused; by default such a task trains with the
    alternatives (cosine-per-step, lavis)."""
    monkeypatch.setattr(task_class("blip2-stage1"), "recipe", "")
    out = str(tmp_path / "run")
    for flag, msg in (("--schedule", "has no reference schedule"), ("--param-groups", "has no reference rule")):
        assert main(tiny_args(out, dataset["data"], dataset["root"], dataset["vision"], extra=(flag, "reference"))) == 2
        assert msg in capsys.readouterr().err and not os.path.exists(out)
    assert main(tiny_args(out, dataset["data"], dataset["root"], dataset["vision"], steps=1)) == 0
    cfg = read_config_file(os.path.join(out, "config.yaml"))
    assert (cfg["schedule"], cfg["param_groups"]) == ("cosine-per-step", "lavis")


def test_make_optimizer_refuses_an_unknown_rule_and_recipe():
    model = torch.nn.Linear(2, 2)
    cfg = dict(betas=[0.9, 0.999], eps=1e-8, warmup_lr=1e-6, weight_decay=0.05, param_groups="reference")
    with pytest.raises(ValueError, match="no reference rule for the recipe 'nope'"):
        make_optimizer(model, cfg, torch.device("cpu"), recipe="nope")
    with pytest.raises(ValueError, match="--param-groups must be one of"):
        make_optimizer(model, {**cfg, "param_groups": "x"}, torch.device("cpu"), recipe="blip-pretrain")
    opt = make_optimizer(model, cfg, torch.device("cpu"), recipe="blip-finetune")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.05
