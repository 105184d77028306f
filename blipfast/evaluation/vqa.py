"""VQA accuracy exactly as the official VQA evaluation tool computes it (VQAv2, OK-VQA, VizWiz-style annotations
of 10 human answers per question), quirks included; GQA's exact match after the same normalisation
(:func:`gqa_accuracy`).

Two versions of the official tool differ, so both are here (``rule``):

- ``"lavis"`` (default): the official ``vqaEval.py`` of 2017 (VQA v2.0), which LAVIS ships as
  ``lavis/common/vqa_tools/vqa_eval.py`` and runs for its local VQAv2 and OK-VQA scores (BLIP-2's VQAv2 validation and
  OK-VQA numbers). The prediction is fully normalised (newlines and tabs to spaces, stripped, punctuation, periods
  that are not part of a number, lower case, number words to digits, articles dropped, the contraction table); the
  human answers get only the punctuation step, and only when they are not all equal. So a human "Two" never matches
  (the prediction "two" became "2"), while "two" matches a prediction "2" only if the humans disagreed somewhere.
- ``"official"``: the official repository after its 2021 fix ("Fixed processing answers bug"): newlines, tabs and
  outer spaces are cleaned from both sides; then, only when the humans are not all equal, both sides get the full
  normalisation; when they all agree neither side is normalised.

The accuracy of one question is the mean over the 10 leave-one-out subsets of the human answers of
``min(#humans in the subset who gave the prediction / 3, 1)``: 0, 1, 2, 3 and 4 or more matching humans give
0, 0.3, 0.6, 0.9 and 1. A subset leaves out every answer record *equal* to the left-out one (the tool compares
the answer dicts; with the official ``answer_id`` fields that is exactly one). Reported in percent rounded to two
decimals (Python's ``round``), as the tool prints: overall, per answer type and per question type.

The normalisation quirks kept: the period rule's pattern ``(?!<=\\d)(\\.)(?!\\d)`` is a look-ahead (not the
look-behind it was meant to be), so a period is removed unless a digit follows it, and the tool passes
``re.UNICODE`` (32) as the substitution's *count*: at most 32 periods are removed; a digit-comma-digit anywhere
("1,000") makes every punctuation mark vanish instead of becoming a space; ``none`` maps to ``0``; the
contraction table maps ``somebody'd`` to ``somebodyd``; its capitalised keys (``Im``, ``Ive``) never match.
"""
from __future__ import annotations

import re
from typing import Mapping

from .formats import select

RULES = ("lavis", "official")

# the official tool's tables, verbatim
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the tool passes re.UNICODE where sub() takes its count: at most 32 periods go


def process_punctuation(text: str) -> str:
    """The tool's ``processPunctuation``: each mark of :data:`PUNCTUATION` is deleted when it touches a space
    somewhere in ``text`` (or when ``text`` has a digit-comma-digit), else replaced by a space; then periods not
    followed by a digit are deleted (at most 32 of them)."""
    out = text
    comma_number = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The tool's ``processDigitArticle``: lower case, split on whitespace, number words to digits, articles
    dropped, contractions restored, joined by single spaces."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The full normalisation a prediction gets: newlines and tabs to spaces, stripped, then
    :func:`process_punctuation` and :func:`process_digit_article`."""
    return process_digit_article(process_punctuation(_clean(text)))


def _answer_records(answers) -> list:
    """The human answers as the tool's answer dicts (a plain string gets ``answer_id`` = its position, as LAVIS'
    conversion of its JSON lists gives it)."""
    out = []
    for i, a in enumerate(answers):
        if isinstance(a, str):
            out.append({"answer": a, "answer_id": i})
        elif isinstance(a, Mapping) and isinstance(a.get("answer"), str):
            out.append(dict(a))
        else:
            raise ValueError(f"a human answer must be a string or a {{\"answer\": str, ...}} object, got {a!r}")
    if not out:
        raise ValueError("a question has no human answers")
    return out


def question_accuracy(prediction: str, answers, rule: str = "lavis") -> float:
    """The accuracy (a fraction in [0, 1]) of one predicted answer against its human answers (strings or the
    official ``{"answer", "answer_confidence", "answer_id"}`` dicts), by the tool's ``rule`` (see the module
    doc)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    gts = _answer_records(answers)
    res = _clean(prediction)
    if rule == "official":
        for a in gts:
            a["answer"] = _clean(a["answer"])
    disagree = len({a["answer"] for a in gts}) > 1
    if rule == "lavis":
        res = process_digit_article(process_punctuation(res))
        if disagree:
            for a in gts:
                a["answer"] = process_punctuation(a["answer"])
    elif disagree:
        for a in gts:
            a["answer"] = process_digit_article(process_punctuation(a["answer"]))
        res = process_digit_article(process_punctuation(res))
    # leave-one-out: the tool drops every record equal to the left-out one ([item for item in answers if item !=
    # left_out]) and counts the rest whose answer is the prediction; same numbers, no quadratic loop
    total = sum(a["answer"] == res for a in gts)
    accs = []
    for a in gts:
        matching = total - (sum(b == a for b in gts) if a["answer"] == res else 0)
        accs.append(min(1, float(matching) / 3))
    return float(sum(accs)) / len(accs)


