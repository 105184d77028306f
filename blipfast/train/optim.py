"""The trainer's optimizer and learning-rate schedule (docs/training.md#recipes-in-the-trainer).

AdamW over the parameter groups of ``--param-groups``: ``reference`` (the trainer's default) takes the task
recipe's own rule from :mod:`blipfast.train.param_groups` (Salesforce BLIP: every parameter decays; LAVIS' BLIP-2:
``Blip2Base.get_optimizer_params``); ``lavis`` (this module's default for a ``cfg`` without the key, and the
trainer's before the references' rules became its default) decays the weight matrices only (none on biases and
parameters with fewer than 2 dimensions: LayerNorms, ``temp``; ``query_tokens`` [1, Q, d] decays, as in LAVIS).
A model with a ``vit_layers`` attribute (a :class:`blipfast.train.param_groups.ViTLayers`; its ViT trains) and
``lr_layer_decay`` gets LAVIS' per-layer ViT groups from the ``lavis-blip2`` rule, each with its ``lr_scale``, which
LAVIS' schedulers ignore and ``reference`` keeps so; ``layer-decay`` takes the same groups and multiplies each
group's ``lr_scale`` into its learning rate (the schedule's value times ``lr_mult``).

The learning rate of ``--schedule``: ``cosine-per-step`` (:class:`WarmupCosine`) rises linearly from
``warmup_lr`` to ``lr`` over ``warmup_steps`` steps (LAVIS' ``warmup_lr_schedule``), then follows a cosine to
``min_lr`` at the last step, evaluated at every step; ``reference`` (:class:`RecipeSchedule`, the trainer's
default) is the task recipe's reference shape of :mod:`blipfast.train.schedules`, evaluated from the epoch and the
iteration within it as the references do.

Both write the learning rate into every parameter group before each step: a float, or for a capturable
optimizer (CUDA graphs) its device tensor filled in place (an asynchronous fill, no host sync); both resume
bit-exact from ``state_dict()``.
"""
from __future__ import annotations

import math

import torch

from . import param_groups as groups
from . import schedules

PARAM_GROUPS = ("lavis", "reference", "layer-decay")
SCHEDULES = ("cosine-per-step", "reference")
# Salesforce BLIP's configs/pretrain.yaml lr_decay_rate (LAVIS' pretrain_14m.yaml: the same), the only recipe whose
# reference shape is the step decay
DECAY_RATE = {"blip-pretrain": 0.9}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """``--param-groups lavis``: no decay on biases and parameters with fewer than 2 dimensions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def reference_rule(recipe: str) -> str:
    """The name of ``recipe``'s reference rule in :data:`blipfast.train.param_groups.RULES`."""
    if recipe not in groups.REFERENCE_RULE:
        raise ValueError(f"--param-groups reference: no reference rule for the recipe {recipe!r}; known: "
                         f"{sorted(groups.REFERENCE_RULE)}")
    return groups.REFERENCE_RULE[recipe]


def optimizer_groups(model: torch.nn.Module, cfg: dict, recipe: str = "") -> list:
    """The parameter groups of ``--param-groups`` (``cfg["param_groups"]``; absent: ``lavis``) for ``recipe``."""
    how = cfg.get("param_groups", "lavis")
    if how == "lavis":
        return param_groups(model, cfg["weight_decay"])
    if how not in ("reference", "layer-decay"):
        raise ValueError(f"--param-groups must be one of {', '.join(PARAM_GROUPS)}, got {how!r}")
    rule = groups.RULES[reference_rule(recipe)]
    vit = getattr(model, "vit_layers", None)  # a model whose ViT trains with LAVIS' layer-wise lr decay
    if vit is not None and rule is groups.lavis_blip2_groups:
        out = rule(model.named_parameters(), cfg["weight_decay"], model.lr_layer_decay, vit=vit)
    else:
        out = rule(model.named_parameters(), cfg["weight_decay"])
    if how == "layer-decay":  # each group's lr_scale multiplied into its learning rate (LAVIS' schedulers do not)
        for g in out:
            g["lr_mult"] = g.get("lr_scale", 1)
    return out


def make_optimizer(model: torch.nn.Module, cfg: dict, device: torch.device, capturable: bool = False,
                   recipe: str = ""):
    """AdamW over :func:`optimizer_groups`; on CUDA fused, or capturable with a tensor learning rate for CUDA
    graphs."""
    kw = dict(betas=tuple(cfg["betas"]), eps=cfg["eps"])
    lr = cfg["warmup_lr"]
    if capturable:
        kw.update(capturable=True, foreach=True)
        lr = torch.tensor(lr, device=device)
    elif device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(optimizer_groups(model, cfg, recipe), lr=lr, **kw)


