"""blipfast.train.schedules step by step against the references' own scheduler code (LAVIS
``lavis/common/optims.py``, Salesforce BLIP ``utils.py`` as ``pretrain.py`` and ``train_caption.py`` call it),
restated in tests/helpers/schedules.py."""
from __future__ import annotations

import pytest
import torch

from blipfast.train import schedules as S
from blipfast.train.optim import WarmupCosine
from tests.helpers.schedules import (LinearWarmupCosineLRScheduler, LinearWarmupStepLRScheduler, RecordingOptim,
                                     blip_finetune_run, blip_pretrain_run, lavis_run)


def mine(fn, epochs, steps_per_epoch, **kw):
    return [fn(epoch, i, **kw) for epoch in range(epochs) for i in range(steps_per_epoch)]


# ---- step by step, exact floats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup_steps", [0, 1, 4, 7, 11])  # 11 > 7 steps per epoch: capped by epoch 0's end
@pytest.mark.parametrize("warmup_lr", [-1, 1e-6, 3e-3])
def test_linear_warmup_cosine_lr_is_lavis(warmup_steps, warmup_lr):
    kw = dict(init_lr=1e-4, min_lr=1e-5, max_epoch=4)
    ref = lavis_run(LinearWarmupCosineLRScheduler(RecordingOptim(), warmup_steps=warmup_steps,
                                                  warmup_start_lr=warmup_lr, **kw), 4, 7)
    got = mine(S.linear_warmup_cosine_lr, 4, 7, warmup_lr=warmup_lr, warmup_steps=warmup_steps, **kw)
    assert got == ref
    if warmup_steps > 7 and warmup_lr == 1e-6:  # the warm-up ends with epoch 0 short of init_lr; then the cosine
        assert got[6] < 1e-4 and got[7] == S.cosine_epoch_lr(1, 4, 1e-4, 1e-5)


@pytest.mark.parametrize("warmup_steps", [0, 3, 9])
def test_linear_warmup_step_lr_is_lavis(warmup_steps):
    kw = dict(init_lr=3e-4, min_lr=5e-5, decay_rate=0.5)  # reaches its floor min_lr within 5 epochs
    ref = lavis_run(LinearWarmupStepLRScheduler(RecordingOptim(), max_epoch=5, warmup_steps=warmup_steps,
                                                warmup_start_lr=1e-6, **kw), 5, 6)
    got = mine(S.linear_warmup_step_lr, 5, 6, warmup_lr=1e-6, warmup_steps=warmup_steps, **kw)
    assert got == ref and got[-1] == 5e-5


@pytest.mark.parametrize("warmup_steps", [4, 13])
def test_blip_pretrain_schedule_is_salesforce_blips(warmup_steps):
    config = dict(init_lr=3e-4, min_lr=1e-6, warmup_lr=1e-6, lr_decay_rate=0.9, warmup_steps=warmup_steps)
    ref = blip_pretrain_run(config, 4, 8)
    got = mine(S.linear_warmup_step_lr, 4, 8, init_lr=3e-4, min_lr=1e-6, decay_rate=0.9, warmup_lr=1e-6,
               warmup_steps=warmup_steps)
    assert got == ref
    assert got[8] == 3e-4 * 0.9  # epoch 1


def test_blip_finetune_schedule_is_salesforce_blips():
    config = dict(init_lr=1e-5, min_lr=0, max_epoch=5)
    got = mine(S.linear_warmup_cosine_lr, 5, 3, init_lr=1e-5, min_lr=0, max_epoch=5)
    assert got == blip_finetune_run(config, 5, 3)


def test_cosine_per_step_is_todays_trainer_schedule():
    for warmup, total in [(0, 1), (0, 9), (3, 20), (5, 5), (7, 6)]:
        sched = WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 2e-3, 1e-6, warmup,
                             1e-4, total)
        got = [S.cosine_per_step_lr(s, init_lr=2e-3, min_lr=1e-4, warmup_lr=1e-6, warmup_steps=warmup,
                                    total_steps=total) for s in range(total + 3)]
        assert got == [sched.value(s) for s in range(total + 3)]


def test_learning_rate_dispatches_with_one_signature():
    kw = dict(init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=5, max_epoch=3, total_steps=30,
              decay_rate=0.9)
    for step in range(30):
        epoch, i = divmod(step, 10)
        assert S.learning_rate("linear_warmup_cosine_lr", step=step, epoch=epoch, epoch_step=i, **kw) == \
            S.linear_warmup_cosine_lr(epoch, i, init_lr=1e-4, min_lr=1e-5, max_epoch=3, warmup_lr=1e-6,
                                      warmup_steps=5)
        assert S.learning_rate("linear_warmup_step_lr", step=step, epoch=epoch, epoch_step=i, **kw) == \
            S.linear_warmup_step_lr(epoch, i, init_lr=1e-4, min_lr=1e-5, decay_rate=0.9, warmup_lr=1e-6,
                                    warmup_steps=5)
        assert S.learning_rate("cosine-per-step", step=step, epoch=epoch, epoch_step=i, **kw) == \
            S.cosine_per_step_lr(step, init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=5, total_steps=30)


def test_reference_shapes_by_recipe():
    assert S.shape_for("reference", "blip2-stage1") == "linear_warmup_cosine_lr"
    assert S.shape_for("reference", "blip-pretrain") == "linear_warmup_step_lr"
    assert S.shape_for("cosine-per-step", "blip-pretrain") == "cosine-per-step"
    assert set(S.REFERENCE_SHAPE.values()) <= set(S.SHAPES)
    with pytest.raises(ValueError, match="recipe"):
        S.shape_for("reference", "simclr")
    with pytest.raises(ValueError, match="schedule"):
        S.shape_for("onecycle", "blip2-stage1")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_epoch"):
        S.linear_warmup_cosine_lr(1, 0, init_lr=1e-4, min_lr=0, max_epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        S.linear_warmup_step_lr(-1, 0, init_lr=1e-4, min_lr=0)
    with pytest.raises(ValueError, match="step"):
        S.linear_warmup_step_lr(0, 1.5, init_lr=1e-4, min_lr=0)
    with pytest.raises(ValueError, match="init_lr"):
        S.linear_warmup_cosine_lr(0, 0, init_lr=float("nan"), min_lr=0, max_epoch=2)
    with pytest.raises(ValueError, match="total_steps"):
        S.cosine_per_step_lr(0, init_lr=1e-4, min_lr=0, warmup_lr=0, warmup_steps=0, total_steps=0)
    with pytest.raises(ValueError, match="max_epoch"):
        S.learning_rate("linear_warmup_cosine_lr", step=0, epoch=0, epoch_step=0, init_lr=1e-4, min_lr=0,
                        warmup_lr=0, warmup_steps=0)
    with pytest.raises(ValueError, match="shape"):
        S.learning_rate("onecycle", step=0, epoch=0, epoch_step=0, init_lr=1e-4, min_lr=0, warmup_lr=0,
                        warmup_steps=0)
