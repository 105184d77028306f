"""The trainer behind ``blipfast train``: set-up (processes, data, tokenizer, model, optimizer, checkpoint) and
the loop (steps, log rows, plot, checkpoints). What is trained (BLIP-2 stage 1 or stage 2, BLIP v1 pre-training,
...: tokenizer, model, loss, checkpoint weights) comes from a task of :mod:`blipfast.train.tasks`, whose contract
(:class:`blipfast.train.tasks.Task`) lists every hook called here; the rest is shared. A task whose model trains
its own ViT (``trains_vision``: BLIP) gets the pixels, and per-step inputs (``step_inputs``: BLIP's alpha ramp)
travel with each batch. What a task derives (the tokenizer folder, the resolved model configuration) it returns,
and the trainer records it in ``config.yaml``.

Data: an annotation file (its captions tokenised once up front, a global batch order of
:class:`blipfast.data.GlobalBatchSampler`), or a stream of WebDataset shards or feature shards
(:mod:`blipfast.train.streams`: each rank reads its own shards, captions tokenised per batch in the loader workers,
the checkpoint holds every rank's stream position). Every log row has ``data_wait_s`` (the time the steps waited
for their batches) and, for a stream, ``bad_samples``.

Set-up validates everything it can before it writes anything: the options, the annotation file or shards, the
feature cache or vision model, the tokenizer, the model configuration. The run folder is created only then (by
rank 0), and removed again if the set-up fails after creating it, so a refused run leaves nothing behind. A run
folder that stopped before its first checkpoint starts again from step 0 (``--resume``, or the same command);
``--resume`` takes the newest checkpoint that verifies (:mod:`.checkpoint`) and refuses an annotation file whose
rows changed.

A loss that is not finite stops the run at its step (:class:`LossNotFinite`): the losses are read with each log
row (its one host sync), so no step gets a sync of its own; a step that fails because of it (a NaN temperature)
is diagnosed the same way. Nothing of the diverged steps is saved.

Processes: under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins the default group (NCCL on GPUs, gloo on
CPUs), builds the same model from the same seed, trains on its rows of each global batch
(:class:`blipfast.data.GlobalBatchSampler`) and is wrapped in DDP (frozen parameters left out of its start-up
broadcast: every rank loads them from the same files); ``Blip2Stage1`` gathers the ITC features and exchanges
the hard negatives over the group by itself. Rank 0 writes the run folder; checkpoints carry every
rank's RNG states. Dropout draws from each rank's own RNG (seeded ``seed`` + rank); the hard-negative draws use
a seed that depends only on ``seed`` and the micro-step, the same on every rank. With ``--fsdp`` the model is
sharded with FSDP2 instead of DDP (:mod:`blipfast.train.fsdp`: the optimizer is built over the shards, checkpoints
hold DCP shards beside the consolidated weights, ``--resume`` reads the shards back).
"""
from __future__ import annotations

import datetime
import math
import os
import shutil
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..files import identity
from ..options import DTYPES, resolve_device, resolve_dtype
from . import checkpoint as ckpt
from . import fsdp
from ..data.shards import input_kind
from .config import RESUME_MUTABLE, STREAMS, is_run_config, read_run_config, task_of, validate, write_config
from .streams import KeysLog, StreamInput
from .tasks import task_class
from .logger import RunLog, peak_memory_mb
from .optim import make_optimizer, make_schedule
from .step import GraphStepper, Stepper

_M64 = (1 << 64) - 1
PATHS = ("data", "images", "vision", "features", "tokenizer", "init", "llm", "out", "eval_data", "answer_list")


