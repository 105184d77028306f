"""Learning-rate schedules of the reference recipes, as pure functions.

The references set the learning rate from the epoch and the index of the step within it (``cur_epoch``,
``cur_step``: LAVIS' ``lr_scheduler.step(cur_epoch, cur_step)`` runs before every iteration, Salesforce BLIP calls
its ``utils`` functions once per epoch and, in epoch 0 of pre-training, before every iteration):

- :func:`linear_warmup_cosine_lr` (LAVIS ``lavis/common/optims.py``; BLIP-2 stage 1 and 2, LAVIS' fine-tuning
  recipes): in epoch 0, a linear warm-up per step from ``warmup_lr`` to ``init_lr`` over ``warmup_steps`` steps,
  capped at ``init_lr`` (so a warm-up longer than the epoch stops where the epoch ends); from epoch 1 on, a cosine
  per EPOCH from ``init_lr`` (epoch 0) towards ``min_lr`` (epoch ``max_epoch``). ``warmup_lr < 0`` (LAVIS' default,
  -1) means ``init_lr``. With ``warmup_steps = 0`` it is Salesforce BLIP's fine-tuning schedule
  (``utils.cosine_lr_schedule`` per epoch, no warm-up: epoch 0 is at ``init_lr`` either way).
- :func:`linear_warmup_step_lr` (LAVIS; Salesforce BLIP's pre-training, ``pretrain.py`` with ``utils``'
  ``warmup_lr_schedule`` and ``step_lr_schedule``): the same warm-up in epoch 0, then ``max(min_lr, init_lr *
  decay_rate ** epoch)`` per epoch (BLIP: 3,000 warm-up steps from 1e-6 to 3e-4, decay 0.9, floor 1e-6).
  Salesforce BLIP divides by ``warmup_steps`` where LAVIS divides by ``max(warmup_steps, 1)``; they agree for
  every ``warmup_steps > 0``.
- :func:`cosine_per_step_lr`: blipfast's smooth schedule, the same warm-up then a cosine evaluated at every step
  from ``init_lr`` to ``min_lr`` at the last of ``total_steps`` steps (the curve of LAVIS' cosine without its
  staircase; it ignores epochs).

Every function reproduces its reference's arithmetic operation for operation (the same float results).
:data:`SHAPES` names them, :data:`REFERENCE_SHAPE` gives each recipe its reference's shape and :func:`shape_for`
resolves ``reference`` / ``cosine-per-step`` for a recipe. LAVIS' per-group ``lr_scale`` (layer-wise decay, see
:mod:`blipfast.train.param_groups`) is never applied by LAVIS' schedulers: they set every group's ``lr`` to the
same value.
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["SHAPES", "REFERENCE_SHAPE", "cosine_epoch_lr", "cosine_per_step_lr", "learning_rate",
           "linear_warmup", "linear_warmup_cosine_lr", "linear_warmup_step_lr", "shape_for", "step_epoch_lr"]


def _count(name: str, v, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def _rate(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return v


def linear_warmup(step: int, warmup_steps: int, start_lr: float, init_lr: float) -> float:
    """LAVIS' ``warmup_lr_schedule``: ``min(init_lr, start_lr + (init_lr - start_lr) * step / max(warmup_steps,
    1))``."""
    return min(init_lr, start_lr + (init_lr - start_lr) * step / max(warmup_steps, 1))


def cosine_epoch_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """``cosine_lr_schedule`` (LAVIS, Salesforce BLIP ``utils.py``): the cosine at ``epoch`` of ``max_epoch``."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def step_epoch_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    """``step_lr_schedule`` (LAVIS, Salesforce BLIP ``utils.py``): ``max(min_lr, init_lr * decay_rate ** epoch)``."""
    return max(min_lr, init_lr * (decay_rate ** epoch))


def linear_warmup_cosine_lr(epoch: int, step: int, *, init_lr: float, min_lr: float, max_epoch: int,
                            warmup_lr: float = -1, warmup_steps: int = 0) -> float:
    """LAVIS' ``LinearWarmupCosineLRScheduler.step(epoch, step)`` (``step``: the iteration within the epoch)."""
    _count("epoch", epoch)
    _count("step", step)
    _count("max_epoch", max_epoch, 1)
    _count("warmup_steps", warmup_steps)
    for name, v in (("init_lr", init_lr), ("min_lr", min_lr), ("warmup_lr", warmup_lr)):
        _rate(name, v)
    if epoch == 0:
        return linear_warmup(step, warmup_steps, warmup_lr if warmup_lr >= 0 else init_lr, init_lr)
    return cosine_epoch_lr(epoch, max_epoch, init_lr, min_lr)


