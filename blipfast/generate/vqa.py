"""``blipfast vqa``: answer the question of every row of a JSONL file (``{"image": path, "question": text}``) with
a BLIP-2 / InstructBLIP model (docs/semantics.md#generation: prompt "Question: {} Short answer:", beam 5, at most 10
and at least 1 new tokens), batched, one JSONL row per question."""
from __future__ import annotations

from .engine import add_common_arguments, run_task

PROMPT = "Question: {} Short answer:"
DEFAULTS = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1}


def add_arguments(p) -> None:
    add_common_arguments(p, prompt=PROMPT, defaults=DEFAULTS, questions=True)


def run(args) -> int:
    return run_task(args, task="vqa")