def mix_seed(seed: int, k: int) -> int:
    """splitmix64(seed, k) as a non-negative int63: independent streams for the negatives' Philox key."""
    z = (seed * 0x9E3779B97F4A7C15 + (k + 1) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


class _Dist:
    def __init__(self, device_opt: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device_opt)
        if dev.type == "cuda" and dev.index is None and self.world > 1:
            dev = torch.device("cuda", self.local_rank)
        self.device = dev
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True
        self.main = self.rank == 0

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class LossNotFinite(FloatingPointError):
    """The run diverged: a loss (or a trained weight) is not finite; the run folder stays resumable."""


class Trainer:
    """``Trainer(cfg, given)``: everything set up for ``run()`` (or ``train_step()`` one step at a time).
    ``cfg``: resolved options (:func:`config.resolve`); ``given``: the explicitly set ones; ``resume``: a run or
    checkpoint folder."""

    def __init__(self, cfg: dict, given: Optional[dict] = None, resume: Optional[str] = None, log=print):
        self.log = log
        self.stop_requested = False
        state, ck, broken = None, None, []
        if resume is not None:
            run_dir, ck, broken = ckpt.find_checkpoint(resume)
            saved = read_run_config(run_dir)
            saved["stop_after"] = None  # a limit of the interrupted invocation, not of the run
            for k, v in (given or {}).items():
                if k not in RESUME_MUTABLE and v != saved[k]:
                    raise ValueError(f"--resume: --{k.replace('_', '-')} cannot change on resume ({saved[k]!r} in "
                                     f"{run_dir}/config.yaml, {v!r} given)")
                saved[k] = v
            cfg = saved
            cfg["out"] = run_dir
        self.dist = d = _Dist(cfg["device"])
        if d.main:
            for note in ckpt.set_aside(broken):
                self.log(note)
        validate(cfg)
        self.cfg = cfg = dict(cfg)
        for k in PATHS:  # config.yaml must work from any working directory (--resume, --config)
            if cfg[k] is not None:
                cfg[k] = os.path.abspath(cfg[k])
        dev = d.device
        if cfg["cuda_graph"] and (dev.type != "cuda" or d.world > 1):
            raise ValueError("--cuda-graph needs one process on a CUDA device")
        self.fsdp = bool(cfg.get("fsdp"))
        if self.fsdp:
            fsdp.check_run(cfg, given or {}, d.world, self.log if d.main else lambda _: None)
        if cfg["precision"] == "auto":
            cfg["precision"] = "bf16" if dev.type == "cuda" else "fp32"
        cfg["task"] = task_of(cfg)
        self.task = task_class(cfg["task"])(cfg)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = cfg["out"] or os.path.abspath(os.path.join("runs", stamp))
        out = cfg["out"] = d.broadcast(out)
        created = False
        if resume is None and d.main and os.path.isdir(out) and (
                os.path.exists(os.path.join(out, "config.yaml")) or ckpt.list_checkpoints(out)):
            if ckpt.list_checkpoints(out) or not is_run_config(os.path.join(out, "config.yaml")):
                raise ValueError(f"--out: {out!r} already holds a run; continue it with --resume {out} or choose "
                                 f"another --out")
            self.log(f"blipfast train: {out} holds a run that stopped before its first checkpoint: starting it "
                     f"again from step 0")
        if resume is not None and ck is None and not is_run_config(os.path.join(out, "config.yaml")):
            raise ValueError(f"--resume: {out!r} has no checkpoint and its config.yaml was not written by blipfast "
                             f"train")
        if resume is not None and ck is None and d.main:
            self.log(f"blipfast train: --resume: {out} stopped before its first checkpoint: starting it again from "
                     f"step 0 with its config.yaml")
        try:
            if d.main and not os.path.isdir(out):
                os.makedirs(out)
                created = True
            self._setup(cfg, fresh=ck is None)
            self.data_id = self._data_identity()
            if ck is not None:
                state = ckpt.load_checkpoint(ck, self._read_weights)
                self._check_data(state.get("data"))
                self._restore(state)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            d.close()
            raise
        if d.main:
            write_config(os.path.join(out, "config.yaml"), cfg)
        self.end = self.total_steps if cfg["stop_after"] is None else min(self.total_steps, cfg["stop_after"])
        self.global_batch = cfg["batch_size"] * d.world * cfg["grad_accum"]
        if d.main:
            n_params = sum(p.numel() for p in self.core.parameters())
            n_train = sum(p.numel() for p in self.core.parameters() if p.requires_grad)
            trained = "" if n_train == n_params else f" ({n_train / 1e6:.2f} M trained)"
            data = (self.stream or self.ann).summary() + self.augment_note
            self.log(f"blipfast train: {self.task.title}, {data}; {d.world} process(es) on "
                     f"{d.device}, global batch {self.global_batch}, steps {self.step} -> {self.end} of "
                     f"{self.total_steps} ({self.steps_per_epoch:.1f} per epoch), {n_params / 1e6:.2f} M parameters"
                     f"{trained}, {cfg['precision']}; run folder {cfg['out']}")
        self.runlog = RunLog(out, d.main, self.total_steps, self.step, cfg["progress"], losses=self.task.losses)
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------------------------------
    # set-up

    def _setup(self, cfg: dict, fresh: bool) -> None:
        from ..data import FeatureCache, FeatureTextDataset, GlobalBatchSampler, collate, load_vision_tower
        from ..data.annotations import keep_pairs
        from ..data.datasets import caption_sampling

        d, dev, out, task = self.dist, self.dist.device, cfg["out"], self.task
        kind = input_kind(cfg["data"], cfg["features"])
        if cfg["preset"] == "auto":
            cfg["preset"] = "tiny" if kind == "synthetic" else "base"
        if kind == "synthetic":  # the synthetic set (the task's), generated into the run folder
            paths = task.synthetic(os.path.join(out, "synthetic"), cfg["synthetic_size"], cfg["seed"]) \
                if d.main else None
            d.barrier()
            cfg.update(d.broadcast(paths))
        feats = cfg["features"] is not None
        workers = cfg["num_workers"]
        if workers is None:
            workers = 0 if dev.type == "cpu" else min(8, max(1, (os.cpu_count() or 1) // max(1, d.world)))
        ann = cache = tower = processor = width = self.stream = None
        feature_dtype = DTYPES[cfg["feature_dtype"]]
        if kind in STREAMS:  # WebDataset or feature shards, streamed (blipfast.train.streams)
            self.stream = StreamInput(kind, cfg, d, workers=workers, auto_workers=cfg["num_workers"] is None)
            workers = self.stream.workers
            if feats:  # fp8 is decoded on the device to --feature-dtype
                width = self.stream.index.width
                feature_dtype = DTYPES.get(self.stream.index.dtype, feature_dtype)
        else:
            ann = task.read_data(cfg, feats)
        if feats and self.stream is None:  # the feature cache of an annotation file
            cache = FeatureCache(cfg["features"])
            reasons = {k: f"image {k!r} not in the feature cache {cfg['features']!r}" for k in ann.images}
            reasons.update({k: f"{why} (skipped by cache-features)" for k, why in cache.skipped.items()})
            ann = keep_pairs(ann, set(cache.where), reasons)
            width, feature_dtype = cache.width, cache.dtype
        elif not feats and task.trains_vision:  # the ViT is the model's: no frozen tower
            processor = task.image_processor(cfg, d)
        elif not feats:
            tower, processor = load_vision_tower(cfg["vision"], device=dev,
                                                 dtype=resolve_dtype(cfg["vision_dtype"], dev, flag="--vision-dtype"))
            width = tower.width
        self.ann = ann
        augment = self._augment(cfg, feats, processor)
        views = cache.views if cache is not None else 1
        self.augment_note = (f"; augmented ({augment.recipe})" if augment is not None else
                             f"; {views} augmented views per image ({cache.index.get('augment')}), one per visit"
                             if views > 1 else "")
        tok, cfg["tokenizer"] = task.tokenizer(cfg, ann, d)
        self.tokenizer = tok
        torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
        model, cfg["model"] = task.build(cfg, tok, width, dev, fresh=fresh)
        self.core = model
        if self.stream is not None:  # captions tokenised per batch in the loader workers
            self.stream.set_transforms(task, model, tok, processor, augment=augment)
            self._stream_loader = self.stream.loader()
            self.micro_per_epoch = self.stream.micro_per_epoch
        else:
            text = task.tokenize(model, tok, ann.captions, cfg)
        torch.manual_seed(mix_seed(cfg["seed"], 1 + d.rank) & ((1 << 62) - 1))  # dropout: each rank its own

        report = os.path.join(out, "bad_rows.txt") if d.main else None
        if self.stream is None:
            ds = FeatureTextDataset(ann, cache, text, seed=cfg["seed"]) if feats else \
                task.dataset(ann, cfg["images"], processor, text, report, augment=augment)
            ds, per_visit = caption_sampling(ds, ann, cfg["caption_sampling"], cfg["seed"])
            self.sampler = GlobalBatchSampler(len(ds), cfg["batch_size"], d.world, d.rank, seed=cfg["seed"],
                                              with_epoch=augment is not None or views > 1 or per_visit)
            self.micro_per_epoch = self.sampler.steps_per_epoch
            self.dataset, self._collate = ds, collate
        self.steps_per_epoch = self.micro_per_epoch / cfg["grad_accum"]
        if cfg["steps"] is None:
            cfg["steps"] = max(1, math.ceil((cfg["epochs"] or 10) * self.steps_per_epoch))
        self.total_steps = cfg["steps"]
        self.workers = workers
        if d.main and ann is not None:
            with open(report, "w") as fh:
                fh.writelines(m + "\n" for m in ann.bad)
            for m in ann.bad[:10]:
                self.log(f"  {m}")
            if len(ann.bad) > 10:
                self.log(f"  ... {len(ann.bad) - 10} more in {report}")

        amp = None if cfg["precision"] == "fp32" else DTYPES[cfg["precision"]]
        self.skeleton, replicated = None, None
        if self.fsdp:  # sharded in place before the optimizer is built over the shards (blipfast.train.fsdp)
            self.skeleton = fsdp.Skeleton(model)
            replicated = fsdp.wrap(model, dev, amp)
        self.optimizer = make_optimizer(model, cfg, dev, capturable=cfg["cuda_graph"], recipe=task.recipe)
        if replicated:
            fsdp.split_replicated(self.optimizer, replicated)
        self.schedule = make_schedule(self.optimizer, cfg, task.recipe, self.micro_per_epoch)
        self.scaler = torch.amp.GradScaler(dev.type) if cfg["precision"] == "fp16" else None
        wrapped = model
        if d.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            if frozen:  # the same files on every rank: no start-up broadcast of a frozen LLM
                DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
            wrapped = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
        if cfg["compile"]:
            wrapped = torch.compile(wrapped, backend=cfg["compile_backend"])
            if tower is not None:
                tower = torch.compile(tower, backend=cfg["compile_backend"])
        cls = GraphStepper if cfg["cuda_graph"] else Stepper
        self.stepper = cls(wrapped, self.optimizer, task.step_loss, device=dev, tower=tower, scaler=self.scaler,
                           amp_dtype=amp, grad_accum=cfg["grad_accum"], grad_clip=cfg["grad_clip"],
                           feature_dtype=feature_dtype, replicated=replicated)
        self.step = 0
        self.micro_step = 0
        self._iter = None
        self._data_wait, self._keys = 0.0, None

    def _augment(self, cfg: dict, feats: bool, processor):
        """The train transform of ``--augment`` (resolved in ``cfg``: auto is reference where images are decoded
        and the task's recipe has one, else none), at the processor's size, mean and std; None for none."""
        from ..data.transforms import TRAINING_RECIPES, train_transform

        if cfg["augment"] == "auto":
            cfg["augment"] = "reference" if not feats and self.task.recipe in TRAINING_RECIPES else "none"
        if cfg["augment"] == "none" or feats:
            return None
        return train_transform(self.task.recipe, processor, cfg["seed"])

    def _data_identity(self) -> Optional[dict]:
        """What the checkpoints record of the annotation file: path, size, SHA-256, rows and usable pairs."""
        ann = getattr(self, "ann", None)
        if ann is None or not os.path.isfile(ann.path):
            return None
        ident = identity(ann.path)
        return {"path": ident["path"], "size": ident["size"], "sha256": ident["sha256"], "rows": ann.rows,
                "pairs": len(ann)}

    def _check_data(self, saved: Optional[dict]) -> None:
        """``--resume``: refuse data whose usable pairs changed (the checkpoint's data position and order would
        point elsewhere); warn when the file changed with the same pairs count."""
        now = self.data_id
        if not saved or not now:
            return
        if (saved["rows"], saved["pairs"]) != (now["rows"], now["pairs"]):
            raise ValueError(f"--resume: the annotation file changed since the run started: {saved['path']} had "
                             f"{saved['rows']} rows ({saved['pairs']} image-text pairs), {now['path']} has "
                             f"{now['rows']} rows ({now['pairs']} pairs), so the checkpoint's position in the data "
                             f"no longer fits. Restore the file, or start a new run from these weights (--init "
                             f"{self.cfg['out']})")
        if (saved["size"], saved["sha256"]) != (now["size"], now["sha256"]) and self.dist.main:
            self.log(f"blipfast train: --resume: {now['path']} changed since the run started (same rows and pairs: "
                     f"{now['pairs']}); training continues on its new contents")

    def _read_weights(self, folder: str) -> None:
        """``--resume``: the checkpoint's weights; with ``--fsdp`` its DCP shards, the optimizer state too."""
        if self.fsdp:
            fsdp.load_sharded(self.core, self.optimizer, folder)
        else:
            self.task.load(self.core, folder)

    def _restore(self, state: dict) -> None:
        if "optimizer" in state:  # (--fsdp: read with the weights, from the DCP shards)
            self.optimizer.load_state_dict(state["optimizer"])
        for g in self.optimizer.param_groups:  # a capturable optimizer's lr tensor lives on the device
            if isinstance(g["lr"], torch.Tensor):
                g["lr"] = g["lr"].to(self.dist.device)
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world:
            ckpt.set_rng_state(rngs[self.dist.rank])
        elif self.dist.main:
            self.log(f"--resume: the checkpoint has RNG states of {len(rngs)} process(es), this run has "
                     f"{self.dist.world}: dropout continues from fresh seeds (the data order is unaffected)")
        if self.stream is not None:  # each rank's stream position
            self._stream_loader = self.stream.loader(self.stream.check_states(state.get("data_streams"),
                                                                              self.micro_step))

    def _batches(self):
        from torch.utils.data import DataLoader

        if self.stream is not None:
            return iter(self._stream_loader)
        self.sampler.start = self.micro_step
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self._collate,
                            num_workers=self.workers, pin_memory=self.dist.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.cfg["seed"]),
                            persistent_workers=False, prefetch_factor=4 if self.workers else None)
        return iter(loader)

    # ------------------------------------------------------------------------------------------
    # the loop

    def train_step(self) -> torch.Tensor:
        """One optimizer step (``grad_accum`` micro-steps); the mean losses as a device tensor (no sync)."""
        if self._iter is None:
            self._iter = self._batches()
        acc = None
        n = self.cfg["grad_accum"]
        for k in range(n):
            t = time.perf_counter()
            batch = next(self._iter)
            self._data_wait += time.perf_counter() - t  # the time this step waited for its batch
            keys = batch.pop("__key__", None)
            if self._keys is not None:
                self._keys.write(self.micro_step, keys if keys is not None else batch["index"].tolist())
            batch.update({name: torch.tensor(v, dtype=torch.float32)
                          for name, v in self.task.step_inputs(self.micro_step, self.micro_per_epoch).items()})
            m = self.stepper.micro(batch, mix_seed(self.cfg["seed"], self.micro_step), last=k == n - 1)
            self.micro_step += 1
            acc = m if acc is None else acc + m
        self.step += 1
        self.schedule.step()
        return acc / n if n > 1 else acc

    def save(self) -> Optional[str]:
        d = self.dist
        rng = ckpt.rng_state()
        if d.world > 1:
            rngs = [None] * d.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        streams = None
        if self.stream is not None:  # every rank's stream position after the batches trained on
            streams = [self._stream_loader.state_dict()]
            if d.world > 1:
                streams = [None] * d.world
                dist.all_gather_object(streams, self._stream_loader.state_dict())
        path, write_weights = None, self._write_weights
        if self.fsdp:  # every rank writes its DCP shards into the folder rank 0 opens; rank 0 the gathered weights
            tmp = d.broadcast(ckpt.open_checkpoint(self.cfg["out"], self.step) if d.main else None)
            d.barrier()
            fsdp.save_sharded(self.core, self.optimizer, tmp)
            full = fsdp.full_weights(self.core)
            write_weights = (lambda folder: self._write_weights(folder, self.skeleton.filled(full))) if d.main \
                else None
        if d.main:
            state = {"schedule": self.schedule.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "rng": rngs,
                     "step": self.step, "micro_step": self.micro_step, "world_size": d.world, "data": self.data_id,
                     **({"data_streams": streams} if streams is not None else {}),
                     **({} if self.fsdp else {"optimizer": self.optimizer.state_dict()})}
            path = ckpt.save_checkpoint(self.cfg["out"], self.step, write_weights, state, self.cfg["keep"],
                                        opened=self.fsdp)
        d.barrier()
        return path

    def _write_weights(self, folder: str, model=None) -> None:
        self.task.save(self.core if model is None else model, folder, self.step, self.cfg["save_lavis"])

    def _evaluate_after(self, before: int) -> None:
        """``--eval-every N``: the task's ``evaluate`` when this step ended an N-th epoch; rank 0 appends the
        metrics to ``RUN/eval.jsonl`` and logs them."""
        every, spe = self.cfg.get("eval_every") or 0, self.micro_per_epoch
        epoch = self.micro_step // spe
        if not every or epoch == before // spe or epoch % every:
            return
        metrics = self.task.evaluate(self.core, self.cfg, self.dist, epoch)
        if metrics is not None and self.dist.main:
            import json

            with open(os.path.join(self.cfg["out"], "eval.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": self.step, "epoch": epoch, **metrics}) + "\n")
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            self.log(f"blipfast train: evaluation after epoch {epoch} (step {self.step}): {shown}")
        self.dist.barrier()

    def _data_row(self) -> dict:
        """The log row's data fields: ``data_wait_s``, the seconds the steps since the last row waited for their
        batches (the mean over the ranks), and for a stream ``bad_samples``, the samples skipped since its start
        (all ranks)."""
        vals = [self._data_wait] + ([float(self._stream_loader.bad_samples)] if self.stream is not None else [])
        self._data_wait = 0.0
        if self.dist.world > 1:
            t = torch.tensor(vals, dtype=torch.float64, device=self.dist.device)
            dist.all_reduce(t)
            vals = t.tolist()
            vals[0] /= self.dist.world
        return {"data_wait_s": round(vals[0], 4), **({"bad_samples": int(vals[1])} if len(vals) > 1 else {})}

    def _request_stop(self, signum, _frame):
        self.stop_requested = True
        self.log(f"blipfast train: signal {signum}: stopping after this step with a checkpoint")

    def run(self) -> dict:
        cfg, d = self.cfg, self.dist
        end, global_batch = self.end, self.global_batch
        old = {}
        if d.world == 1 and hasattr(signal, "SIGTERM"):
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    old[s] = signal.signal(s, self._request_stop)
                except ValueError:  # not the main thread
                    pass
        acc, n_acc, t_last, saved_at = None, 0, time.perf_counter(), None
        if cfg["log_keys"]:
            self._keys = KeysLog(cfg["out"], d.rank, self.micro_step)
        window: list = []  # the losses of this row's steps, device tensors read only when a row is not finite
        try:
            while self.step < end and not self.stop_requested:
                before = self.micro_step
                try:
                    m = self.train_step()
                except (ValueError, RuntimeError) as exc:  # e.g. a temperature gone NaN after a NaN step
                    try:
                        msg = self._not_finite(window, self.step + 1 - len(window), across_ranks=False)
                    except Exception:  # noqa: BLE001 - a device that cannot be read (a CUDA assert): the error as is
                        msg = None
                    if msg:
                        raise LossNotFinite(msg) from exc
                    raise
                window.append(m)
                self._evaluate_after(before)
                acc, n_acc = (m if acc is None else acc + m), n_acc + 1
                s = self.step
                if s % cfg["log_every"] == 0 or s == end or self.stop_requested:
                    acc = acc / n_acc
                    if d.world > 1:  # the mean over the ranks: the loss of the global batch
                        dist.all_reduce(acc)
                        acc = acc / d.world
                    vals = acc.tolist()  # the one host sync per log row
                    if not all(math.isfinite(v) for v in vals):  # the same on every rank (a reduced row)
                        raise LossNotFinite(self._not_finite(window, s + 1 - len(window), across_ranks=True)
                                            or f"loss is not finite in steps {s + 1 - len(window)}-{s}")
                    window = []
                    now = time.perf_counter()
                    row = {"step": s, "epoch": round(self.micro_step / self.micro_per_epoch, 4),
                           **dict(zip(self.task.losses, vals)), "lr": self.schedule.value(s - 1),
                           "images_per_s": global_batch * n_acc / max(now - t_last, 1e-9),
                           "memory_mb": round(peak_memory_mb(d.device), 1), "time_s": round(now - self.t0, 3),
                           **self._data_row()}
                    self.runlog.log(row)
                    acc, n_acc, t_last = None, 0, now
                if cfg["plot_every"] and s % cfg["plot_every"] == 0:
                    self.runlog.plot()
                if cfg["save_every"] and s % cfg["save_every"] == 0:
                    self.save()
                    saved_at = s
                self.runlog.advance()
            if saved_at != self.step:
                self.save()
            self.runlog.plot()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.runlog.close()
            if self._keys is not None:
                self._keys.close()
        last = self.runlog.rows[-1] if self.runlog.rows else {}
        finished = self.step >= self.total_steps
        if d.main:
            done = "finished" if finished else f"stopped at step {self.step} (--resume {cfg['out']} to continue)"
            self.log(f"blipfast train: {done}; loss {last.get('loss', float('nan')):.4f}, "
                     f"{time.perf_counter() - self.t0:.1f} s; {cfg['out']}")
        return {"step": self.step, "run_dir": cfg["out"], "last": last, "finished": finished}

    def _not_finite(self, window: list, first: int, across_ranks: bool) -> Optional[str]:
        """The message of a diverged run, or None: the first of the steps ``first``, ... (their losses
        ``window``) whose loss is not finite, else trained weights that are not finite. Reads the losses (a host
        sync: only when a row is not finite or a step failed); ``across_ranks``: every rank calls it, and the
        verdict is the ranks' (a step is bad when it is bad on any rank)."""
        d, out = self.dist, self.cfg["out"]
        bad = torch.stack([~torch.isfinite(w).all() for w in window]).float() if window else torch.zeros(0)
        if across_ranks and d.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        hits = bad.nonzero().flatten().tolist()
        if hits:
            what = f"loss is not finite at step {first + hits[0]}"
            if d.world == 1:
                vals = window[hits[0]].tolist()
                what += " (" + ", ".join(f"{k} {v:g}" for k, v in zip(self.task.losses, vals)) + ")"
        else:
            names = [n for n, p in self.core.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
            if not names:
                return None
            what = f"trained weights are not finite after step {self.step} ({', '.join(names[:3])}" + \
                (f" and {len(names) - 3} more)" if len(names) > 3 else ")")
        kept = ckpt.list_checkpoints(out)
        where = (f"{out} keeps its checkpoints up to {os.path.basename(kept[-1])}" if kept else
                 f"{out} has no checkpoint yet (--resume starts it again from step 0)")
        return (f"{what}; the run stopped without saving these steps: {where}. Resuming repeats the same steps: "
                f"train again with a lower --lr, --grad-clip (e.g. 1.0) or --precision fp32"
                + (f" (a new run with --init {kept[-1]} starts from its weights)" if kept else ""))

    def close(self) -> None:
        self.dist.close()


def train(cfg: dict, given: Optional[dict] = None, resume: Optional[str] = None, log=print) -> dict:
    trainer = Trainer(cfg, given, resume, log=log)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["LossNotFinite", "Trainer", "train", "mix_seed"]
