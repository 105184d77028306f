"""The trainer behind ``blipfast train``: options (config.py), AdamW and the warm-up/cosine schedule (optim.py),
the step (step.py: eager, compiled or CUDA graphs), checkpoints (checkpoint.py), log/plot/progress (logger.py)
and the loop over torch.distributed processes (loop.py); what it trains is a task of tasks/ (base.py's ``Task``
contract, one file per task, found by ``--task NAME``)."""
from .loop import Trainer, train

__all__ = ["Trainer", "train"]
