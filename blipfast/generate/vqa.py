"""``blipfast vqa``: answer the question of every row of a JSONL file (``{"image": path, "question": text}``) with
a BLIP-2 / InstructBLIP model, batched, one JSONL row per question. Decoding: LAVIS' zero-shot VQA settings
(``predict_answers``) for the model's LLM: prompt "Question: {} Short answer:", beam 5, at most 10 new tokens,
length penalty -1 for Flan-T5 and 0 for OPT (:meth:`blipfast.Blip2Stage2.decoding_settings`)."""
from __future__ import annotations

from .engine import add_common_arguments, run_task

SETTINGS = ("vqa",)


def add_arguments(p) -> None:
    add_common_arguments(p, settings=SETTINGS, questions=True)


def run(args) -> int:
    return run_task(args, task="vqa")