def linear_warmup_step_lr(epoch: int, step: int, *, init_lr: float, min_lr: float, decay_rate: float = 1,
                          warmup_lr: float = -1, warmup_steps: int = 0) -> float:
    """LAVIS' ``LinearWarmupStepLRScheduler.step(epoch, step)``; Salesforce BLIP's pre-training schedule."""
    _count("epoch", epoch)
    _count("step", step)
    _count("warmup_steps", warmup_steps)
    for name, v in (("init_lr", init_lr), ("min_lr", min_lr), ("decay_rate", decay_rate), ("warmup_lr", warmup_lr)):
        _rate(name, v)
    if epoch == 0:
        return linear_warmup(step, warmup_steps, warmup_lr if warmup_lr >= 0 else init_lr, init_lr)
    return step_epoch_lr(epoch, init_lr, min_lr, decay_rate)


def cosine_per_step_lr(step: int, *, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                       total_steps: int) -> float:
    """blipfast's per-step cosine at optimizer step ``step`` (0-based, counted over the whole run): linear from
    ``warmup_lr`` (step 0) towards ``init_lr`` over ``warmup_steps`` steps, then a cosine from ``init_lr`` to
    ``min_lr`` at step ``total_steps - 1`` (held there after)."""
    _count("step", step)
    _count("warmup_steps", warmup_steps)
    _count("total_steps", total_steps, 1)
    for name, v in (("init_lr", init_lr), ("min_lr", min_lr), ("warmup_lr", warmup_lr)):
        _rate(name, v)
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


SHAPES = {
    "linear_warmup_cosine_lr": linear_warmup_cosine_lr,
    "linear_warmup_step_lr": linear_warmup_step_lr,
    "cosine-per-step": cosine_per_step_lr,
}

# each recipe's reference shape: LAVIS' BLIP-2 configs (pretrain_stage1/2.yaml, caption / retrieval_coco_ft.yaml) and
# BLIP recipes use linear_warmup_cosine_lr; Salesforce BLIP's pretrain.py (and LAVIS' pretrain_14m.yaml) the step
# decay; Salesforce BLIP's train_*.py the per-epoch cosine without warm-up (linear_warmup_cosine_lr, warmup_steps 0)
REFERENCE_SHAPE = {
    "blip2-stage1": "linear_warmup_cosine_lr",
    "blip2-stage2": "linear_warmup_cosine_lr",
    "blip2-finetune": "linear_warmup_cosine_lr",
    "blip-pretrain": "linear_warmup_step_lr",
    "blip-finetune": "linear_warmup_cosine_lr",
}


def shape_for(schedule: str, recipe: str) -> str:
    """The shape that ``--schedule`` (``reference``, or a name of :data:`SHAPES`) gives ``recipe``."""
    if schedule == "reference":
        if recipe not in REFERENCE_SHAPE:
            raise ValueError(f"schedule 'reference': no reference schedule for recipe {recipe!r}; known: "
                             f"{sorted(REFERENCE_SHAPE)}")
        return REFERENCE_SHAPE[recipe]
    if schedule not in SHAPES:
        raise ValueError(f"schedule must be 'reference' or one of {sorted(SHAPES)}, got {schedule!r}")
    return schedule


def learning_rate(shape: str, *, step: int, epoch: int, epoch_step: int, init_lr: float, min_lr: float,
                  warmup_lr: float, warmup_steps: int, max_epoch: Optional[int] = None,
                  total_steps: Optional[int] = None, decay_rate: float = 1) -> float:
    """The learning rate of ``shape`` at global step ``step``, which is step ``epoch_step`` of ``epoch``:
    one signature for every shape (each reads what it needs)."""
    if shape == "linear_warmup_cosine_lr":
        if max_epoch is None:
            raise ValueError("linear_warmup_cosine_lr needs max_epoch")
        return linear_warmup_cosine_lr(epoch, epoch_step, init_lr=init_lr, min_lr=min_lr, max_epoch=max_epoch,
                                       warmup_lr=warmup_lr, warmup_steps=warmup_steps)
    if shape == "linear_warmup_step_lr":
        return linear_warmup_step_lr(epoch, epoch_step, init_lr=init_lr, min_lr=min_lr, decay_rate=decay_rate,
                                     warmup_lr=warmup_lr, warmup_steps=warmup_steps)
    if shape == "cosine-per-step":
        if total_steps is None:
            raise ValueError("cosine-per-step needs total_steps")
        return cosine_per_step_lr(step, init_lr=init_lr, min_lr=min_lr, warmup_lr=warmup_lr,
                                  warmup_steps=warmup_steps, total_steps=total_steps)
    raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
