"""Readers of the prediction and reference files people already have, and the id matching every scorer shares.

Every reader returns a :class:`Table`: a dict from a canonical id to a value that also remembers its file
(``path``) and where each id was read (``rows``: ``"file:LINE"`` for JSON lines and CSV, ``"file[INDEX]"`` for a
JSON list), so that :func:`select` can name the row of a bad prediction. Ids are canonical: an integer, or a
string of digits, is the integer (``"391895"`` and ``391895`` are one id); any other string stays a string.
Malformed input raises ValueError naming the file and the row.

Predictions (captions or answers): a JSON list (COCO / VQA results ``[{"image_id", "caption"}]``,
``[{"question_id", "answer"}]``) or the JSON lines that ``blipfast caption`` / ``blipfast vqa`` write
(``{"image": path, ..., "caption"}``: the image id is an ``image_id`` field, else the reference row with the same
image file name, else read from the file name: ``COCO_val2014_000000391895.jpg`` -> 391895, ``1007129816.jpg`` ->
1007129816, any other name -> its stem).

Caption references: the COCO caption annotation JSON (``{"images": [...], "annotations": [{"image_id",
"caption"}]}``, as ``pycocotools.COCO`` reads it, images in the file's order) or the LAVIS / BLIP Karpathy-split
lists (``coco_karpathy_test.json``, ``flickr30k_test.json``, ``nocaps_val.json``: ``[{"image": path, "caption":
str | [str], ["image_id" | "img_id"]}]``, JSON or JSON lines; rows of one image are merged).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

_DIGITS = re.compile(r"[0-9]+")


class Table(dict):
    """``{id: value}`` read from ``path``; ``rows[id]`` says where (see the module doc)."""

    def __init__(self, path=None):
        super().__init__()
        self.path = None if path is None else str(path)
        self.rows: dict = {}
        self.names: dict = {}  # caption references: image file name -> id (None where two ids share a name)
        self.key = None  # VQA references: "question_id", or "image" (VizWiz)
        # references: what a model is given per id, where the file says it ({"image": path} for captions; VQA:
        # "question" and "image", or the official question file's "image_id"): `blipfast eval --model` reads them
        self.inputs: dict = {}

    def add(self, key, value, where: str, *, merge: bool = False) -> None:
        if key in self:
            if not merge:
                raise ValueError(f"{where}: id {key!r} again (first at {self.rows[key]}); one row per id")
            self[key] += value
            return
        self[key] = value
        self.rows[key] = where


def canonical_id(value, where: str = "id"):
    """An integer for ints and digit strings, the string otherwise; ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: an id must be an integer or a string, got {value!r}")
    if isinstance(value, str):
        if _DIGITS.fullmatch(value.strip()):
            return int(value)
        if not value.strip():
            raise ValueError(f"{where}: empty id")
    return value


