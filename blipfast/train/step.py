"""One training micro-step and optimizer step: eager (optionally ``torch.compile``d) or replayed from CUDA graphs
(stage 1).

A micro-step moves a batch to the device, runs the frozen vision tower when training from images (its tokens rounded
to ``feature_dtype``, the dtype a feature cache stores, so both paths give the model the same numbers) or scales
fp8 feature shards' tokens back to ``feature_dtype`` (on the device: half the bytes cross the bus), then the
model under autocast through the task's ``step_loss`` (:mod:`blipfast.train.tasks`), and back-propagates
``loss / grad_accum``. It returns the logged losses as a detached device tensor: nothing in a step synchronises with
the host (the trainer reads the losses once per log row). The hard-negative draw takes ``sample_seed`` from the host
(a device fill, no copy): every rank passes the same seed, so W ranks draw what one process with the global batch
draws.

:class:`GraphStepper` (``--cuda-graph``) runs the first ``WARMUP`` optimizer steps eagerly on a side stream
(Triton autotuning, optimizer state allocation), then captures two graphs over static input buffers and one
memory pool: a micro-step (forward + backward, gradients accumulate) and a last micro-step that also runs the
capturable AdamW step (learning rate read from a device tensor the schedule fills) and zeroes the gradients.
Each later micro-step is a copy into the static buffers and one replay.
"""
from __future__ import annotations

import contextlib

import torch

from ..data.feature_shards import decode as decode_features

WARMUP = 3  # eager optimizer steps before the CUDA graphs are captured


class Stepper:
    """Eager (or compiled) steps. ``model``: the module to call (maybe DDP- or compile-wrapped); ``step_loss``:
    the task's ``(model, embeds, inp, seed) -> (loss, logged losses)``; ``tower``: the frozen vision tower when
    the batches hold ``pixel_values``."""

    def __init__(self, model, optimizer, step_loss, *, device, tower=None, scaler=None, amp_dtype=None,
                 grad_accum: int = 1, grad_clip: float = 0.0, feature_dtype=torch.bfloat16, params=None,
                 replicated=None):
        self.model, self.optimizer, self.step_loss, self.tower, self.scaler = model, optimizer, step_loss, tower, scaler
        self.device, self.amp_dtype, self.accum = device, amp_dtype, grad_accum
        self.grad_clip, self.feature_dtype = grad_clip, feature_dtype
        self.params = params if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
        self.ddp = hasattr(model, "no_sync")
        self.fsdp = hasattr(model, "set_requires_gradient_sync")  # FSDP2 (--fsdp): no_sync's counterpart
        self.replicated = replicated  # --fsdp: the parameters FSDP2 leaves whole (blipfast.train.fsdp.wrap)
        self.tower_dtype = next(tower.parameters()).dtype if tower is not None else None
        self.amp_cache = True

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.amp_cache)

    def to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) for k, v in batch.items() if k != "index"}

    def forward(self, inp: dict, seed: torch.Tensor):
        """(logged losses fp32 detached, loss to back-propagate) of one micro-batch already on the device."""
        with self.autocast():
            if self.tower is not None:
                embeds = self.tower(inp["pixel_values"].to(self.tower_dtype)).to(self.feature_dtype)
            else:  # cached ViT tokens, or the pixels of a model that runs its own ViT (BLIP)
                embeds = inp["image_embeds"] if "image_embeds" in inp else inp["pixel_values"]
                if "image_scale" in inp:  # fp8 feature shards: e4m3 tokens and their per-token scale
                    embeds = decode_features(embeds, inp["image_scale"], self.feature_dtype)
            loss, metrics = self.step_loss(self.model, embeds, inp, seed)
        return metrics, loss / self.accum

    def micro(self, batch: dict, seed: int, last: bool) -> torch.Tensor:
        inp = self.to_device(batch)
        seed_t = torch.full((1,), seed, dtype=torch.int64, device=self.device)
        sync = contextlib.nullcontext() if (last or not self.ddp) else self.model.no_sync()
        if self.fsdp and self.accum > 1:  # reduce-scatter the gradients only with the last micro-batch
            self.model.set_requires_gradient_sync(last)
        with sync:
            metrics, loss = self.forward(inp, seed_t)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if last:
            self.optimizer_step()
        return metrics

    def optimizer_step(self, set_to_none: bool = True) -> None:
        if self.replicated is not None:
            from . import fsdp

            fsdp.reduce_replicated(self.replicated)
            if self.grad_clip > 0:
                fsdp.clip_grad_norm(self.params, self.grad_clip)
        elif self.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=set_to_none)


class GraphStepper(Stepper):
    """``--cuda-graph``: see the module docstring. One process, CUDA, no GradScaler, no gradient clipping."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.device.type != "cuda":
            raise ValueError("--cuda-graph needs a CUDA device")
        if self.ddp:
            raise ValueError("--cuda-graph runs in one process (NCCL inside the captured step is not supported yet)")
        if self.scaler is not None or self.grad_clip > 0:
            raise ValueError("--cuda-graph does not support fp16 (GradScaler) or --grad-clip")
        self.amp_cache = False  # autocast's weight cast cache must not outlive a capture
        self.eager_steps = 0
        self.static = None
        self.graphs: dict = {}
        self.pool = None
        self.side = torch.cuda.Stream(self.device)

    def _capture(self, last: bool) -> None:
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            metrics, loss = self.forward(self.static["inp"], self.static["seed"])
            loss.backward()
            if last:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
        self.pool = g.pool()
        self.graphs[last] = (g, metrics)

    def micro(self, batch: dict, seed: int, last: bool) -> torch.Tensor:
        if self.eager_steps < WARMUP:  # real training steps, eager, on a side stream
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                inp = self.to_device(batch)
                metrics, loss = self.forward(inp, torch.full((1,), seed, dtype=torch.int64, device=self.device))
                loss.backward()
                if last:
                    self.optimizer_step(set_to_none=False)
                    self.eager_steps += 1
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            return metrics
        if self.static is None:
            self.static = {"inp": {k: v.to(self.device).clone() for k, v in batch.items() if k != "index"},
                           "seed": torch.zeros(1, dtype=torch.int64, device=self.device)}
        for k, v in self.static["inp"].items():
            v.copy_(batch[k], non_blocking=True)
        self.static["seed"].fill_(seed)
        if last not in self.graphs:
            self._capture(last)
        g, metrics = self.graphs[last]
        g.replay()
        return metrics.clone()
