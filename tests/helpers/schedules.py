"""The references' learning-rate scheduler code, restated verbatim but for the optimizer they write into (LAVIS
``lavis/common/optims.py``, its two schedulers' shared epoch-0 branch factored out; Salesforce BLIP ``utils.py``
as ``pretrain.py`` and ``train_caption.py`` call it), and the loops that call them: the tests of
:mod:`blipfast.train.schedules` and of the trainer's ``--schedule reference`` compare against these."""
from __future__ import annotations

import math


class RecordingOptim:
    def __init__(self):
        self.param_groups = [{"lr": None}, {"lr": None}]


def cosine_lr_schedule(optimizer, epoch, max_epoch, init_lr, min_lr):
    lr = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def warmup_lr_schedule(optimizer, step, max_step, init_lr, max_lr):  # LAVIS
    lr = min(max_lr, init_lr + (max_lr - init_lr) * step / max(max_step, 1))
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def blip_warmup_lr_schedule(optimizer, step, max_step, init_lr, max_lr):  # Salesforce BLIP: no max(., 1)
    lr = min(max_lr, init_lr + (max_lr - init_lr) * step / max_step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def step_lr_schedule(optimizer, epoch, init_lr, min_lr, decay_rate):
    lr = max(min_lr, init_lr * (decay_rate**epoch))
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


class _LinearWarmup:
    """The epoch-0 branch that LAVIS' LinearWarmupCosineLRScheduler and LinearWarmupStepLRScheduler share."""

    def step(self, cur_epoch, cur_step):
        if cur_epoch == 0:
            warmup_lr_schedule(step=cur_step, optimizer=self.optimizer, max_step=self.warmup_steps,
                               init_lr=self.warmup_start_lr, max_lr=self.init_lr)
        else:
            self.after_warmup(cur_epoch)


class LinearWarmupCosineLRScheduler(_LinearWarmup):
    def __init__(self, optimizer, max_epoch, min_lr, init_lr, warmup_steps=0, warmup_start_lr=-1, **kwargs):
        self.optimizer, self.max_epoch, self.min_lr, self.init_lr = optimizer, max_epoch, min_lr, init_lr
        self.warmup_steps = warmup_steps
        self.warmup_start_lr = warmup_start_lr if warmup_start_lr >= 0 else init_lr

    def after_warmup(self, cur_epoch):
        cosine_lr_schedule(epoch=cur_epoch, optimizer=self.optimizer, max_epoch=self.max_epoch,
                           init_lr=self.init_lr, min_lr=self.min_lr)


class LinearWarmupStepLRScheduler(_LinearWarmup):
    def __init__(self, optimizer, max_epoch, min_lr, init_lr, decay_rate=1, warmup_start_lr=-1, warmup_steps=0,
                 **kwargs):
        self.optimizer, self.max_epoch, self.min_lr, self.decay_rate = optimizer, max_epoch, min_lr, decay_rate
        self.init_lr, self.warmup_steps = init_lr, warmup_steps
        self.warmup_start_lr = warmup_start_lr if warmup_start_lr >= 0 else init_lr

    def after_warmup(self, cur_epoch):
        step_lr_schedule(epoch=cur_epoch, optimizer=self.optimizer, init_lr=self.init_lr, min_lr=self.min_lr,
                         decay_rate=self.decay_rate)


def lavis_run(scheduler, epochs, steps_per_epoch):
    """LAVIS' base_task inner loop: lr_scheduler.step(cur_epoch=epoch, cur_step=i) before every iteration."""
    out = []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            scheduler.step(cur_epoch=epoch, cur_step=i)
            out.append(scheduler.optimizer.param_groups[0]["lr"])
    return out


def blip_pretrain_run(config, epochs, steps_per_epoch):
    """Salesforce BLIP pretrain.py: step_lr_schedule per epoch, warmup_lr_schedule per iteration of epoch 0."""
    optimizer, out = RecordingOptim(), []
    for epoch in range(epochs):
        step_lr_schedule(optimizer, epoch, config["init_lr"], config["min_lr"], config["lr_decay_rate"])
        for i in range(steps_per_epoch):
            if epoch == 0:
                blip_warmup_lr_schedule(optimizer, i, config["warmup_steps"], config["warmup_lr"], config["init_lr"])
            out.append(optimizer.param_groups[0]["lr"])
    return out


def blip_finetune_run(config, epochs, steps_per_epoch):
    """Salesforce BLIP train_caption.py / train_retrieval.py: cosine_lr_schedule once per epoch."""
    optimizer, out = RecordingOptim(), []
    for epoch in range(epochs):
        cosine_lr_schedule(optimizer, epoch, config["max_epoch"], config["init_lr"], config["min_lr"])
        out.extend([optimizer.param_groups[0]["lr"]] * steps_per_epoch)
    return out
