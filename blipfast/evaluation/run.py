"""The end-to-end mode of ``blipfast eval caption`` / ``blipfast eval vqa``: a model answers the reference file's
own inputs, its predictions are written, then scored exactly as the prediction mode scores that file.

    blipfast eval caption --model BLIP2_DIR --data coco_karpathy_test.json --images COCO_ROOT --out m/metrics.json
    blipfast eval vqa --model BLIP2_DIR --data vqa_val_eval.json --images COCO_ROOT --out v/metrics.json
    blipfast eval vqa --model BLIP2_DIR --data A.json --questions Q.json --images val2014/

Generation is ``blipfast caption`` / ``blipfast vqa``'s (:class:`blipfast.generate.engine.Generator`, batched, a
tqdm bar) with LAVIS' decoding settings for the model's LLM as defaults (:func:`~blipfast.generate.engine.decoding`):
``coco`` for captions (prompt "a photo of", beam 5, LAVIS' max 30 / min 8 lengths as new-token counts), ``vqa``
for answers (prompt "Question: {} Short answer:", beam 5, at most 10 new tokens); each flag given wins. Questions
go through LAVIS' evaluation text processor (``blip_question``: lower case, ``.!"()*#:;~`` removed, at most 50
words) before the prompt is filled in, as LAVIS' VQA task does.

Which image: the reference row's ``image`` path (the Karpathy-split lists, LAVIS' VQA lists) or the COCO caption
file's ``file_name``, under ``--images``; with the official VQA question + annotation pair, the file of ``--images``
whose name carries the question's ``image_id`` (``COCO_val2014_000000262148.jpg``). Every image is checked to be
there before the model loads; a missing one is an error naming the reference row (nothing is scored on a subset).

The predictions are written as the prediction mode reads them (``[{"image_id", "caption", "image"}]`` /
``[{"question_id", "answer", "question", "image"}]``, one row a line) to ``--save-predictions`` (default:
``predictions.json`` beside ``--out``, or in the current folder without it), so they can be scored again with
``--predictions``. Models: BLIP-2 / InstructBLIP HF folders and ``blip2-caption`` runs (what ``blipfast caption``
loads), and BLIP (v1) VQA and
captioning models (``blipfast train`` runs of ``blip-vqa`` / ``blip-caption``, Salesforce BLIP ``.pth`` files with
``--tokenizer``), told apart by their files and run as BLIP's evaluation runs them (:mod:`blipfast.evaluation.blip`;
``eval vqa --video`` answers questions about videos with them).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SETTINGS = {"caption": ("coco", "caption"), "vqa": ("vqa",)}


def add_model_arguments(p, source, task: str) -> None:
    """The flags of the end-to-end mode: ``--model`` in the ``source`` group (exclusive with ``--predictions``),
    ``--images``, ``--save-predictions`` and the decoding flags of ``blipfast caption`` / ``vqa``."""
    from ..generate.engine import add_decoding_arguments

    source.add_argument("--model", help="end to end: a BLIP-2 / InstructBLIP HF folder (save_pretrained, with its "
                        "tokenizer and image processor), a blipfast train run or checkpoint of blip2-caption, or a "
                        "BLIP (v1) model: a blipfast train run or checkpoint of "
                        f"blip-{task} or a Salesforce BLIP .pth (with --tokenizer); it makes the predictions of "
                        "--data's inputs")
    p.add_argument("--images", help="end to end: the folder the reference rows' image paths are under (with "
                   "--questions: the folder of the images, found by the image id in their file names)")
    p.add_argument("--save-predictions", help="end to end: where the predictions go (default: predictions.json "
                   "beside --out, or in the current folder)")
    add_decoding_arguments(p, settings=SETTINGS[task], questions=task == "vqa")
    p.add_argument("--tokenizer", help="BLIP (v1) .pth models: the BERT tokenizer folder ([DEC] and [ENC] are added; "
                   "default: the run's)")
    if task == "vqa":
        p.add_argument("--inference", choices=("rank", "generate"), default="rank", help="BLIP (v1) VQA: rank the "
                       "--answer-list candidates (default, as BLIP's VQA evaluation) or generate the answer")
        p.add_argument("--answer-list", help="BLIP (v1) VQA, rank inference: JSON list of candidate answers (LAVIS' "
                       "answer_list.json)")
        p.add_argument("--k", type=int, help="BLIP (v1) VQA, rank inference: candidates scored by their full "
                       "likelihood (default 128, BLIP's k_test)")
        p.add_argument("--video", action="store_true", help="BLIP (v1) VQA: the rows' \"video\" (or \"image\") paths "
                       "are videos (folders of frames or video files): --num-frames frames each, their ViT tokens "
                       "concatenated (the BLIP paper's zero-shot video QA)")
        p.add_argument("--num-frames", type=int, help="frames sampled uniformly per video with --video (default 16)")


def check_mode(args, task: str, references: str) -> None:
    """ValueError for flags that do not fit the mode (``--predictions`` or ``--model``) of ``args``."""
    flag = f"--{references}"
    if getattr(args, references) is None:
        raise ValueError(f"{flag} (or --data) is required: the reference file to score against")
    if args.model is None:
        for name in ("images", "save_predictions", "tokenizer", "answer_list", "k", "num_frames"):
            if getattr(args, name, None) is not None:
                raise ValueError(f"--{name.replace('_', '-')} belongs to the end-to-end mode (--model), not to "
                                 "--predictions")
        if getattr(args, "video", False):
            raise ValueError("--video belongs to the end-to-end mode (--model), not to --predictions")
    elif args.images is None:
        raise ValueError("--images is required with --model: the folder the reference file's images are under")


def predictions_path(args) -> Path:
    if args.save_predictions is not None:
        return Path(args.save_predictions)
    return (Path(args.out).parent if args.out else Path(".")) / "predictions.json"


def _image_index(root: Path) -> dict:
    """image id -> file, of every image file under ``root`` (the official VQA pair names images by id only)."""
    from ..generate.engine import IMAGE_SUFFIXES
    from .formats import id_from_name

    index: dict = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                key = id_from_name(name)
                index[key] = None if key in index else Path(dirpath) / name  # None: two files of one id
    return index


def _jobs(refs, root: Path, task: str, video: bool = False) -> list:
    """``[(id, image file, question)]`` in the references' order (``video``: the rows' videos, a folder of frames
    or a video file each); ValueError naming the row of a missing input."""
    from ..data.video import check_video
    from .formats import canonical_id

    if not root.is_dir():
        raise ValueError(f"--images: {root} is not a folder")
    jobs, index = [], None
    for key in refs:
        where, given = refs.rows[key], refs.inputs.get(key, {})
        question = given.get("question")
        if task == "vqa" and not isinstance(question, str):
            raise ValueError(f"--data: {where} has no \"question\" (the model needs its text; with the official "
                             "annotation file, give the question file with --questions)")
        name = given.get("video") if video and isinstance(given.get("video"), str) else given.get("image")
        if isinstance(name, str):
            path = Path(name)
            path = path if path.is_absolute() else root / path
            if video:
                check_video(path, where)
                jobs.append((key, path, question))
                continue
        elif video:
            raise ValueError(f"--data: {where} names no video (a \"video\" or \"image\" path, under --images)")
        elif "image_id" in given:
            index = _image_index(root) if index is None else index
            image_id = canonical_id(given["image_id"], f"{where}: image_id")
            path = index.get(image_id, "missing")
            if path is None:
                raise ValueError(f"--images: several files under {root} carry image id {image_id!r} (for {where})")
            if path == "missing":
                raise ValueError(f"--images: no image file with image id {image_id!r} under {root} (for {where})")
        else:
            raise ValueError(f"--data: {where} names no image (an \"image\" path, a COCO \"file_name\" or, with "
                             "--questions, an \"image_id\")")
        if not path.is_file() or path.stat().st_size == 0:
            state = "is empty" if path.is_file() else "is not a file"
            raise ValueError(f"--images: {path} {state} (the image of {where})")
        jobs.append((key, path, question))
    return jobs


def _rows(refs, jobs: list, texts: list, task: str) -> list:
    """The predictions as the prediction mode reads them."""
    if task == "caption":
        return [{"image_id": key, "caption": text, "image": refs.inputs[key]["image"]}
                for (key, _, _), text in zip(jobs, texts)]
    rows = []
    for (key, path, question), text in zip(jobs, texts):
        given = refs.inputs[key]
        where = {k: given[k] for k in ("image", "video") if k in given} or {"image": path.name}
        rows.append({"answer": text, "question": question, **where} if refs.key == "image" else
                    {"question_id": key, "answer": text, "question": question, **where})
    return rows


def write_predictions(args, refs, task: str) -> str:
    """Generate the predictions of every input of ``refs`` (a reference :class:`~.formats.Table`) with
    ``args.model`` and write them (:func:`predictions_path`); returns the file's path."""
    from ..generate.engine import _generate_kwargs
    from .blip import check_blip_flags, model_kind, predict
    from .caption import check_toolkit

    start = time.perf_counter()
    vqa, video = task == "vqa", getattr(args, "video", False)
    out = predictions_path(args)
    if out.is_dir():
        raise ValueError(f"--save-predictions: {out} is a folder (give a file name)")
    if refs.path and out.resolve() == Path(refs.path).resolve():
        raise ValueError(f"--save-predictions: {out} is the reference file")
    kind, state_dict = model_kind(args.model, task)
    if kind is None:
        for flag, given in (("--video", video), ("--tokenizer", args.tokenizer),
                            ("--answer-list", getattr(args, "answer_list", None))):
            if given:
                raise ValueError(f"{flag} is for BLIP (v1) models, and {args.model} is not one (BLIP-2 folders "
                                 f"answer about images only, with their own tokenizer and generation)")
        _generate_kwargs(args, {})  # the flags checked before anything loads
        if vqa and args.prompt is not None and "{}" not in args.prompt:
            raise ValueError(f"--prompt must contain {{}} for the question, got {args.prompt!r}")
    else:
        blip_kwargs = check_blip_flags(args, task)
    jobs = _jobs(refs, Path(args.images), task, video=video)
    if not vqa:
        check_toolkit()  # no Java: said before an hour of generation, not after
    if kind is None:
        texts, device, dtype = _generate(args, jobs, task)
    else:
        texts, device, dtype = predict(args, kind, state_dict, jobs, blip_kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _rows(refs, jobs, texts, task)
    out.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    what = "answers" if vqa else "captions"
    print(f"blipfast eval {task}: {len(rows)} {what} -> {out} in {time.perf_counter() - start:.1f} s (device "
          f"{device}, {str(dtype).replace('torch.', '')})", file=sys.stderr)
    return str(out)


def _generate(args, jobs: list, task: str) -> tuple:
    """(texts, device, dtype) of ``jobs`` generated by the BLIP-2 / InstructBLIP folder ``args.model``."""
    from tqdm import tqdm

    from ..data.vision import load_image
    from ..data.vqa import pre_question
    from ..generate.engine import Generator, check_model_folder, decoding
    from ..options import resolve_device

    vqa = task == "vqa"
    check_model_folder(args.model)
    gen = Generator(args.model, device=resolve_device(args.device), dtype=args.dtype,
                    attn_implementation=args.attn_implementation)
    prompt, kwargs = decoding(gen, args)
    if (kwargs.get("num_return_sequences") or 1) != 1:
        raise ValueError("--generate-kwargs: the scorers take one prediction per input (num_return_sequences 1)")
    texts = []
    with tqdm(total=len(jobs), desc=f"blipfast eval {task}", unit="img", file=sys.stderr,
              disable=not args.progress) as bar:
        for i in range(0, len(jobs), args.batch_size):
            batch = jobs[i:i + args.batch_size]
            images = [load_image(str(path)) for _, path, _ in batch]
            questions = [pre_question(q) for _, _, q in batch] if vqa else None
            prompts = [prompt.format(q) for q in questions] if vqa else [prompt] * len(batch)
            try:
                texts += gen(images, prompts, questions=questions, **kwargs)
            except (ValueError, TypeError) as e:  # transformers' checks of the generate() arguments
                raise ValueError(f"generate() refused the arguments (--generate-kwargs, --num-beams, ...): {e}") \
                    from None
            bar.update(len(batch))
    return texts, gen.device, gen.dtype
