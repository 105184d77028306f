"""``blipfast eval``: score predictions the way the BLIP / BLIP-2 papers' tables were scored.

    blipfast eval caption --predictions captions.jsonl --references coco_karpathy_test.json [--out metrics.json]
    blipfast eval caption --model BLIP2_DIR --data coco_karpathy_test.json --images COCO_ROOT [--out metrics.json]
    blipfast eval vqa --predictions answers.json --annotations A.json [--questions Q.json] [--rule lavis]
    blipfast eval vqa --model BLIP2_DIR --data vqa_val_eval.json --images COCO_ROOT [--out metrics.json]
    blipfast eval gqa --predictions answers.json --references testdev_balanced_questions.json
    blipfast eval nlvr2 --predictions predictions.csv --references dev.json
    blipfast eval retrieval --scores retrieval_out/scores.safetensors --data coco_karpathy_test.json

Each prints a table and, with ``--out``, writes the metrics as JSON. A prediction for an unknown id, a missing
prediction, a repeated one or a malformed row is an error naming the file and the row (exit status 2);
``--allow-missing`` scores the predicted part and reports the coverage. With ``--model`` instead of
``--predictions``, ``caption`` and ``vqa`` generate the predictions first and write them beside the metrics
(:mod:`blipfast.evaluation.run`). The formats: docs/evaluation.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .run import add_model_arguments, check_mode, write_predictions

END_TO_END = {"caption": "references", "vqa": "annotations"}  # the tasks with --model, and their reference flag


def _task(sub, name: str, help_: str, **required):
    """A subcommand with its required file flags (``--flag``: help) and ``--out`` / ``--allow-missing``; ``caption``
    and ``vqa`` take ``--predictions`` or ``--model`` (end to end), and ``--data`` for their reference file."""
    p = sub.add_parser(name, help=help_, description=help_)
    for flag, text in required.items():
        if name not in END_TO_END:
            p.add_argument(f"--{flag}", required=True, help=text)
        elif flag == "predictions":
            source = p.add_mutually_exclusive_group(required=True)
            source.add_argument("--predictions", help=text)
        else:
            p.add_argument(f"--{flag}", "--data", help=f"{text} (--data: the same)")
    if name in END_TO_END:
        add_model_arguments(p, source, name)
    p.add_argument("--out", help="write the metrics to this JSON file")
    if name != "retrieval":
        p.add_argument("--allow-missing", action="store_true", help="score only the references that have a "
                       "prediction and report the coverage (default: a missing prediction is an error)")
    return p


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    c = _task(sub, "caption", "BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap, as LAVIS runs it)",
              predictions="COCO results JSON [{\"image_id\", \"caption\"}] or the JSON lines of `blipfast caption`",
              references="COCO caption annotation JSON, or a Karpathy-split list (coco_karpathy_test.json, "
              "flickr30k_test.json, nocaps_val.json)")
    c.add_argument("--per-image", help="also write {image_id: {metric: score}} to this JSON file")
    c.add_argument("--no-spice", action="store_true", help="skip SPICE (default: run it when Stanford CoreNLP "
                   "3.6.0 is installed for pycocoevalcap)")
    c.add_argument("--meteor-workers", type=int, metavar="N", help="METEOR's Java processes, up to 2 GB of memory "
                   "each (default: the CPU count, at most 8, and at least 2,500 images each); the scores do not "
                   "depend on it")
    v = _task(sub, "vqa", "VQA accuracy (VQAv2, OK-VQA, VizWiz): the official tool's rule",
              predictions="VQA results JSON [{\"question_id\", \"answer\"}] or the JSON lines of `blipfast vqa` "
              "(with a question_id field)",
              annotations="official annotation JSON ({\"annotations\": [...]}) or LAVIS' vqa_val_eval.json / "
              "okvqa_val_eval.json list")
    v.add_argument("--questions", help="official question JSON: checked to hold the annotations' questions")
    v.add_argument("--rule", choices=("lavis", "official"), default="lavis", help="lavis (default): the official "
                   "tool of 2017 that LAVIS ships; official: the official repository after its 2021 fix")
    g = _task(sub, "gqa", "GQA accuracy: exact match after the VQA normalisation (LAVIS)",
              predictions="[{\"question_id\", \"answer\"}] (or GQA's [{\"questionId\", \"prediction\"}]) JSON, "
              "or `blipfast vqa` JSON lines",
              references="GQA question JSON, or LAVIS' testdev_balanced_questions.json")
    g.add_argument("--normalize", choices=("both", "predictions", "none"), default="both",
                   help="which side gets the VQA normalisation (both: LAVIS since December 2023; predictions: "
                   "LAVIS from February 2023; none: GQA's eval.py)")
    _task(sub, "nlvr2", "NLVR2 accuracy and consistency",
          predictions="NLVR2's CSV (identifier,prediction) or JSON rows with \"identifier\" (or \"instance_id\") "
          "and \"prediction\"",
          references="NLVR2 JSON lines (dev.json, test1.json) or the BLIP / LAVIS list")
    _task(sub, "retrieval", "recall@1/5/10 of saved score matrices (blipfast retrieval's)",
          scores="safetensors file with score_i2t [N_img, N_txt] and score_t2i [N_txt, N_img] (`blipfast "
          "retrieval` writes OUT/scores.safetensors)",
          data="the retrieval annotation the scores are of (LAVIS' list of {\"image\", \"caption\": [...]})")


def _table(metrics: dict) -> str:
    return "\n".join(f"{k:<12}{v:>8.2f}" for k, v in metrics.items())


def _coverage_line(cov: dict) -> str:
    return f"coverage: {cov['scored']} of {cov['references']} references scored"


def _caption(args) -> tuple:
    from .caption import format_captions, score_captions
    from .formats import read_caption_predictions, read_caption_references

    refs = read_caption_references(args.references)
    if args.model is not None:
        args.predictions = write_predictions(args, refs, "caption")
    preds = read_caption_predictions(args.predictions, refs)
    s = score_captions(preds, refs, spice=False if args.no_spice else None, allow_missing=args.allow_missing,
                       meteor_workers=args.meteor_workers)
    if args.per_image:
        Path(args.per_image).write_text(json.dumps({str(k): v for k, v in s.per_image.items()}, indent=1))
    return dict(s.metrics), s.coverage, format_captions(s)


def _vqa(args) -> tuple:
    from .formats import read_answer_predictions, read_vqa_references
    from .vqa import format_vqa, vqa_accuracy

    refs = read_vqa_references(args.annotations, args.questions)
    if args.model is not None:
        args.predictions = write_predictions(args, refs, "vqa")
    preds = read_answer_predictions(args.predictions, key=refs.key)
    res = vqa_accuracy(preds, refs, rule=args.rule, allow_missing=args.allow_missing)
    metrics = {k: res[k] for k in ("overall", "perAnswerType", "perQuestionType")}
    return metrics, res["coverage"], format_vqa(res)


def _gqa(args) -> tuple:
    from .formats import read_answer_predictions, read_gqa_references
    from .vqa import gqa_accuracy

    refs = read_gqa_references(args.references)
    res = gqa_accuracy(read_answer_predictions(args.predictions), refs, normalize=args.normalize,
                       allow_missing=args.allow_missing)
    return {"accuracy": res["accuracy"]}, res["coverage"], _table({"accuracy": res["accuracy"]})


def _nlvr2(args) -> tuple:
    from .formats import read_nlvr2_predictions, read_nlvr2_references
    from .nlvr2 import nlvr2_accuracy

    res = nlvr2_accuracy(read_nlvr2_predictions(args.predictions), read_nlvr2_references(args.references),
                         allow_missing=args.allow_missing)
    metrics = {k: v for k, v in res.items() if k != "coverage"}
    return metrics, res["coverage"], _table(metrics)


def _retrieval(args) -> tuple:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..retrieval import format_metrics, read_annotations, recall_at_k

    gallery = read_annotations(args.data)
    if not Path(args.scores).is_file():
        raise ValueError(f"--scores: {args.scores} is not a file")
    try:
        scores = load_file(args.scores)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--scores: {args.scores} is not a safetensors file ({e})") from None
    missing = [k for k in ("score_i2t", "score_t2i") if k not in scores]
    if missing:
        raise ValueError(f"--scores: {args.scores} lacks {', '.join(missing)}")
    n_img, n_txt = len(gallery.images), len(gallery.texts)
    if tuple(scores["score_i2t"].shape) != (n_img, n_txt):
        raise ValueError(f"--scores: score_i2t is {list(scores['score_i2t'].shape)} but {args.data} has {n_img} "
                         f"images and {n_txt} captions")
    metrics = recall_at_k(scores["score_i2t"], scores["score_t2i"], gallery.img2txt, gallery.txt2img)
    return metrics, None, format_metrics(metrics)


_RUNNERS = {"caption": _caption, "vqa": _vqa, "gqa": _gqa, "nlvr2": _nlvr2, "retrieval": _retrieval}


def run(args) -> int:
    from .caption import ScorerUnavailableError

    task = args.task
    try:
        if task in END_TO_END:
            check_mode(args, task, END_TO_END[task])
        metrics, coverage, table = _RUNNERS[task](args)
    except (ValueError, TypeError, ScorerUnavailableError, RuntimeError) as e:
        print(f"blipfast eval {task}: error: {e}", file=sys.stderr)
        return 2
    print(table)
    if coverage is not None and coverage["scored"] < coverage["references"]:
        print(_coverage_line(coverage))
    if getattr(args, "allow_missing", False):
        metrics["coverage"] = coverage
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0