def id_from_name(name: str):
    """The image id of a file name: the digits after its last ``_`` (COCO), its digit stem (Flickr30K), else the
    stem."""
    stem = os.path.splitext(os.path.basename(name))[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if _DIGITS.fullmatch(tail) else stem


def load_json_rows(path, what: str):
    """``(rows, container)``: the file's rows as ``[(where, row)]`` when it is a JSON list or JSON lines, or
    ``(None, object)`` when it is one JSON object (a COCO or VQA annotation file)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {p} is not UTF-8 text ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{p}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {p}:{n} is not JSON ({e.msg}); expected a JSON list or JSON lines") from None
        if not rows:
            raise ValueError(f"{what}: {p} is empty")
        return rows, None
    if isinstance(data, list):
        if not data:
            raise ValueError(f"{what}: {p} is an empty list")
        return [(f"{p}[{i}]", row) for i, row in enumerate(data)], None
    return None, data


def _rows_or_object(path, what: str) -> list:
    """The rows of a JSON list / JSON lines file; a file of one JSON object is one row."""
    rows, obj = load_json_rows(path, what)
    return rows if rows is not None else [(f"{path}:1", obj)]


def _obj(row, where: str, what: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{what}: {where} is not a JSON object")
    return row


def _field(row: dict, names: Iterable[str]):
    for n in names:
        if n in row:
            return n, row[n]
    return None, None


def _text(value, where: str, key: str, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: {where}: \"{key}\" must be a string, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# captions


def read_caption_references(path) -> Table:
    """Reference captions per image: ``{image_id: [captions]}`` (see the module doc for the formats)."""
    what = "references"
    rows, obj = load_json_rows(path, what)
    t = Table(path)
    if rows is None:
        if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
            raise ValueError(f"{what}: {path} is neither a COCO caption annotation file ({{\"images\", "
                             "\"annotations\"}}) nor a list of {\"image\", \"caption\"} rows")
        images = obj.get("images")
        if images is not None:
            if not isinstance(images, list):
                raise ValueError(f"{what}: {path}: \"images\" must be a list")
            for i, img in enumerate(images):
                where = f"{path}: images[{i}]"
                key = canonical_id(_obj(img, where, what).get("id"), where)
                t.add(key, [], where)
                if isinstance(img.get("file_name"), str):
                    _name(t, img["file_name"], key)
                    t.inputs[key] = {"image": img["file_name"]}
        for i, ann in enumerate(obj["annotations"]):
            where = f"{path}: annotations[{i}]"
            ann = _obj(ann, where, what)
            key = canonical_id(ann.get("image_id"), f"{where}: image_id")
            caption = _text(ann.get("caption"), where, "caption", what)
            if images is None:
                t.add(key, [caption], where, merge=True)
            elif key not in t:
                raise ValueError(f"{what}: {where}: image_id {key!r} is not in \"images\"")
            else:
                t[key].append(caption)
    else:
        for where, row in rows:
            row = _obj(row, where, what)
            name, value = _field(row, ("image_id", "img_id"))
            image = row.get("image")
            if name is None and not isinstance(image, str):
                raise ValueError(f"{what}: {where} needs an \"image\" path or an \"image_id\"")
            key = canonical_id(value, f"{where}: {name}") if name else id_from_name(image)
            caps = row.get("caption", row.get("captions"))
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{what}: {where}: \"caption\" must be a string or a list of strings")
            t.add(key, list(caps), where, merge=True)
            if isinstance(image, str):
                _name(t, image, key)
                t.inputs.setdefault(key, {"image": image})
    for key, caps in t.items():
        if not caps:
            raise ValueError(f"{what}: {t.rows[key]}: image {key!r} has no reference caption")
    if not t:
        raise ValueError(f"{what}: {path} has no images")
    return t


def _name(t: Table, name: str, key) -> None:
    base = os.path.basename(name)
    if t.names.get(base, key) != key:
        key = None  # two images of one file name: ambiguous, never used
    t.names[base] = key


def _image_key(row: dict, where: str, what: str, names: Mapping):
    name, value = _field(row, ("image_id", "img_id"))
    if name is not None:
        return canonical_id(value, f"{where}: {name}")
    image = row.get("image")
    if not isinstance(image, str):
        raise ValueError(f"{what}: {where} needs an \"image_id\" (or the \"image\" file name)")
    base = os.path.basename(image)
    if base in names:
        if names[base] is None:
            raise ValueError(f"{what}: {where}: several reference images are named {base!r}; give an \"image_id\"")
        return names[base]
    return id_from_name(image)


def read_caption_predictions(path, references: Optional[Mapping] = None) -> Table:
    """One caption per image: ``{image_id: caption}`` from COCO results JSON or ``blipfast caption``'s JSON
    lines. ``references`` (a :func:`read_caption_references` table) resolves ids from image file names."""
    what = "predictions"
    rows = _rows_or_object(path, what)
    names = getattr(references, "names", {}) or {}
    t = Table(path)
    for where, row in rows:
        row = _obj(row, where, what)
        t.add(_image_key(row, where, what, names), _text(row.get("caption"), where, "caption", what), where)
    return t


# ----------------------------------------------------------------------------------------------
# answers (VQA, GQA)

_QID = ("question_id", "questionId")


def read_answer_predictions(path, key: str = "question_id") -> Table:
    """One answer per question: ``{question_id: answer}`` from VQA results JSON (``[{"question_id",
    "answer"}]``), GQA's ``[{"questionId", "prediction"}]`` or ``blipfast vqa``'s JSON lines (their
    ``question_id`` field). ``key="image"``: keyed by the image file name instead (VizWiz)."""
    what = "predictions"
    rows = _rows_or_object(path, what)
    t = Table(path)
    for where, row in rows:
        row = _obj(row, where, what)
        if key == "image":
            image = row.get("image")
            if not isinstance(image, str):
                raise ValueError(f"{what}: {where} needs an \"image\" (the references are keyed by image)")
            qid = os.path.basename(image)
        else:
            name, value = _field(row, _QID)
            if name is None:
                raise ValueError(f"{what}: {where} needs a \"question_id\"")
            qid = canonical_id(value, f"{where}: {name}")
        name, answer = _field(row, ("answer", "prediction"))
        if name is None:
            raise ValueError(f"{what}: {where} needs an \"answer\"")
        t.add(qid, _text(answer, where, name, what), where)
    return t


def read_vqa_references(annotations, questions=None) -> Table:
    """``{question_id: {"answers", "question_type", "answer_type"}}`` from the official VQA annotation JSON
    (``{"annotations": [...]}``; ``questions``, the official question JSON, is checked to hold the same
    questions) or from a JSON list / JSON lines of questions with their human answers (LAVIS' ``vqa_val_eval.json``
    / ``okvqa_val_eval.json``: ``"answer"`` or ``"answers"``, strings or answer objects; VizWiz's lists without
    question ids are keyed by image file name: ``table.key == "image"``)."""
    what = "annotations"
    rows, obj = load_json_rows(annotations, what)
    if rows is None:
        if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
            raise ValueError(f"{what}: {annotations} is neither an official VQA annotation file "
                             "({\"annotations\": [...]}) nor a list of questions with answers")
        rows = [(f"{annotations}: annotations[{i}]", a) for i, a in enumerate(obj["annotations"])]
    t = Table(annotations)
    for where, row in rows:
        row = _obj(row, where, what)
        name, value = _field(row, _QID)
        if name is None:
            if not isinstance(row.get("image"), str):
                raise ValueError(f"{what}: {where} needs a \"question_id\" (or, VizWiz, an \"image\")")
            key, qid = "image", os.path.basename(row["image"])
        else:
            key, qid = "question_id", canonical_id(value, f"{where}: {name}")
        if t.key not in (None, key):
            raise ValueError(f"{what}: {where}: some rows have a question id and some do not")
        t.key = key
        _, answers = _field(row, ("answers", "answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, str) or (isinstance(a, dict) and isinstance(a.get("answer"), str)) for a in answers):
            raise ValueError(f"{what}: {where}: \"answers\" must be a non-empty list of strings or of "
                             "{\"answer\": str, ...} objects")
        t.add(qid, {"answers": answers, "question_type": row.get("question_type"),
                    "answer_type": row.get("answer_type")}, where)
        t.inputs[qid] = {k: row[k] for k in ("image", "video", "question") if isinstance(row.get(k), str)}
    if questions is not None:
        _check_questions(t, questions)
    return t


def _check_questions(t: Table, questions) -> None:
    rows, obj = load_json_rows(questions, "questions")
    if rows is None:
        if not isinstance(obj, dict) or not isinstance(obj.get("questions"), list):
            raise ValueError(f"questions: {questions} is not an official VQA question file ({{\"questions\": ...}})")
        rows = [(f"{questions}: questions[{i}]", q) for i, q in enumerate(obj["questions"])]
    ids = set()
    for where, row in rows:
        name, value = _field(_obj(row, where, "questions"), _QID)
        if name is None:
            raise ValueError(f"questions: {where} needs a \"question_id\"")
        qid = canonical_id(value, where)
        ids.add(qid)
        if qid in t:  # the official pair: the question text and image id are in the question file only
            t.inputs[qid] = {**{k: row[k] for k in ("question", "image_id") if k in row}, **t.inputs[qid]}
    if ids != set(t):
        extra, missing = sorted(map(str, ids - set(t)))[:5], sorted(map(str, set(t) - ids))[:5]
        raise ValueError(f"questions: {questions} and annotations {t.path} hold different questions "
                         f"(only in the questions: {extra}; only in the annotations: {missing})")


def read_gqa_references(path) -> Table:
    """``{question_id: answer}`` from GQA's question JSON (``{question_id: {"answer", ...}}``) or LAVIS'
    ``testdev_balanced_questions.json`` list (``[{"question_id", "answer", ...}]``)."""
    what = "references"
    rows, obj = load_json_rows(path, what)
    if rows is None:
        if not isinstance(obj, dict):
            raise ValueError(f"{what}: {path} is neither GQA's {{question_id: {{\"answer\"}}}} nor a list")
        rows = [(f"{path}: {k!r}", {"question_id": k, **v} if isinstance(v, dict) else v) for k, v in obj.items()]
    t = Table(path)
    for where, row in rows:
        row = _obj(row, where, what)
        name, value = _field(row, _QID)
        if name is None:
            raise ValueError(f"{what}: {where} needs a \"question_id\"")
        t.add(canonical_id(value, f"{where}: {name}"), _text(row.get("answer"), where, "answer", what), where)
    return t


# ----------------------------------------------------------------------------------------------
# NLVR2

_NLVR_ID = ("identifier", "instance_id")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _label(value, where: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{what}: {where}: a label must be True/False (or 1/0, \"yes\"/\"no\"), got {value!r}")


def _read_nlvr2(path, what: str, label_keys: tuple) -> Table:
    p = Path(path)
    t = Table(path)
    if p.suffix.lower() == ".csv":  # the official predictions file: identifier,prediction per line
        if not p.is_file():
            raise ValueError(f"{what}: {p} is not a file")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            if len(parts) != 2:
                raise ValueError(f"{what}: {p}:{n} must be \"identifier,prediction\"")
            t.add(canonical_id(parts[0], f"{p}:{n}"), _label(parts[1], f"{p}:{n}", what), f"{p}:{n}")
        if not t:
            raise ValueError(f"{what}: {p} is empty")
        return t
    for i, (where, row) in enumerate(_rows_or_object(path, what)):
        row = _obj(row, where, what)
        name, value = _field(row, _NLVR_ID)
        key = canonical_id(value, f"{where}: {name}") if name else i  # LAVIS: instance_id = str(row index)
        name, label = _field(row, label_keys)
        if name is None:
            raise ValueError(f"{what}: {where} needs a \"{label_keys[0]}\"")
        t.add(key, _label(label, where, what), where)
    return t


def read_nlvr2_references(path) -> Table:
    """``{identifier: bool}`` from NLVR2's JSON lines (``{"identifier", "label": "True"}``) or the BLIP / LAVIS
    list (``[{"images", "sentence", "label"}]``, keyed by row index as LAVIS' ``instance_id``)."""
    return _read_nlvr2(path, "references", ("label",))


def read_nlvr2_predictions(path) -> Table:
    """``{identifier: bool}`` from the official CSV (``identifier,True``) or JSON rows with an ``identifier`` (or
    LAVIS' ``instance_id``) and a ``prediction`` (or ``label`` / ``answer``)."""
    return _read_nlvr2(path, "predictions", ("prediction", "label", "answer"))


# ----------------------------------------------------------------------------------------------
# matching


def select(predictions: Mapping, references: Mapping, *, allow_missing: bool = False) -> tuple:
    """``(ids, coverage)``: the reference ids to score, in the references' order, and ``{"scored", "references"}``.

    A prediction for an id the references lack is always an error (its row named when ``predictions`` is a
    :class:`Table`); a reference without a prediction is one unless ``allow_missing``; nothing to score is one."""
    rows = getattr(predictions, "rows", {})
    unknown = [k for k in predictions if k not in references]
    if unknown:
        k = unknown[0]
        where = rows.get(k, "predictions")
        ref = getattr(references, "path", None) or "the references"
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(f"{where}: id {k!r} is not in {ref}{more}")
    ids = [k for k in references if k in predictions]
    missing = len(references) - len(ids)
    if missing and not allow_missing:
        first = [k for k in references if k not in predictions][:5]
        src = getattr(predictions, "path", None) or "the predictions"
        raise ValueError(f"{src}: no prediction for {missing} of {len(references)} reference ids (first: "
                         f"{', '.join(map(repr, first))}); pass --allow-missing (allow_missing=True) to score the "
                         "covered ones")
    if not ids:
        raise ValueError("no prediction to score")
    return ids, {"scored": len(ids), "references": len(references)}
