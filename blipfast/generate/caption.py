"""``blipfast caption``: caption every image of a folder or a JSONL file with a BLIP-2 model
(docs/semantics.md#generation: beam 5, at most 30 and at least 1 new tokens, no prompt), batched, one JSONL row per
image."""
from __future__ import annotations

from .engine import add_common_arguments, run_task

DEFAULTS = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}


def add_arguments(p) -> None:
    add_common_arguments(p, prompt="", defaults=DEFAULTS, questions=False)


def run(args) -> int:
    return run_task(args, task="caption")
