"""``blipfast export``: a fine-tuned BLIP-2 run (``blipfast train --task blip2-caption``) written as a complete
Hugging Face ``Blip2ForConditionalGeneration`` folder (docs/blip2-finetune.md).

    blipfast export runs/caption --out blip2-caption-coco/ [--llm opt-2.7b/]

The run (its last checkpoint, or the checkpoint folder given) is rebuilt as ``blipfast caption`` / ``blipfast eval
caption --model RUN`` load it (:func:`blipfast.models.blip2_finetuned.load_finetuned`: the checkpoint's ViT at its
resolution, ``ln_vision``, Q-Former, queries and projection, the frozen LLM the run recorded or ``--llm``), in
float32, and saved with ``save_pretrained``: the weights and config, the tokenizer, the image processor (LAVIS'
``blip_image_eval`` at the run's resolution) and a ``Blip2Processor`` config, so that transformers'
``Blip2ForConditionalGeneration.from_pretrained`` / ``Blip2Processor.from_pretrained`` and blipfast's ``--model``
read it.

transformers' BLIP-2 marks the image positions of ``input_ids`` with an image token (``image_token_index``): the
tokenizer gets ``<image>``, on the first embedding row it does not use (OPT-2.7b and Flan-T5 have spare rows; an
LLM without one gets one more row, transformers' ``resize_token_embeddings``, as transformers' own conversion of
LAVIS' checkpoints does). What transformers' classes cannot say is kept in ``config.json`` under ``blipfast``:
``ln_vision_eps`` (LAVIS' ``ln_vision`` is a LayerNorm of epsilon 1e-5 where the ViT's own norms use 1e-6;
transformers uses the ViT's ``layer_norm_eps`` for both, blipfast's loader restores it) and ``text_suffix`` (the
end the run trained its captions with: OPT's "\\n", LAVIS' ``eos_token_id``, where ``blipfast eval caption`` stops).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..options import EXIT_OK, EXIT_USAGE

IMAGE_TOKEN = "<image>"


def add_arguments(p) -> None:
    p.add_argument("run", help="a blipfast train run folder of --task blip2-caption (its last checkpoint) or one of "
                   "its checkpoint-<step> folders")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--llm", help="the frozen LLM's folder (default: the one the run recorded)")


def export_run(run_path, out, *, llm=None) -> Path:
    """Write the fine-tuned run ``run_path`` as an HF ``Blip2ForConditionalGeneration`` folder ``out`` (see the
    module docstring); returns ``out``. ValueError naming the argument for anything it cannot use."""
    from transformers import AddedToken, AutoTokenizer, Blip2Processor

    from ..data.vision import default_blip_processor, quiet_transformers
    from ..models.blip2_finetuned import finetuned_run, load_finetuned

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} exists and is not an empty folder")
    run = finetuned_run(run_path, llm=llm, what="RUN")
    if run is None:
        raise ValueError(f"RUN: {run_path} is not a fine-tuned BLIP-2 run or checkpoint (a blipfast train run of "
                         f"--task blip2-caption, whose checkpoints hold the ViT)")
    if run.instruct:
        raise ValueError(f"RUN: {run_path} is a blip2-vqa run (the InstructBLIP form), which export does not write "
                         f"yet; blipfast eval vqa --model takes the run itself")
    with quiet_transformers():
        model = load_finetuned(run, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(run.tokenizer)
    hf = model.model
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_token = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = model.language_model.get_input_embeddings().num_embeddings
    if image_token >= rows:  # no spare row: one more (transformers' conversion of LAVIS' checkpoints does the same)
        model.language_model.resize_token_embeddings(image_token + 1)
        hf.config.text_config = model.language_model.config
    hf.config.image_token_index = image_token
    hf.config.blipfast = {"task": run.task, "source": run.source.checkpoint or run.source.path,
                          "ln_vision_eps": run.ln_vision_eps, "text_suffix": run.text_suffix,
                          "note": "a blipfast fine-tuned BLIP-2 run, exported; ln_vision_eps: LAVIS' ln_vision "
                                  "epsilon (transformers uses vision_config.layer_norm_eps)"}
    processor = default_blip_processor(run.image_size)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        Blip2Processor(image_processor=processor, tokenizer=tok,
                       num_query_tokens=model.num_query_tokens).save_pretrained(out)
        model.save_pretrained(out, tokenizer=tok, image_processor=processor)
    return out


def run(args) -> int:
    try:
        out = export_run(args.run, args.out, llm=args.llm)
    except ValueError as e:
        print(f"blipfast export: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"blipfast export: {args.run} -> {out} (Blip2ForConditionalGeneration, with its tokenizer and image "
          f"processor)", file=sys.stderr)
    return EXIT_OK
