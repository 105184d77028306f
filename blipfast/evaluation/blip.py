"""BLIP (v1) task models in the end-to-end mode of ``blipfast eval caption`` / ``blipfast eval vqa``
(docs/evaluation.md): the model's kind told by its files, its predictions made as BLIP's evaluation makes them.

    blipfast eval vqa --model VQA_RUN --data vqa_val_eval.json --images COCO --answer-list answer_list.json
    blipfast eval vqa --model model_base_vqa_capfilt_large.pth --tokenizer bert-base-uncased/ --data ... \\
        --images ... --inference generate
    blipfast eval vqa --model VQA_RUN --data msrvtt_qa_test.json --images VIDEOS --video [--num-frames 16]
    blipfast eval caption --model model_base_caption_capfilt_large.pth --tokenizer bert-base-uncased/ \\
        --data coco_karpathy_test.json --images COCO

Which model (:func:`model_kind`): a ``blipfast train`` run or checkpoint folder says it in its ``config.yaml``
(``task: blip-vqa`` / ``blip-caption``); a Salesforce BLIP ``.pth`` (or a safetensors file) by its keys: a VQA model
has the image-grounded question encoder and the answer decoder (``text_encoder.*`` and ``text_decoder.*``, no ITC
projections), a captioner the decoder only. Anything else (an HF folder, a BLIP-2 run) goes to the BLIP-2 generator;
a BLIP (v1) model of another task is refused naming it. Models load through
:func:`blipfast.vqa_nlvr.load_task_model`; images through BLIP's evaluation transform at the model's resolution
(:func:`blipfast.data.vision.default_blip_processor`, ``transform_test``), as the tasks' own evaluation does.

- VQA (:func:`blipfast.vqa_nlvr.answer_questions`): ``--inference rank`` (default; BLIP's ``rank_answer`` over
  ``--answer-list``, a JSON list as LAVIS' ``answer_list.json``, ``--k`` 128 candidates: ``configs/vqa.yaml``'s
  ``k_test``) or ``--inference generate`` (beam 3, at most 10 tokens; ``--num-beams`` and ``--generate-kwargs`` go
  to :meth:`blipfast.BlipVQA.generate_answers`). Questions through BLIP's ``pre_question``. ``--video``: every
  reference row's ``video`` (or ``image``) path is a video, a folder of frames or a video file (PyAV), of which
  ``--num-frames`` (16, the BLIP paper's zero-shot video QA) frames are sampled uniformly
  (:func:`blipfast.data.video.read_frames`) and their ViT tokens concatenated.
- Captions (:meth:`blipfast.models.blip_caption.BlipCaptioner.caption`): BLIP's decoding, Salesforce BLIP's
  ``configs/caption_coco.yaml`` (``num_beams: 3``, ``max_length: 20``, ``min_length: 5``, ``prompt: 'a picture of
  '``) as ``train_caption.py``'s ``evaluate`` calls ``model.generate(image, sample=False, ...)``: beam search with
  ``BLIP_Decoder.generate``'s repetition penalty 1.0; the lengths count the prompt's tokens ([DEC] and the prompt's
  words), the prompt is cut from the text. LAVIS' ``blip_caption`` (``caption_coco_ft``) decodes the same way.
  ``--prompt``, ``--num-beams`` and ``--generate-kwargs`` (``max_length``, ``min_length``, ``repetition_penalty``,
  ``sample``, ``top_p``: :meth:`~blipfast.models.blip_caption.BlipCaptioner.generate`'s) win over them;
  ``--max-new-tokens`` / ``--min-new-tokens`` / ``--length-penalty`` are BLIP-2's and refused.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["BLIP_TASKS", "check_blip_flags", "model_kind", "predict"]

BLIP_TASKS = {"blip-vqa": "vqa", "blip-caption": "caption"}
CAPTION_KWARGS = ("num_beams", "max_length", "min_length", "repetition_penalty", "sample", "top_p")
BLIP2_ONLY = ("max_new_tokens", "min_new_tokens", "length_penalty")
K_TEST = 128  # Salesforce BLIP configs/vqa.yaml


def _weights_kind(keys) -> Optional[str]:
    """The BLIP (v1) task of a state dict's keys (Salesforce, LAVIS or blipfast / HF names), None when not BLIP."""
    enc = any(k.startswith("text_encoder.") for k in keys)
    dec = any(k.startswith("text_decoder.") for k in keys)
    itc = any(k.startswith(("vision_proj.", "text_proj.")) for k in keys)
    if enc and dec:
        return "pretrain" if itc else "vqa"
    if dec:
        return "caption"
    if enc:
        return "nlvr" if any(k.startswith("cls_head.") for k in keys) else "retrieval"
    return None


