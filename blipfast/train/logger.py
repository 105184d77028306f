"""What a run shows and leaves behind: ``log.jsonl`` (one row per logged step), ``loss.png`` and a tqdm bar.

A row: ``step``, ``epoch`` (fractional), the losses (stage 1: ``loss``, ``loss_itc``, ``loss_itm``, ``loss_lm``;
stage 2: ``loss``; each the mean over the steps since the previous row), ``lr`` (of the row's last step),
``images_per_s`` (global: all processes), ``memory_mb`` (peak CUDA memory allocated, or the process' peak resident
memory on a CPU) and ``time_s`` since the start of the invocation. Only rank 0 writes. On ``--resume`` the rows
after the checkpoint's step (written by the interrupted invocation after its last checkpoint) are dropped, so the
log reads as one run.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

LOSSES = ("loss", "loss_itc", "loss_itm", "loss_lm")


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 losses: tuple = LOSSES):
        self.enabled = enabled
        self.losses = tuple(losses)
        self.path = os.path.join(run_dir, "log.jsonl")
        self.png = os.path.join(run_dir, "loss.png")
        self.rows: list = []
        self.bar = None
        if not enabled:
            return
        if os.path.isfile(self.path):  # resume: keep the rows up to the checkpoint
            with open(self.path) as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
                    if row.get("step", 0) <= start_step:
                        self.rows.append(row)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 img_s=f"{row['images_per_s']:.1f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def plot(self) -> Optional[str]:
        """(Re)write loss.png from the rows so far (matplotlib, Agg; atomically)."""
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        for i, key in enumerate(self.losses):
            ax.plot(steps, [r[key] for r in self.rows], "--" if i else "-", label=key, linewidth=1 if i else 1.5)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"blipfast train: step {steps[-1]}, loss {self.rows[-1]['loss']:.4f}", fontsize=9)
        ax_lr.plot(steps, [r["lr"] for r in self.rows], color="gray")
        ax_lr.set_ylabel("lr")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.png + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)
        return self.png

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self._fh.close()
