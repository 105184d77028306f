"""Command line: ``blipfast <command>``; thin: parses flags and calls the modules that do the work.

``blipfast bench`` (the main job) times blipfast against its baselines on whatever device is there (a CUDA
GPU when one is visible, else the CPU), prints one table and writes the JSON under benchmarks/results/.

Each command lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
``COMMANDS`` maps the command name to that module and its one-line help. :func:`main` imports only the module of
the command it runs (``blipfast --help`` lists the commands from ``COMMANDS`` without importing any), so
``blipfast info`` stays fast; ``build_parser()`` without a command builds every command's flags (it imports them
all).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, Optional

# command -> (module exposing add_arguments/run, help)
COMMANDS = {
    "bench": ("blipfast.bench.cli", "time blipfast against its baselines on this machine's device"),
    "info": ("blipfast._ext", "print what was built (extension, CUDA archs, Triton)"),
    "selftest": ("blipfast.selftest.cli", "check every fused kernel against its reference on this device"),
    "caption": ("blipfast.generate.caption", "caption a folder or JSONL of images with a BLIP-2 model (JSONL out)"),
    "vqa": ("blipfast.generate.vqa", "answer the questions of a JSONL of images with a BLIP-2 model (JSONL out)"),
    "train": ("blipfast.train.cli", "BLIP-2 stage-1 (ITC + ITM + ITG) or stage-2 (frozen LLM) training from images "
              "or cached features, or BLIP pre-training (--model blip: ITC with momentum queues + ITM + LM)"),
    "cache-features": ("blipfast.data.features", "run a frozen vision encoder once and store its tokens"),
    "retrieval": ("blipfast.retrieval_cli", "BLIP-2 image-text retrieval of a gallery: recall@1/5/10 (ITC + ITM)"),
    "capfilt": ("blipfast.capfilt_blip2", "BLIP's CapFilt: caption every web image, keep the texts the ITM filter "
                "matches (--mode blip2: BLIP-2's bootstrapping, the samples CLIP ranks best)"),
    "export": ("blipfast.generate.export", "write a fine-tuned BLIP-2 run (blip2-caption) as a Hugging Face "
               "Blip2ForConditionalGeneration folder"),
    "eval": ("blipfast.evaluation.cli", "score captions, VQA / GQA answers, NLVR2 labels or retrieval scores "
             "the way the papers' tables were scored"),
}


def _module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``blipfast`` parser; the flags of ``commands`` (their modules imported; None: every command) are added,
    the others are listed with their help only."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="blipfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name in wanted:
            _module(name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level takes no option but --help
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    return int(_module(args.cmd).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