def _percent(values: list, ndigits: int) -> float:
    return round(100 * float(sum(values)) / len(values), ndigits)


def vqa_accuracy(predictions: Mapping, annotations: Mapping, *, rule: str = "lavis", allow_missing: bool = False,
                 ndigits: int = 2) -> dict:
    """The official VQA accuracy of ``predictions`` (question id -> answer string) against ``annotations``
    (question id -> ``{"answers": [10 answers], "question_type": ..., "answer_type": ...}``, the official
    annotation records; the types are optional).

    Every question of ``annotations`` needs a prediction and every prediction a question (ValueError otherwise),
    unless ``allow_missing``: then the predicted questions are scored and ``coverage`` tells how many. Questions
    are taken in the annotations' order (the tool's). Returns ``{"overall", "perAnswerType", "perQuestionType",
    "perQuestion", "coverage"}``: percentages rounded to ``ndigits`` (questions without a type are in no
    per-type entry)."""
    ids, coverage = select(predictions, annotations, allow_missing=allow_missing)
    acc_qa, per_ques, per_ans, per_question = [], {}, {}, {}
    for qid in ids:
        ann = annotations[qid]
        if not isinstance(ann, Mapping) or "answers" not in ann:
            raise ValueError(f"annotation of question {qid!r} needs \"answers\"")
        try:
            acc = question_accuracy(predictions[qid], ann["answers"], rule)
        except (ValueError, TypeError) as e:
            raise type(e)(f"question {qid!r}: {e}") from None
        acc_qa.append(acc)
        for key, table in (("question_type", per_ques), ("answer_type", per_ans)):
            if ann.get(key) is not None:
                table.setdefault(ann[key], []).append(acc)
        per_question[qid] = round(100 * acc, ndigits)
    return {"overall": _percent(acc_qa, ndigits),
            "perAnswerType": {t: _percent(v, ndigits) for t, v in per_ans.items()},
            "perQuestionType": {t: _percent(v, ndigits) for t, v in per_ques.items()},
            "perQuestion": per_question, "coverage": coverage}


def format_vqa(result: Mapping) -> str:
    """The accuracy table ``blipfast eval vqa`` prints (the official demo's layout)."""
    lines = [f"Overall Accuracy is: {result['overall']:.2f}"]
    for title, key in (("Answer", "perAnswerType"), ("Question", "perQuestionType")):
        if result.get(key):
            lines += ["", f"Per {title} Type Accuracy is the following:"]
            lines += [f"{t} : {v:.2f}" for t, v in result[key].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# GQA

GQA_MODES = ("both", "predictions", "none")


def _gqa_norm(text, on: bool, qid) -> str:
    if not isinstance(text, str):
        raise TypeError(f"question {qid!r}: GQA answers and predictions must be strings, got {text!r}")
    return process_digit_article(process_punctuation(text)) if on else text


def gqa_accuracy(predictions: Mapping, answers: Mapping, *, normalize: str = "both",
                 allow_missing: bool = False) -> dict:
    """GQA accuracy as LAVIS reports it: ``{"accuracy": percent (unrounded), "coverage": {...}}`` of
    ``predictions`` (question id -> answer) against ``answers`` (question id -> the one answer): exact match after
    :func:`process_punctuation` then :func:`process_digit_article`. Every question needs a prediction unless
    ``allow_missing``.

    LAVIS changed which side it normalises: since December 2023 both (``normalize="both"``, the default), from
    February to December 2023 only the prediction (``"predictions"``: an answer such as "t-shirt" could then never
    be matched); GQA's own ``eval.py`` compares the strings as they are (``"none"``). GQA's other official metrics
    (consistency, validity, plausibility, distribution) need its scene graphs and are not computed here."""
    if normalize not in GQA_MODES:
        raise ValueError(f"normalize must be one of {GQA_MODES}, got {normalize!r}")
    ids, coverage = select(predictions, answers, allow_missing=allow_missing)
    correct = [_gqa_norm(predictions[q], normalize != "none", q) == _gqa_norm(answers[q], normalize == "both", q)
               for q in ids]
    return {"accuracy": sum(correct) / len(correct) * 100, "coverage": coverage}
