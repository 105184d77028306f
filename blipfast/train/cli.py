"""``blipfast train``: BLIP-2 stage-1 pre-training (ITC + ITM + ITG) of the Q-Former on a frozen vision encoder, or
BLIP (v1) pre-training with ``--model blip`` (ITC with momentum encoders and queues, ITM, LM; the ViT trains).

Examples:
  blipfast train                                               # synthetic set, tiny model, CPU-sized
  blipfast train --data ann.jsonl --images IMG --vision VIT --out runs/a
  blipfast cache-features --data ann.jsonl --images IMG --vision VIT --out feats
  blipfast train --data ann.jsonl --features feats --out runs/b --config stage1.yaml
  torchrun --nproc-per-node 8 -m blipfast.cli train --data ann.jsonl --features feats --out runs/c
  blipfast train --resume runs/c
  blipfast train --model blip                                  # BLIP pre-training on the synthetic set
  blipfast train --model blip --data ann.jsonl --images IMG --vision BLIP_VIT --tokenizer BERT --out runs/d
"""
from __future__ import annotations

import argparse
import sys

from .config import add_arguments as _add_options
from .config import resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = "\n".join(__doc__.split("\n\n")[1:]) + (
        "\nThe run folder gets config.yaml (the resolved options), log.jsonl, loss.png, bad_rows.txt, tokenizer/ "
        "(when trained) and checkpoint-<step>/ folders (model.safetensors, state.pt, lavis.pth with --save-lavis).")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_options(p)


def run(args) -> int:
    from .loop import train

    try:
        cfg, given = resolve(args)
        train(cfg, given, resume=args.resume)
    except ValueError as exc:
        print(f"blipfast train: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