class _Schedule:
    """lr(step) for the step that comes after ``step`` optimizer steps (0-based); sets it on the optimizer.
    Subclasses give ``value(step)`` and ``KEYS``, the attributes their state holds besides ``step_count``."""

    KEYS: tuple = ()

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.step_count = 0

    def value(self, step: int) -> float:
        raise NotImplementedError

    def apply(self) -> float:
        v = self.value(self.step_count)
        for g in self.optimizer.param_groups:
            lr = v * g["lr_mult"] if "lr_mult" in g else v  # --param-groups layer-decay
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)  # a CUDA-graph optimizer reads its lr from this tensor
            else:
                g["lr"] = lr
        return v

    def step(self) -> float:
        self.step_count += 1
        return self.apply()

    def current(self) -> float:
        return self.value(self.step_count)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, **{k: getattr(self, k) for k in self.KEYS}}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"step_count", *self.KEYS}
        if unknown:
            raise ValueError(f"--resume: the checkpoint's schedule state has {sorted(unknown)}, not a "
                             f"{type(self).__name__}'s (was --schedule changed?)")
        for k, v in state.items():
            setattr(self, k, v)
        self.apply()


class WarmupCosine(_Schedule):
    """``--schedule cosine-per-step``: linear warm-up then a cosine evaluated at every optimizer step."""

    KEYS = ("lr", "warmup_lr", "min_lr", "warmup_steps", "total_steps")

    def __init__(self, optimizer, lr: float, warmup_lr: float, warmup_steps: int, min_lr: float, total_steps: int):
        super().__init__(optimizer)
        self.lr, self.warmup_lr, self.min_lr = lr, warmup_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.apply()

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class RecipeSchedule(_Schedule):
    """``--schedule reference``: the shape ``shape`` of :data:`blipfast.train.schedules.SHAPES` evaluated as the
    references do, from the epoch and the iteration within it. An iteration is a micro-step (LAVIS calls
    ``lr_scheduler.step(cur_epoch, cur_step=i)`` before every iteration, and with gradient accumulation its
    optimizer steps after the last of ``grad_accum`` of them): the learning rate of optimizer step ``s`` is the
    one of its last micro-step ``m = (s + 1) * grad_accum - 1``, in epoch ``m // micro_per_epoch`` at iteration
    ``m % micro_per_epoch``. ``max_epoch`` (the per-epoch cosine's end) is the number of epochs the run's
    ``total_steps`` reach; ``warmup_steps`` counts iterations of epoch 0."""

    KEYS = ("shape", "lr", "warmup_lr", "min_lr", "warmup_steps", "total_steps", "grad_accum", "micro_per_epoch",
            "max_epoch", "decay_rate")

    def __init__(self, optimizer, shape: str, *, lr: float, warmup_lr: float, warmup_steps: int, min_lr: float,
                 total_steps: int, grad_accum: int, micro_per_epoch: int, decay_rate: float = 1):
        super().__init__(optimizer)
        if shape not in schedules.SHAPES:
            raise ValueError(f"shape must be one of {sorted(schedules.SHAPES)}, got {shape!r}")
        for name, v in (("total_steps", total_steps), ("grad_accum", grad_accum),
                        ("micro_per_epoch", micro_per_epoch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.shape, self.lr, self.warmup_lr, self.min_lr = shape, lr, warmup_lr, min_lr
        self.warmup_steps, self.total_steps, self.decay_rate = warmup_steps, total_steps, decay_rate
        self.grad_accum, self.micro_per_epoch = grad_accum, micro_per_epoch
        self.max_epoch = -(-total_steps * grad_accum // micro_per_epoch)
        self.apply()

    def position(self, step: int) -> tuple:
        """(epoch, iteration within it) of optimizer step ``step``'s last micro-step."""
        return divmod((step + 1) * self.grad_accum - 1, self.micro_per_epoch)

    def value(self, step: int) -> float:
        epoch, i = self.position(step)
        return schedules.learning_rate(self.shape, step=step, epoch=epoch, epoch_step=i, init_lr=self.lr,
                                       min_lr=self.min_lr, warmup_lr=self.warmup_lr, warmup_steps=self.warmup_steps,
                                       max_epoch=self.max_epoch, total_steps=self.total_steps,
                                       decay_rate=self.decay_rate)


def make_schedule(optimizer, cfg: dict, recipe: str, micro_per_epoch: int) -> _Schedule:
    """The schedule of ``--schedule`` (``cfg["schedule"]``; absent: ``cosine-per-step``) for ``recipe``, over
    ``cfg["steps"]`` optimizer steps of ``cfg["grad_accum"]`` micro-steps, ``micro_per_epoch`` to an epoch."""
    how = cfg.get("schedule", "cosine-per-step")
    shape = schedules.shape_for(how, recipe)
    if shape == "cosine-per-step":
        return WarmupCosine(optimizer, cfg["lr"], cfg["warmup_lr"], cfg["warmup_steps"], cfg["min_lr"], cfg["steps"])
    # Salesforce BLIP's fine-tuning has no warm-up: with --warmup-steps 0 epoch 0 is at --lr (LAVIS' warmup_lr -1;
    # LAVIS' own warm-up of 0 steps starts its first step at warmup_lr)
    warmup_lr = -1 if recipe == "blip-finetune" and not cfg["warmup_steps"] else cfg["warmup_lr"]
    return RecipeSchedule(optimizer, shape, lr=cfg["lr"], warmup_lr=warmup_lr, warmup_steps=cfg["warmup_steps"],
                          min_lr=cfg["min_lr"], total_steps=cfg["steps"], grad_accum=cfg["grad_accum"],
                          micro_per_epoch=int(micro_per_epoch), decay_rate=DECAY_RATE.get(recipe, 1))
