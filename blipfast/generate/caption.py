"""``blipfast caption``: caption every image of a folder or a JSONL file with a BLIP-2 model, batched, one JSONL row
per image. Decoding: LAVIS' ``--settings`` for the model's LLM (:meth:`blipfast.Blip2Stage2.decoding_settings`):
``caption`` (default: LAVIS' ``generate`` defaults, beam 5, max_length 30 = at most 29 new tokens for OPT, 30 for
Flan-T5, no prompt) or ``coco`` (BLIP-2's COCO evaluation: prompt "a photo of", beam 5, max 30, min 8)."""
from __future__ import annotations

from .engine import add_common_arguments, run_task

SETTINGS = ("caption", "coco")


def add_arguments(p) -> None:
    add_common_arguments(p, settings=SETTINGS, questions=False)


def run(args) -> int:
    return run_task(args, task="caption")
