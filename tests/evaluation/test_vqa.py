"""VQA accuracy: every normalisation rule of the official tool by a hand-worked example, the leave-one-out
average, the per-type breakdowns and the different treatment of predictions and human answers (both versions
of the tool); GQA's exact match."""
from __future__ import annotations

import pytest

from blipfast.evaluation import gqa_accuracy, normalize_answer, question_accuracy, vqa_accuracy
from blipfast.evaluation.vqa import process_digit_article, process_punctuation


@pytest.mark.parametrize("text, expected", [
    # punctuation that touches no space becomes a space (then the split joins single spaces)
    ("yes!", "yes"), ("t-shirt", "t shirt"), ("red/blue", "red blue"), ('"hi"', "hi"), ("(a)b", "b"),
    # a mark that touches a space somewhere is deleted everywhere in the text, even where it touches none
    ("x-ray - yes", "xray yes"), ("hello - world", "hello world"),
    # a digit-comma-digit anywhere deletes every mark instead of spacing it
    ("1,000", "1000"), ("2,000-3,000", "20003000"), ("1,5 t-shirt", "15 tshirt"),
    # periods go unless a digit follows (the pattern is a look-ahead; "3." loses its period, ".5" keeps it)
    ("3.", "3"), ("3.5", "3.5"), ("u.s.a.", "usa"), (".5", ".5"), ("end.", "end"),
    # marks the tool does not list stay: the apostrophe, the colon, the hash
    ("it's 5:30", "it's 5:30"), ("#1", "#1"),
    # lower case, number words zero..ten and "none" to digits (eleven stays), articles dropped
    ("YES", "yes"), ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"), ("a dog", "dog"),
    ("The An A", ""), ("an apple", "apple"),
    # the contraction table: missing apostrophes restored, its quirks kept
    ("dont", "don't"), ("whats", "what's"), ("somebody'd", "somebodyd"), ("Im", "im"), ("ive", "ive"),
    # newlines and tabs to spaces, outer spaces stripped, inner runs of spaces collapsed
    ("\tyes\n", "yes"), ("  two   dogs ", "2 dogs"),
])
def test_prediction_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_at_most_32_periods_go():
    # the tool passes re.UNICODE (32) where re.sub takes its count
    assert process_punctuation("a" + "." * 33) == "a."
    assert process_punctuation("a" + "." * 32) == "a"


def test_human_answers_get_punctuation_only():
    assert process_punctuation("Two!") == "Two "  # no lower case, no digits, no strip
    assert process_digit_article("Two Dogs") == "2 dogs"


def _exact(k: int) -> float:
    # hand-worked: the k subsets that leave out a matching human see k - 1 matches, the 10 - k others see k
    return (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10


@pytest.mark.parametrize("rule", ["lavis", "official"])
@pytest.mark.parametrize("k, percent", [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (7, 100.0),
                                        (10, 100.0)])
def test_leave_one_out(k, percent, rule):
    answers = ["cat"] * k + ["dog", "bird", "fish", "cow", "pig", "hen", "rat", "owl", "elk", "emu"][:10 - k]
    acc = question_accuracy("cat", answers, rule)
    assert acc == pytest.approx(_exact(k), abs=1e-12)
    assert vqa_accuracy({1: "cat"}, {1: {"answers": answers}}, rule=rule)["overall"] == percent


def test_official_answer_dicts_and_equal_records():
    # the official records carry answer_id: each subset leaves out exactly one
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(4)]
    answers += [{"answer": w, "answer_confidence": "maybe", "answer_id": i + 5} for i, w in enumerate("abcdef")]
    assert question_accuracy("yes", answers) == 1.0
    # records without ids (VizWiz) that are equal leave together: the 4 subsets without a "yes" record see 0
    # matches, the other 6 see 4 -> (4 * 0 + 6 * 1) / 10
    bare = [{k: v for k, v in a.items() if k != "answer_id"} for a in answers]
    assert question_accuracy("yes", bare) == pytest.approx(0.6, abs=1e-12)


