"""Optimizer and learning-rate schedule of stage 1 (docs/semantics.md#stage-1-recipe, LAVIS' recipe).

AdamW with weight decay on the weight matrices only (LAVIS: none on biases and parameters with fewer than 2
dimensions: LayerNorms, ``temp``); ``query_tokens`` [1, Q, d] decays, as in LAVIS. The learning rate rises
linearly from ``warmup_lr`` to ``lr`` over ``warmup_steps`` steps (LAVIS' ``warmup_lr_schedule``), then follows
a cosine to ``min_lr`` at the last step. LAVIS steps its cosine once per epoch; here it is evaluated every step
(the same curve, without the staircase).
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: dict, device: torch.device, capturable: bool = False):
    """AdamW over ``param_groups``; on CUDA fused, or capturable with a tensor learning rate for CUDA graphs."""
    kw = dict(betas=tuple(cfg["betas"]), eps=cfg["eps"])
    lr = cfg["warmup_lr"]
    if capturable:
        kw.update(capturable=True, foreach=True)
        lr = torch.tensor(lr, device=device)
    elif device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=lr, **kw)


class WarmupCosine:
    """lr(step) for the step that comes after ``step`` optimizer steps (0-based); sets it on the optimizer."""

    def __init__(self, optimizer, lr: float, warmup_lr: float, warmup_steps: int, min_lr: float, total_steps: int):
        self.optimizer = optimizer
        self.lr, self.warmup_lr, self.min_lr = lr, warmup_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.step_count = 0
        self.apply()

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self) -> float:
        v = self.value(self.step_count)
        for g in self.optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(v)  # a CUDA-graph optimizer reads its lr from this tensor
            else:
                g["lr"] = v
        return v

    def step(self) -> float:
        self.step_count += 1
        return self.apply()

    def current(self) -> float:
        return self.value(self.step_count)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "warmup_lr": self.warmup_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.apply()
