"""Specification of the official VQA accuracy metric, as implemented in vlm.vqa_metric.

Reference: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
(master, a013f00).  Expected values below are computed by hand from the rules:

* per question: mean over the 10 leave-one-out subsets of min(1, matches/3),
  so k matching humans give 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >=4;
* whitespace clean-up always, normalisation only when the humans disagree;
* overall / per-type: round(100 * mean(unrounded per-question), 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import pytest

from vlm import vqa_metric as vm
from vlm.vqa_metric import (
    ScoreReport,
    main,
    normalize_answer,
    read_official_pair,
    read_prediction_jsonl,
    score_records,
    vqa_accuracy,
)


def ten(*groups: tuple[str, int]) -> list[str]:
    """Build ten human answers from (answer, count) groups."""
    answers = [answer for answer, count in groups for _ in range(count)]
    assert len(answers) == 10
    return answers


# ---------------------------------------------------------------------------
# Tables are the official ones
# ---------------------------------------------------------------------------

def test_contraction_table_is_the_official_one():
    assert len(vm.CONTRACTIONS) == 120
    digest = hashlib.sha256(json.dumps(sorted(vm.CONTRACTIONS.items())).encode()).hexdigest()
    assert digest == "3e5960526f62912d3b70896069c43c13d7c21be38d50ca28efbb9095b499454f"


def test_other_tables_are_the_official_ones():
    assert vm.PUNCTUATION == (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
                              "_", "-", ">", "<", "@", "`", ",", "?", "!")
    assert vm.NUMBER_WORDS == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                               "four": "4", "five": "5", "six": "6", "seven": "7",
                               "eight": "8", "nine": "9", "ten": "10"}
    assert vm.ARTICLES == {"a", "an", "the"}


# ---------------------------------------------------------------------------
# normalize_answer: punctuation, then digits / articles / contractions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # lower-casing, number words, articles
    ("Yes", "yes"),
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("twenty", "twenty"),            # only zero..ten (and none) are mapped
    ("a dog", "dog"),
    ("The Dog", "dog"),
    ("an apple a day", "apple day"),
    ("the", ""),
    ("  many   spaces ", "many spaces"),
    # contractions (the apostrophe is not punctuation, so "don't" survives)
    ("dont", "don't"),
    ("Dont", "don't"),
    ("don't", "don't"),
    ("whats that", "what's that"),
    ("somebody'd", "somebodyd"),     # the table maps this one backwards
    ("Im", "im"),                    # capitalised keys can never match after lower()
    ("Ive", "ive"),
    # punctuation next to a space is deleted, otherwise replaced by a space
    ("hello!", "hello"),
    ("wow!great", "wow great"),
    ("wow! great", "wow great"),
    ("x - ray", "x ray"),
    ("x-ray", "x ray"),
    ("black-and-white", "black and white"),
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),
    ("(left)", "left"),
    ('"stop"', "stop"),
    ("a/b", "b"),                    # "a b" -> the article "a" is dropped
    ("and/or", "and or"),
    # the decision is made once per mark on the *input*: one "! " anywhere
    # means every "!" is deleted, even those glued between words
    ("wow!great wow! great", "wowgreat wow great"),
    ("up - x-ray", "up xray"),
    # ... and on the input, not on the text as edited so far: "(" becomes a
    # space first, yet "," is still judged "not next to a space"
    ("x(,y z,w", "x y z w"),
    # digit-comma-digit anywhere: every listed mark is deleted
    ("1,000", "1000"),
    ("1,000,000", "1000000"),
    ("2, 3", "2 3"),
    ("1,2", "12"),
    ("3,4/5", "345"),
    ("3/5", "3 5"),
    ("1,000 (approx)", "1000 approx"),
    # not in the punctuation list
    ("it's 3:30", "it's 3:30"),
    ("50% & #1 *", "50% & #1 *"),
    # periods: removed unless followed by a digit
    ("yes.", "yes"),
    ("1.5", "1.5"),
    (".5", ".5"),
    ("5.", "5"),                     # the intended lookbehind is a typo: kept only if a digit follows
    ("3.14.", "3.14"),
    ("a.m.", "am"),
    ("e.g. 5", "eg 5"),
    ("mr.5", "mr.5"),
    ("...", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_at_most_32_periods_are_removed():
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE == 32 lands in `count`.
    assert normalize_answer("." * 32) == ""
    assert normalize_answer("." * 33) == "."
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("yes" + "." * 35) == "yes..."


def test_digits_are_ascii_only_like_the_python2_script():
    # "\d" without the UNICODE flag (which went into `count`) is [0-9] in
    # Python 2, so a period before an Arabic-Indic digit is removed.
    assert normalize_answer("\u0663.\u0665") == "\u0663\u0665"
    assert normalize_answer("\u0663,\u0665") == "\u0663 \u0665"


def test_lowercasing_is_per_character_like_python2():
    assert normalize_answer("\u0130") == "i"            # Python 3 would give "i\u0307"
    assert normalize_answer("ΟΔΟΣ") == "οδοσ"           # no final-sigma rule


# ---------------------------------------------------------------------------
# vqa_accuracy: leave-one-out over the ten humans
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    (1, 0.3),   # (1 * min(1, 0/3) + 9 * min(1, 1/3)) / 10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 -- three agreeing humans are NOT full marks
    (4, 1.0),   # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_k_matching_humans(k, expected):
    answers = ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_leave_one_out_is_by_position_even_for_identical_strings():
    # 3 "red": each of the 3 left out leaves 2 matches (2/3), each of the 7
    # others leaves 3 matches (1).  A set-based leave-one-out would differ.
    assert vqa_accuracy("red", ten(("red", 3), ("blue", 7))) == pytest.approx(0.9)
    assert vqa_accuracy("blue", ten(("red", 3), ("blue", 7))) == pytest.approx(1.0)


def test_answer_lists_of_other_lengths_use_the_same_rule():
    assert vqa_accuracy("x", ["x", "x", "y"]) == pytest.approx((2 * 1 / 3 + 2 / 3) / 3)


def test_normalisation_applies_when_humans_disagree():
    answers = ten(("2", 3), ("3", 7))
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    # the human answers are normalised too
    assert vqa_accuracy("2", ten(("two", 4), ("three", 6))) == 1.0
    assert vqa_accuracy("Yes", ten(("yes", 9), ("no", 1))) == 1.0
    assert vqa_accuracy("a dog", ten(("dog", 4), ("cat", 6))) == 1.0
    assert vqa_accuracy("dont", ten(("don't", 2), ("no", 8))) == pytest.approx(0.6)
    assert vqa_accuracy("1,000", ten(("1000", 4), ("many", 6))) == 1.0
    assert vqa_accuracy("yes!", ten(("yes", 1), ("no", 9))) == pytest.approx(0.3)


def test_no_normalisation_at_all_when_all_ten_humans_agree():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0      # not even lower-cased
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy("dog", ["the dog"] * 10) == 0.0
    assert vqa_accuracy("the dog", ["the dog"] * 10) == 1.0
    assert vqa_accuracy("Stop", ["STOP"] * 10) == 0.0


def test_whitespace_is_cleaned_always_and_before_the_agreement_check():
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("\tyes ", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes\tno", ten(("yes no", 4), ("no", 6))) == 1.0
    # "yes\t" cleans to "yes": the humans agree, so "Yes" is not lower-cased
    assert vqa_accuracy("Yes", ten(("yes", 9), ("yes\t", 1))) == 0.0
    assert vqa_accuracy("yes", ten(("yes", 9), (" yes\n", 1))) == 1.0


def test_period_count_quirk_changes_the_score():
    answers = ten(("yes", 9), ("no", 1))
    assert vqa_accuracy("yes" + "." * 32, answers) == 1.0
    assert vqa_accuracy("yes" + "." * 33, answers) == 0.0    # "yes." after 32 removals


def test_vqa_accuracy_rejects_bad_arguments():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy(None, ["yes"] * 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


# ---------------------------------------------------------------------------
# score_records: aggregation
# ---------------------------------------------------------------------------

def rec(qid, prediction, answers, answer_type=None, question_type=None):
    record = {"question_id": qid, "prediction": prediction, "answers": answers}
    if answer_type is not None:
        record["answer_type"] = answer_type
    if question_type is not None:
        record["question_type"] = question_type
    return record


SAMPLE = [
    rec(1, "yes", ["yes"] * 10, "yes/no", "is the"),                 # 1.0
    rec(2, "2", ten(("2", 2), ("3", 8)), "number", "how many"),      # 0.6
    rec(3, "cat", ["dog"] * 10, "other", "what"),                    # 0.0
    rec(4, "Two", ten(("two", 1), ("one", 9)), "number", "how many"),  # 0.3
]


def test_score_records_aggregates_like_the_official_script():
    report = score_records(SAMPLE)
    assert isinstance(report, ScoreReport)
    assert report.count == 4
    assert report.per_question == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0, 4: 0.3})
    assert list(report.per_question) == [1, 2, 3, 4]
    assert report.overall == 47.5                                   # 100 * 1.9 / 4
    assert report.by_answer_type == {"yes/no": 100.0, "number": 45.0, "other": 0.0}
    assert report.by_question_type == {"is the": 100.0, "how many": 45.0, "what": 0.0}


def test_overall_is_rounded_from_unrounded_values():
    records = [rec(i, "yes", ["yes"] * 10) for i in range(2)] + [rec(2, "no", ["yes"] * 10)]
    report = score_records(records)
    assert report.overall == 66.67
    assert report.by_answer_type == {} and report.by_question_type == {}


def test_rounding_ties_go_away_from_zero_like_python2_round():
    # 100 * 1 / 800 = 0.125 exactly; Python 2 round() gives 0.13, Python 3 0.12.
    records = [rec(0, "yes", ["yes"] * 10, "yes/no")]
    records += [rec(i, "no", ["yes"] * 10, "yes/no") for i in range(1, 800)]
    report = score_records(records)
    assert report.overall == 0.13
    assert report.by_answer_type == {"yes/no": 0.13}


def test_score_records_errors_name_record_and_field():
    bad = [SAMPLE[0], {"question_id": 5, "prediction": "x", "answers": ["x"] * 9}]
    with pytest.raises(ValueError, match=r"record 2 .*'answers'.*list of 10 strings"):
        score_records(bad)
    with pytest.raises(ValueError, match=r"record 1: missing field 'question_id'"):
        score_records([{"prediction": "x", "answers": ["x"] * 10}])
    with pytest.raises(ValueError, match=r"record 2: field 'question_id': duplicate.*record 1"):
        score_records([SAMPLE[0], SAMPLE[0]])
    with pytest.raises(ValueError, match=r"record 1 .*'answer_type'"):
        score_records([rec(1, "x", ["x"] * 10, answer_type=3)])
    with pytest.raises(ValueError, match="no records"):
        score_records([])


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_read_prediction_jsonl_reads_records(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", SAMPLE[:2] + [""] + SAMPLE[2:])
    records = read_prediction_jsonl(path)
    assert [r["question_id"] for r in records] == [1, 2, 3, 4]
    assert records[1]["answer_type"] == "number"
    assert score_records(records).overall == 47.5


@pytest.mark.parametrize("bad_line, expected", [
    ("{not json", r"line 2: invalid JSON"),
    (json.dumps({"prediction": "x", "answers": ["x"] * 10}), r"line 2: missing field 'question_id'"),
    (json.dumps(rec(9, "x", ["x"] * 9)), r"line 2 \(question_id 9\): field 'answers'.*list of 10"),
    (json.dumps(rec(9, "x", ["x"] * 9 + [3])), r"line 2 .*field 'answers\[9\]': expected a string"),
    (json.dumps(rec(9, "x", "x")), r"line 2 .*field 'answers'"),
    (json.dumps(rec(9, 7, ["x"] * 10)), r"line 2 .*field 'prediction'"),
    (json.dumps(rec(True, "x", ["x"] * 10)), r"line 2: field 'question_id'"),
    (json.dumps(rec(1, "x", ["x"] * 10)), r"line 2: field 'question_id': duplicate .*first on line 1"),
    ("[1, 2]", r"line 2: expected a JSON object"),
])
def test_read_prediction_jsonl_errors(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "preds.jsonl", [SAMPLE[0], bad_line])
    with pytest.raises(ValueError, match=expected) as info:
        read_prediction_jsonl(path)
    assert str(path) in str(info.value)


def test_read_prediction_jsonl_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        read_prediction_jsonl(path)


def official_files(tmp_path, results, annotations=None, questions=None):
    if annotations is None:
        annotations = {"annotations": [
            {"question_id": r["question_id"], "image_id": 7,
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                         for i, a in enumerate(r["answers"])],
             "answer_type": r["answer_type"], "question_type": r["question_type"],
             "multiple_choice_answer": r["answers"][0]}
            for r in SAMPLE]}
    paths = []
    for name, data in (("results.json", results), ("annotations.json", annotations),
                       ("questions.json", questions)):
        path = tmp_path / name
        if data is not None:
            path.write_text(data if isinstance(data, str) else json.dumps(data))
        paths.append(path if data is not None else None)
    return paths


GOOD_RESULTS = [{"question_id": r["question_id"], "answer": r["prediction"]} for r in reversed(SAMPLE)]


def test_read_official_pair(tmp_path):
    questions = {"task_type": "Open-Ended",
                 "questions": [{"question_id": r["question_id"], "question": "?"} for r in SAMPLE]}
    res, ann, qst = official_files(tmp_path, GOOD_RESULTS, questions=questions)
    records = read_official_pair(res, ann, qst)
    assert [r["question_id"] for r in records] == [1, 2, 3, 4]   # annotation order
    report = score_records(records)
    assert report.overall == 47.5
    assert report.by_answer_type == {"yes/no": 100.0, "number": 45.0, "other": 0.0}


def test_read_official_pair_multiple_choice(tmp_path):
    questions = {"task_type": "Multiple Choice",
                 "questions": [{"question_id": r["question_id"], "multiple_choices": ["yes", "2", "cat"]}
                               for r in SAMPLE]}
    res, ann, qst = official_files(tmp_path, GOOD_RESULTS, questions=questions)
    with pytest.raises(ValueError, match=r"results.json: record 1 \(question_id 4\): field 'answer'.*multiple_choices"):
        read_official_pair(res, ann, qst)


def _annotations_with(**changes):
    annotations = {"annotations": [
        {"question_id": 1, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)],
         "answer_type": "yes/no", "question_type": "is"}]}
    annotations["annotations"][0].update(changes)
    return annotations


@pytest.mark.parametrize("results, annotations, file, expected", [
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 99, "answer": "no"}], None,
     "results.json", r"record 2 \(question_id 99\): field 'question_id': not in .*annotations.json"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}], None,
     "results.json", r"record 2 .*field 'question_id': duplicate"),
    ([{"answer": "yes"}], None, "results.json", r"record 1: missing field 'question_id'"),
    ([{"question_id": 1, "answer": None}], None, "results.json", r"record 1 .*field 'answer'"),
    ({"question_id": 1}, None, "results.json", r"expected a JSON array"),
    ('[{"question_id": 1,\n "answer": }]', None, "results.json", r"invalid JSON at line 2"),
    ([{"question_id": 1, "answer": "yes"}], None, "results.json",
     r"no result for 3 of 4 annotated questions"),
    ([{"question_id": 1, "answer": "yes"}], _annotations_with(answers=[{"answer": "yes"}] * 9),
     "annotations.json", r"record 1 \(question_id 1\): field 'answers'.*list of 10"),
    ([{"question_id": 1, "answer": "yes"}],
     _annotations_with(answers=[{"answer": "yes"}] * 3 + [{"text": "yes"}] + [{"answer": "yes"}] * 6),
     "annotations.json", r"record 1 .*field 'answers\[3\]\.answer'"),
    ([{"question_id": 1, "answer": "yes"}], _annotations_with(answer_type=None),
     "annotations.json", r"record 1 .*field 'answer_type'"),
    ([{"question_id": 1, "answer": "yes"}], {"annotations": [{"answers": []}]},
     "annotations.json", r"record 1: missing field 'question_id'"),
    ([{"question_id": 1, "answer": "yes"}], {"annotations": [_annotations_with()["annotations"][0]] * 2},
     "annotations.json", r"record 2 .*duplicate"),
    ([{"question_id": 1, "answer": "yes"}], [], "annotations.json", r"'annotations' array"),
])
def test_read_official_pair_errors(tmp_path, results, annotations, file, expected):
    res, ann, _ = official_files(tmp_path, results, annotations)
    with pytest.raises(ValueError, match=expected) as info:
        read_official_pair(res, ann)
    assert file in str(info.value)


def test_read_official_pair_question_file_must_cover_annotations(tmp_path):
    res, ann, qst = official_files(tmp_path, GOOD_RESULTS, questions={"questions": [{"question_id": 1}]})
    with pytest.raises(ValueError, match=r"questions.json: no question with question_id 2"):
        read_official_pair(res, ann, qst)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def test_cli_scores_jsonl_and_writes_per_question(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", SAMPLE)
    out = tmp_path / "acc.jsonl"
    assert main([str(preds), "--per-question", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "VQA accuracy: 47.50"
    assert any(line.split() == ["number", "45.00"] for line in lines)
    assert any(line.split() == ["how", "many", "45.00"] for line in lines)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
    assert [r["accuracy"] for r in rows] == pytest.approx([1.0, 0.6, 0.0, 0.3])
    assert sorted(os.listdir(tmp_path)) == ["acc.jsonl", "p.jsonl"]   # no temp file left


def test_cli_per_question_replaces_existing_file(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", SAMPLE[:1])
    out = tmp_path / "acc.jsonl"
    out.write_text("old\n" * 50)
    assert main([str(preds), "--per-question", str(out)]) == 0
    assert out.read_text() == '{"question_id": 1, "accuracy": 1.0}\n'
    assert capsys.readouterr().out.splitlines()[-1] == "VQA accuracy: 100.00"


def test_cli_official_pair(tmp_path, capsys):
    res, ann, _ = official_files(tmp_path, GOOD_RESULTS)
    assert main(["--results", str(res), "--annotations", str(ann)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "VQA accuracy: 47.50"
    assert any(line.split() == ["yes/no", "100.00"] for line in out)


def test_cli_zero_accuracy_prints_two_decimals(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [rec(1, "no", ["yes"] * 10)])
    assert main([str(preds)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "VQA accuracy: 0.00"


def test_cli_bad_input_exits_2_with_message(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "bad.jsonl", [SAMPLE[0], rec(2, "x", ["x"] * 9)])
    out = tmp_path / "acc.jsonl"
    assert main([str(preds), "--per-question", str(out)]) == 2
    captured = capsys.readouterr()
    assert "bad.jsonl: line 2" in captured.err and "'answers'" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [],
    ["p.jsonl", "--results", "r.json", "--annotations", "a.json"],
    ["--results", "r.json"],
    ["p.jsonl", "--questions", "q.json"],
    [],
])
def test_cli_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--per-question" in text and "--annotations" in text and "VQA accuracy: NN.NN" in text


# ---------------------------------------------------------------------------
# Cross-check against a line-for-line transliteration of the official code
# ---------------------------------------------------------------------------

def official_oracle(items):
    """vqaEval.py (a013f00) evaluate(), transliterated; valid for ASCII input.

    items: (question_id, prediction, answers, answer_type, question_type).
    Uses vm.CONTRACTIONS, whose content is pinned by the checksum test above.
    """
    punct = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-',
             '>', '<', '@', '`', ',', '?', '!']
    manualMap = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
                 'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
    articles = ['a', 'an', 'the']
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")

    def processPunctuation(inText):
        outText = inText
        for p in punct:
            if (p + ' ' in inText or ' ' + p in inText) or (re.search(commaStrip, inText) != None):  # noqa: E711
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        return periodStrip.sub("", outText, re.UNICODE)

    def processDigitArticle(inText):
        outText = []
        for word in inText.lower().split():
            word = manualMap.setdefault(word, word)
            if word not in articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in vm.CONTRACTIONS:
                outText[wordId] = vm.CONTRACTIONS[word]
        return ' '.join(outText)

    accQA, accQuesType, accAnsType, evalQA = [], {}, {}, {}
    for quesId, resAns, answers, ansType, quesType in items:
        gts = [{'answer': a, 'answer_id': i + 1} for i, a in enumerate(answers)]
        for ansDic in gts:
            ansDic['answer'] = ansDic['answer'].replace('\n', ' ').replace('\t', ' ').strip()
        resAns = resAns.replace('\n', ' ').replace('\t', ' ').strip()
        gtAcc = []
        gtAnswers = [ans['answer'] for ans in gts]
        if len(set(gtAnswers)) > 1:
            for ansDic in gts:
                ansDic['answer'] = processDigitArticle(processPunctuation(ansDic['answer']))
            resAns = processDigitArticle(processPunctuation(resAns))
        for gtAnsDatum in gts:
            otherGTAns = [item for item in gts if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item['answer'] == resAns]
            gtAcc.append(min(1, float(len(matchingAns)) / 3))
        avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
        accQA.append(avgGTAcc)
        accQuesType.setdefault(quesType, []).append(avgGTAcc)
        accAnsType.setdefault(ansType, []).append(avgGTAcc)
        evalQA[quesId] = avgGTAcc
    mean = lambda xs: round(100 * float(sum(xs)) / len(xs), 2)  # noqa: E731
    return (evalQA, mean(accQA), {k: mean(v) for k, v in accAnsType.items()},
            {k: mean(v) for k, v in accQuesType.items()})


TRICKY = ["yes", "Yes", "no", "No.", "2", "two", "Two", "a", "the dog", "dog", "dont", "don't",
          "1,000", "1000", "1.5", "yes.", "5.", "5", "red,blue", "red blue", "(x)", "x", "x - y",
          " yes", "yes\n", "\tno", "none", "0", "hello!", "black-and-white", "black and white",
          "ten", "10", "Im", "somebody'd", "." * 34 + "yes", "yes" + "." * 33, "3,4/5", "a/b",
          "", " ", '"q"', "an apple", "apple", "e.g. 5", "1, 2", "1,2", "whats", "what's"]


def random_text(rng):
    if rng.random() < 0.7:
        return rng.choice(TRICKY)
    return "".join(rng.choice("ab 12.,-!?()'/\\\"\t\n_+=@`<>[]{};:") for _ in range(rng.randint(0, 8)))


def test_matches_official_transliteration_on_random_cases():
    rng = random.Random(20240607)
    items = []
    for qid in range(400):
        pool = [random_text(rng) for _ in range(rng.randint(1, 4))]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool) if rng.random() < 0.6 else random_text(rng)
        items.append((qid, prediction, answers, rng.choice(["yes/no", "number", "other"]),
                      rng.choice(["what", "how many", "is the"])))
    per_question, overall, by_answer, by_question = official_oracle(items)

    for qid, prediction, answers, _, _ in items:
        assert vqa_accuracy(prediction, answers) == per_question[qid]   # bit-exact
    report = score_records(rec(*item) for item in items)
    assert report.per_question == per_question
    assert report.overall == overall
    assert report.by_answer_type == by_answer
    assert report.by_question_type == by_question
    assert len({round(v, 6) for v in per_question.values()}) == 5   # all of 0/.3/.6/.9/1 occur


def test_the_cli_scores_as_the_readme_spells_it_and_as_earlier_releases_did(tmp_path):
    import subprocess
    import sys

    preds = write_jsonl(tmp_path / "p.jsonl", [rec(1, "no", ["yes"] * 10)])
    for argv in (["score", str(preds)], ["score", "score", str(preds)]):
        done = subprocess.run([sys.executable, "-m", "stages.cli", *argv], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "VQA accuracy: 0.00"