def test_predictions_and_humans_are_treated_differently():
    # lavis (the 2017 tool LAVIS ships): the prediction is fully normalised, humans only lose punctuation, and
    # only when they disagree
    assert question_accuracy("two", ["Two"] * 10, "lavis") == 0.0  # "two" -> "2"; the humans keep "Two"
    assert question_accuracy("2", ["two"] * 10, "lavis") == 0.0
    assert question_accuracy("2", ["2"] * 10, "lavis") == 1.0
    # humans who disagree get the punctuation step only: "two" stays a word, "2" matches one of them
    assert question_accuracy("two", ["two"] * 9 + ["2"], "lavis") == pytest.approx(0.3, abs=1e-12)
    # "yes!" becomes "yes " (a space, not stripped) and never equals a normalised prediction
    assert question_accuracy("yes", ["yes!"] * 4 + ["no"] * 6, "lavis") == 0.0
    # all humans equal: their answer is not touched at all
    assert question_accuracy("yes", ["yes!"] * 10, "lavis") == 0.0
    # official (after its 2021 fix): both sides normalised when the humans disagree, neither when they agree
    assert question_accuracy("two", ["two"] * 9 + ["2"], "official") == 1.0
    assert question_accuracy("yes", ["yes!"] * 4 + ["no"] * 6, "official") == 1.0
    assert question_accuracy("Two", ["Two"] * 10, "official") == 1.0
    assert question_accuracy("two", ["Two"] * 10, "official") == 0.0
    assert question_accuracy(" yes\n", ["\tyes"] * 10, "official") == 1.0  # both sides cleaned


def test_per_type_breakdowns_and_rounding():
    ann = {
        10: {"answers": ["2"] * 10, "question_type": "how many", "answer_type": "number"},
        11: {"answers": ["3"] * 2 + ["4"] * 8, "question_type": "how many", "answer_type": "number"},
        12: {"answers": ["red"] * 10, "question_type": "what color", "answer_type": "other"},
        13: {"answers": ["yes"] * 10, "question_type": "is the", "answer_type": "yes/no"},
        14: {"answers": ["no"] * 10},  # no types: counted overall only
    }
    pred = {10: "two", 11: "3", 12: "blue", 13: "Yes.", 14: "no"}
    res = vqa_accuracy(pred, ann)
    # per question: 1, 0.6, 0, 1, 1
    assert res["perQuestion"] == {10: 100.0, 11: 60.0, 12: 0.0, 13: 100.0, 14: 100.0}
    assert res["overall"] == 72.0
    assert res["perQuestionType"] == {"how many": 80.0, "what color": 0.0, "is the": 100.0}
    assert res["perAnswerType"] == {"number": 80.0, "other": 0.0, "yes/no": 100.0}
    assert vqa_accuracy({1: "b", 2: "c", 3: "d"}, {1: {"answers": ["b"] * 10}, 2: {"answers": ["x"] * 10},
                                                   3: {"answers": ["x"] * 10}})["overall"] == 33.33
    # the rule assumes 10 humans: with one, every leave-one-out subset is empty
    assert question_accuracy("b", ["b"]) == 0.0
    # "a" is an article: the prediction normalises to ""
    assert question_accuracy("a", ["a"] * 10) == 0.0


def test_missing_and_unknown_predictions():
    ann = {1: {"answers": ["b"] * 10}, 2: {"answers": ["c"] * 10}}
    with pytest.raises(ValueError, match="no prediction for 1 of 2"):
        vqa_accuracy({1: "b"}, ann)
    with pytest.raises(ValueError, match="id 3 is not in"):
        vqa_accuracy({1: "b", 2: "c", 3: "d"}, ann)
    res = vqa_accuracy({1: "b"}, ann, allow_missing=True)
    assert res["overall"] == 100.0 and res["coverage"] == {"scored": 1, "references": 2}
    with pytest.raises(ValueError, match="rule"):
        vqa_accuracy({1: "b", 2: "c"}, ann, rule="2017")
    with pytest.raises(TypeError, match="question 1"):
        vqa_accuracy({1: 3, 2: "c"}, ann)
    with pytest.raises(ValueError, match="no human answers"):
        question_accuracy("a", [])


def test_gqa_normalisation_modes():
    answers = {1: "t-shirt", 2: "2", 3: "no", 4: "left"}
    preds = {1: "t-shirt", 2: "Two", 3: "No.", 4: "right"}
    assert gqa_accuracy(preds, answers)["accuracy"] == 75.0  # both sides normalised
    # LAVIS before December 2023: only the prediction, so "t shirt" != "t-shirt"
    assert gqa_accuracy(preds, answers, normalize="predictions")["accuracy"] == 50.0
    # GQA's eval.py: the strings as they are
    assert gqa_accuracy(preds, answers, normalize="none")["accuracy"] == 25.0
    assert gqa_accuracy({1: "t shirt"}, answers, allow_missing=True)["coverage"] == {"scored": 1, "references": 4}
    with pytest.raises(ValueError, match="normalize"):
        gqa_accuracy(preds, answers, normalize="all")
