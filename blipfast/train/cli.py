"""``blipfast train``: train a task (--task NAME, see blipfast.train.tasks): BLIP-2 stage 1 on a frozen vision
encoder (blip2-stage1, the default: ITC + ITM + ITG of the Q-Former), stage 2 (blip2-stage2, or --stage 2: the
stage-1 Q-Former bridged to a frozen LLM by an LM loss on the captions) or BLIP pre-training (blip-pretrain, or
--model blip).

Examples:
  blipfast train                                               # synthetic set, tiny model, CPU-sized
  blipfast train --data ann.jsonl --images IMG --vision VIT --out runs/a
  blipfast cache-features --data ann.jsonl --images IMG --vision VIT --out feats
  blipfast train --data ann.jsonl --features feats --out runs/b --config stage1.yaml
  torchrun --nproc-per-node 8 -m blipfast.cli train --data ann.jsonl --features feats --out runs/c
  blipfast train --resume runs/c
  blipfast train --stage 2 --llm OPT_DIR --init runs/c --data ann.jsonl --features feats --out runs/d
  blipfast train --stage 2 --llm T5_DIR --init blip2.pth --data ann.jsonl --images IMG --vision VIT --out runs/e
  blipfast train --task blip-pretrain --data ann.jsonl --images IMG --out runs/f
  blipfast train --data "shards/{00000..01743}.tar" --vision VIT --tokenizer BERT --out runs/g
  blipfast cache-features --data "shards/{00000..01743}.tar" --vision VIT --out feats --dtype fp8
  blipfast train --features feats --tokenizer BERT --out runs/h
"""
from __future__ import annotations

import argparse
import os
import sys

from ..options import EXIT_NOT_FINITE, EXIT_OK, EXIT_STOPPED, EXIT_USAGE
from .config import add_arguments as _add_options
from .config import resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = "\n".join(__doc__.split("\n\n")[1:]) + (
        "\nThe run folder gets config.yaml (the resolved options), log.jsonl, loss.png, bad_rows.txt, tokenizer/ "
        "(when trained) and checkpoint-<step>/ folders (model.safetensors, state.pt, lavis.pth with --save-lavis; "
        "stage 2: only the trained tensors, with a config.json).\n"
        "Defaults: the built-in ones < the task's recipe (--task) < the synthetic set's (only without --data) < "
        "--config < flags; each option's help lists the defaults that differ.\n"
        f"Exit codes: {EXIT_OK} finished; {EXIT_STOPPED} stopped early and resumable (SIGTERM, SIGINT, --stop-after: "
        f"run it again with --resume; under torchrun {EXIT_OK}, as torchrun reports any other code as a failure); "
        f"{EXIT_NOT_FINITE} the loss is not finite; {EXIT_USAGE} refused (the message names the option or file). "
        f"See docs/troubleshooting.md.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_options(p)


def run(args) -> int:
    """The exit code (:mod:`blipfast.options`): finished, stopped early and resumable, loss not finite, refused."""
    from .loop import LossNotFinite, train

    try:
        cfg, given = resolve(args)
        result = train(cfg, given, resume=args.resume)
    except LossNotFinite as exc:
        print(f"blipfast train: {exc}", file=sys.stderr, flush=True)
        return EXIT_NOT_FINITE
    except ValueError as exc:
        print(f"blipfast train: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if not result["finished"] and os.environ.get("TORCHELASTIC_RUN_ID") is None:
        return EXIT_STOPPED
    return EXIT_OK  # (under torchrun, whose agent reports any other code as a failed worker with a traceback)