def model_kind(path, task: str) -> tuple:
    """(``"vqa"`` / ``"caption"`` for a BLIP (v1) model of ``task``, or None for a BLIP-2 model; the state dict
    when it was read to tell). ValueError naming ``--model`` for a BLIP (v1) model of another task."""
    from .. import convert

    src = convert.resolve_source(path, what="--model")
    sd = None
    if src.run_config is not None:
        name = src.run_config.get("task")
        kind = BLIP_TASKS.get(name) or ("other" if str(name).startswith("blip-") else None)
        what = f"a blipfast train run of --task {name}"
    elif src.kind in ("torch", "safetensors") and os.path.isfile(src.weights):
        sd = convert.load_state_dict(src.weights)
        kind = _weights_kind(sd)
        what = f"a BLIP (v1) {kind} checkpoint"
    else:
        return None, None
    if kind is None or kind == task:
        return kind, sd
    need = {"vqa": "a VQA model (a blip-vqa run or model_base_vqa_capfilt_large.pth)",
            "caption": "a captioning model (a blip-caption run or model_base_caption_capfilt_large.pth)"}[task]
    raise ValueError(f"--model: {path} is {what}; blipfast eval {task} needs {need}")


def _decoding(args, task: str) -> dict:
    """The generate arguments of ``args`` for a BLIP (v1) model; ValueError naming the flag that does not apply."""
    from ..generate.engine import _generate_kwargs

    kw = _generate_kwargs(args, {})
    for name in BLIP2_ONLY:
        if name in kw:
            raise ValueError(f"--{name.replace('_', '-')} is a BLIP-2 flag: BLIP (v1) lengths count the prompt's "
                             "tokens, as BLIP's generate; give --generate-kwargs '{\"max_length\": N, \"min_length\": "
                             "M}'" + (" (with --inference generate)" if task == "vqa" else ""))
    if task == "caption":
        bad = sorted(set(kw) - set(CAPTION_KWARGS))
        if bad:
            raise ValueError(f"--generate-kwargs: {bad} are not arguments of BLIP's caption generation (it takes "
                             f"{', '.join(CAPTION_KWARGS)})")
    elif kw and args.inference != "generate":
        raise ValueError(f"--num-beams / --generate-kwargs ({', '.join(sorted(kw))}) belong to --inference generate; "
                         "rank inference has no decoding settings")
    return kw


def check_blip_flags(args, task: str) -> dict:
    """Check the flags of a BLIP (v1) model before it loads; returns the generate arguments."""
    if task == "vqa":
        if args.prompt is not None:
            raise ValueError("--prompt is a BLIP-2 flag: BLIP (v1) VQA encodes the question itself")
        if args.inference == "rank" and args.answer_list is None:
            raise ValueError("--answer-list FILE is needed with --inference rank (the default for BLIP (v1) VQA): "
                             "the JSON list of candidate answers (LAVIS' answer_list.json); or --inference generate")
        if args.k is not None and args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        if args.num_frames is not None and args.num_frames < 1:
            raise ValueError(f"--num-frames must be >= 1, got {args.num_frames}")
    return _decoding(args, task)


def _processor(model):
    from ..data.vision import default_blip_processor

    return default_blip_processor(model.config.vision.image_size)


def _answers(args, model, tok, jobs: list, kw: dict) -> list:
    from ..data.vqa import VqaAnnotations, pre_question, read_answer_list
    from ..vqa_nlvr import answer_questions

    answers = read_answer_list(args.answer_list) if args.inference == "rank" else None
    where: dict = {}
    index = [where.setdefault(str(path), len(where)) for _, path, _ in jobs]
    n = len(jobs)
    ann = VqaAnnotations(path=str(args.annotations), images=list(where), image_index=index, image_id=list(range(n)),
                         captions=[pre_question(q) for _, _, q in jobs], lines=list(range(1, n + 1)), bad=[], rows=n)
    return answer_questions(model, tok, ann, None, _processor(model), answer_list=answers, inference=args.inference,
                            k=args.k or K_TEST, batch_size=args.batch_size, video=args.video,
                            num_frames=args.num_frames or 16, progress=args.progress, generate_kwargs=kw)


def _captions(args, model, tok, jobs: list, kw: dict) -> list:
    import sys

    import torch
    from tqdm import tqdm

    from ..data.vision import load_image, preprocess
    from ..models.blip_caption import PROMPT

    proc, prompt, out = _processor(model), PROMPT if args.prompt is None else args.prompt, []
    with tqdm(total=len(jobs), desc="blipfast eval caption", unit="img", file=sys.stderr,
              disable=not args.progress) as bar:
        for i in range(0, len(jobs), args.batch_size):
            batch = jobs[i:i + args.batch_size]
            px = torch.stack([preprocess(proc, load_image(str(path))) for _, path, _ in batch])
            out += model.caption(px, tok, prompt=prompt, **kw)
            bar.update(len(batch))
    return out


def predict(args, kind: str, state_dict, jobs: list, kw: dict) -> tuple:
    """(the texts of ``jobs`` [(id, path, question)], device, dtype) of the BLIP (v1) model ``args.model``."""
    import torch

    from ..options import resolve_device, resolve_dtype
    from ..vqa_nlvr import load_task_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok = load_task_model(args.model, kind, tokenizer=args.tokenizer, state_dict=state_dict)
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        texts = (_answers if kind == "vqa" else _captions)(args, model, tok, jobs, kw)
    return texts, device, dtype
