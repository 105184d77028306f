"""``blipfast.evaluation``: score captions, VQA / GQA answers, NLVR2 labels and retrieval the way the BLIP and
BLIP-2 papers' tables were scored (``blipfast eval``; docs/evaluation.md).

The scorers take predictions and references in memory (dicts keyed by image or question id); the readers of
:mod:`~blipfast.evaluation.formats` build those dicts from the files people have. Nothing here imports torch or
the models; the caption metrics need ``pip install 'blipfast[eval]'`` and a Java runtime.
"""
from .caption import (METRICS, CaptionScores, ScorerUnavailableError, check_java, format_captions, ptb_tokenize,
                      sanitize_caption, score_captions)
from .formats import (Table, canonical_id, id_from_name, read_answer_predictions, read_caption_predictions,
                      read_caption_references, read_gqa_references, read_nlvr2_predictions, read_nlvr2_references,
                      read_vqa_references, select)
from .nlvr2 import nlvr2_accuracy
from .vqa import (format_vqa, gqa_accuracy, normalize_answer, process_digit_article, process_punctuation,
                  question_accuracy, vqa_accuracy)

__all__ = ["METRICS", "CaptionScores", "ScorerUnavailableError", "check_java", "format_captions", "ptb_tokenize",
           "sanitize_caption", "score_captions", "Table", "canonical_id", "id_from_name", "read_answer_predictions",
           "read_caption_predictions", "read_caption_references", "read_gqa_references", "read_nlvr2_predictions",
           "read_nlvr2_references", "read_vqa_references", "select", "gqa_accuracy", "nlvr2_accuracy", "format_vqa",
           "normalize_answer", "process_digit_article", "process_punctuation", "question_accuracy", "vqa_accuracy"]
