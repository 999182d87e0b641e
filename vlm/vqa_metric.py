"""VQA accuracy exactly as the official VQA evaluation script computes it.

Reference: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(master, commit a013f00).  This is an independent re-implementation that keeps
every behaviour of that script, including the odd ones listed below, so that
numbers produced here are the numbers the official evaluation would report.

The metric
----------
Each VQA question comes with ten human answers.  A predicted answer is compared
with each of the ten ways of leaving one human out; against the nine remaining
answers it earns ``min(1, matches / 3)``, and the question's accuracy is the
mean of those ten numbers.  If ``k`` of the ten humans gave the predicted
answer, this works out to::

    k      = 0    1    2    3    4 or more
    score  = 0.0  0.3  0.6  0.9  1.0

(``k = 3`` gives 0.9, not 1.0: leaving out one of the three matching humans
leaves only two matches, worth 2/3.)

Before comparing, the strings are prepared in two steps:

1. Whitespace: newlines and tabs become spaces, then leading and trailing
   whitespace is stripped.  This always happens, to the prediction and to
   all ten human answers.
2. Normalisation, *only if the ten cleaned human answers are not all the
   same string*.  The prediction and every human answer then go through
   :func:`process_punctuation` followed by :func:`process_digit_article`
   (together: :func:`normalize_answer`).  ``process_digit_article``
   lower-cases, maps number words to digits ("two" -> "2"), drops the
   articles "a", "an", "the" and restores contractions ("dont" -> "don't").

Matching is then plain string equality.  Overall accuracy is the mean of the
unrounded per-question values, times 100, rounded to 2 decimals; accuracy per
answer type and per question type is computed the same way over the
questions of that type.

Quirks kept on purpose
----------------------
* **No normalisation when all humans agree.**  If the ten cleaned answers are
  identical nothing else is done to either side: "Yes", "yes." and "the dog"
  all score 0 against ten "yes" / ten "dog", and "2" scores 0 against ten
  "two".  Lower-casing is part of the normalisation, so it is gated too.  (The
  maintainers say this was meant to leave OCR-style answers untouched.)
* **Punctuation is judged on the input, not on the text being edited.**  Each
  of the 21 characters in :data:`PUNCTUATION` is deleted outright when the
  original text has it next to a space (on either side) or when the original
  text contains a digit, comma, digit sequence anywhere ("1,000"); otherwise
  it is replaced by a space.  So "1,000" becomes "1000", "2, 3" becomes
  "2 3", "red,blue" becomes "red blue", and one "1,5" anywhere makes every
  listed character vanish instead of turning into a space.  The apostrophe,
  colon, period, "*", "#", "%", "&" and "$" are not in the list.
* **Periods.**  The period pattern is ``(?!<=\\d)(\\.)(?!\\d)``.  Its first
  group looks like a "not preceded by a digit" lookbehind but is a lookahead
  for the literal text "<=" followed by a digit, which can never match where a
  period stands, so in effect *every period not followed by a digit is
  removed*: "1.5" and ".5" are kept, but "yes." -> "yes", "5." -> "5" and
  "a.m." -> "am".
* **At most 32 periods are removed.**  The script calls
  ``periodStrip.sub("", text, re.UNICODE)``; the third positional argument of
  ``Pattern.sub`` is ``count``, and ``re.UNICODE == 32``.  The 33rd removable
  period onwards stays.
* **ASCII digits only.**  For the same reason the UNICODE flag never reached
  the patterns.  The official script is Python 2 code (it uses ``print``
  statements), where ``\\d`` without that flag means ``[0-9]``; we use
  ``[0-9]`` so that, say, Arabic-Indic digits are not treated as digits.
* **Python 2 text semantics elsewhere.**  Lower-casing maps character by
  character, as Python 2's ``unicode.lower`` does ("İ" -> "i", no final-sigma
  rule); rounding of the reported percentages is round-half-away-from-zero
  on the exact binary value, as Python 2's ``round`` is (Python 3 rounds
  exact ties to even: 100/800 = 0.125 is 0.13 here, 0.12 in a Python 3 port).
  Unicode character tables themselves are Python 3's.
* **Dead and odd table entries.**  The contraction table has keys with
  capitals ("Im", "Ive", "Id've", "I'dve") that can never match because text
  is lower-cased first, and maps "somebody'd" to "somebodyd" (backwards).
  "none" maps to "0".  The tables are kept exactly as published.
* **Leave-one-out is by position.**  The script removes the held-out answer
  record by comparing answer dicts, and in VQA data every record has its own
  ``answer_id``; so exactly one of the ten is left out each time, even when
  several humans typed the same string.

Command line
------------
``python -m vlm.vqa_metric score PRED.jsonl [--per-question OUT.jsonl]``
scores JSON lines ``{"question_id", "prediction", "answers": [10 strings],
"answer_type"?, "question_type"?}``.  ``python -m vlm.vqa_metric score
--results R.json --annotations A.json [--questions Q.json]`` scores the
official result / annotation files.  The last line printed is always
``VQA accuracy: NN.NN``.  ``score --results R.json --questions Q.json``
(no annotations: test-dev / test) only checks a results file for submission
(:func:`check_results`).  Bad input exits with status 2 and a message naming
the file, the line or record, and the field.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Sequence, Union

QuestionId = Union[int, str]

NUM_ANSWERS = 10
"""Number of human answers per VQA question."""

# ---------------------------------------------------------------------------
# Tables (content identical to the official script)
# ---------------------------------------------------------------------------

# fmt: off
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# fmt: on

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
"""Characters handled by :func:`process_punctuation`, in the official order."""

# "A period not followed by a digit" -- see the module docstring for why the
# leading "(?!<=...)" group, copied from the official pattern, does nothing.
_PERIOD = re.compile(r"(?!<=[0-9])(\.)(?![0-9])")
_DIGIT_COMMA_DIGIT = re.compile(r"([0-9])(,)([0-9])")
_MAX_PERIODS_REMOVED = int(re.UNICODE)  # 32: the official script's accidental count


# ---------------------------------------------------------------------------
# Answer normalisation
# ---------------------------------------------------------------------------

def clean_whitespace(text: str) -> str:
    """Turn newlines and tabs into spaces and strip both ends (always applied)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation, then drop periods not followed by a digit."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The decision looks at the *input* text, never at `out`.
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def _lower_like_python2(text: str) -> str:
    """Character-by-character lower-casing, as Python 2's ``unicode.lower``."""
    if text.isascii():
        return text.lower()
    return "".join("i" if ch == "\u0130" else ch.lower() for ch in text)


def process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, restore contractions."""
    words = []
    for word in _lower_like_python2(text).split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The normalisation the official script applies when the humans disagree.

    This is :func:`process_punctuation` then :func:`process_digit_article`; it
    does not include :func:`clean_whitespace`, which :func:`vqa_accuracy`
    applies first and unconditionally.
    """
    return process_digit_article(process_punctuation(text))


def submission_answer(text: str) -> str:
    """An answer as it goes into a results file for the VQA challenge server.

    The challenge's answer processor (EvalAI's, copied by LLaVA's
    ``EvalAIAnswerProcessor`` for its VQA v2 submissions) is this normalisation
    applied unconditionally: whitespace, punctuation, lower case, number words
    to digits, articles dropped ("Two dogs." -> "2 dogs").  It also deletes
    every "," and "?" before the punctuation step and splits "'s" off
    ("man's" -> "man 's"); we leave both to the official normalisation, which
    the server applies again when the humans disagree."""
    return normalize_answer(clean_whitespace(text))


def official_question_id(record_id: QuestionId) -> QuestionId:
    """A question id as the official files write it: VQA v2's are integers, which the
    converters store as decimal strings; other ids (the built-in data's) stay strings."""
    if isinstance(record_id, str) and record_id.isascii() and record_id.isdigit():
        return int(record_id)
    return record_id


# ---------------------------------------------------------------------------
# Per-question accuracy
# ---------------------------------------------------------------------------

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy in [0, 1] of one predicted answer against the human answers.

    ``answers`` normally holds the ten human answers of a VQA question (any
    non-empty number is handled the same way).  The value is bit-for-bit the
    per-question value the official script averages.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise TypeError("answers must be a sequence of strings")
    if len(answers) == 0:
        raise ValueError("answers must not be empty")

    predicted = clean_whitespace(prediction)
    humans = [clean_whitespace(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
        predicted = normalize_answer(predicted)

    matches = sum(1 for human in humans if human == predicted)
    # Leave out each human in turn (by position) and score against the rest.
    # Summed in the same order as the official script, for identical floats.
    total = 0.0
    for held_out in humans:
        others_matching = matches - (held_out == predicted)
        total += min(1.0, others_matching / 3)
    return total / len(humans)


# ---------------------------------------------------------------------------
# Scoring many questions
# ---------------------------------------------------------------------------

def _round2(value: float) -> float:
    """Round to 2 decimals, ties away from zero (Python 2 ``round`` semantics)."""
    return float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _mean_percent(values: Sequence[float]) -> float:
    # Same arithmetic order as the official script: round(100 * sum / n, 2).
    return _round2(100 * float(sum(values)) / len(values))


@dataclass
class ScoreReport:
    """Result of :func:`score_records`.

    ``overall`` and the per-type figures are percentages rounded to 2
    decimals; ``per_question`` holds the unrounded per-question accuracies in
    [0, 1], in input order.  Records without an answer type (question type)
    are left out of ``by_answer_type`` (``by_question_type``) but still count
    in ``overall``.
    """

    overall: float
    by_answer_type: dict[str, float]
    by_question_type: dict[str, float]
    per_question: dict[QuestionId, float]
    count: int

    def format_table(self) -> str:
        """Human-readable summary; its last line is ``VQA accuracy: NN.NN``."""
        lines = [f"questions scored: {self.count}"]
        for title, table in (("answer type", self.by_answer_type),
                             ("question type", self.by_question_type)):
            if not table:
                continue
            width = max(len(title), *(len(name) for name in table))
            lines.append(f"{title:<{width}}  accuracy")
            for name in sorted(table):
                lines.append(f"{name:<{width}}  {table[name]:8.2f}")
        lines.append(f"VQA accuracy: {self.overall:.2f}")
        return "\n".join(lines)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return f"{type(value).__name__} {value!r}"[:80]


def _check_question_id(value: Any, where: str) -> QuestionId:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: field 'question_id': expected an integer or string, "
                         f"got {_describe(value)}")
    return value


def _check_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one prediction record; return a clean copy of its fields."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_describe(record)}")
    for name in ("question_id", "prediction", "answers"):
        if name not in record:
            raise ValueError(f"{where}: missing field '{name}'")
    clean: dict[str, Any] = {"question_id": _check_question_id(record["question_id"], where)}
    where = f"{where} (question_id {clean['question_id']!r})"
    if not isinstance(record["prediction"], str):
        raise ValueError(f"{where}: field 'prediction': expected a string, "
                         f"got {_describe(record['prediction'])}")
    clean["prediction"] = record["prediction"]
    answers = record["answers"]
    if not isinstance(answers, list) or len(answers) != NUM_ANSWERS:
        raise ValueError(f"{where}: field 'answers': expected a list of {NUM_ANSWERS} "
                         f"strings, got {_describe(answers)}")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"{where}: field 'answers[{i}]': expected a string, "
                             f"got {_describe(answer)}")
    clean["answers"] = list(answers)
    for name in ("answer_type", "question_type"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field '{name}': expected a string, got {_describe(value)}")
        clean[name] = value
    return clean


def score_records(records: Iterable[dict]) -> ScoreReport:
    """Score prediction records and aggregate them like the official script.

    Each record is a dict with ``question_id`` (int or str), ``prediction``
    (str), ``answers`` (list of 10 str) and optionally ``answer_type`` and
    ``question_type`` (str).  Raises ``ValueError`` naming the record number
    (1-based) and field on bad input, on duplicate question ids, and when
    there is nothing to score.
    """
    per_question: dict[QuestionId, float] = {}
    record_number: dict[QuestionId, int] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for number, raw in enumerate(records, 1):
        record = _check_record(raw, f"record {number}")
        qid = record["question_id"]
        if qid in per_question:
            raise ValueError(f"record {number}: field 'question_id': duplicate question_id "
                             f"{qid!r} (first in record {record_number[qid]})")
        accuracy = vqa_accuracy(record["prediction"], record["answers"])
        per_question[qid] = accuracy
        record_number[qid] = number
        if record["answer_type"] is not None:
            by_answer_type.setdefault(record["answer_type"], []).append(accuracy)
        if record["question_type"] is not None:
            by_question_type.setdefault(record["question_type"], []).append(accuracy)
    if not per_question:
        raise ValueError("no records to score")
    return ScoreReport(
        overall=_mean_percent(list(per_question.values())),
        by_answer_type={k: _mean_percent(v) for k, v in by_answer_type.items()},
        by_question_type={k: _mean_percent(v) for k, v in by_question_type.items()},
        per_question=per_question,
        count=len(per_question),
    )


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------

def read_prediction_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read prediction records, one JSON object per line (blank lines skipped).

    Each line: ``{"question_id", "prediction", "answers": [10 strings],
    "answer_type"?, "question_type"?}``.  Errors name the file, the line and
    the field.
    """
    records: list[dict] = []
    first_line: dict[QuestionId, int] = {}
    lineno = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{os.fspath(path)}: line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                record = _check_record(obj, where)
                qid = record["question_id"]
                if qid in first_line:
                    raise ValueError(f"{where}: field 'question_id': duplicate question_id "
                                     f"{qid!r} (first on line {first_line[qid]})")
                first_line[qid] = lineno
                records.append(record)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: line {lineno + 1}: not valid UTF-8 ({exc.reason})") from None
    if not records:
        raise ValueError(f"{os.fspath(path)}: no records found")
    return records


def _load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: invalid JSON at line {exc.lineno} "
                         f"column {exc.colno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: not valid UTF-8 ({exc.reason})") from None


def _object_list(data: Any, key: str | None, path: str) -> list:
    """``data[key]`` (or ``data`` itself when key is None), checked to be a list."""
    container = data if key is None else (data.get(key) if isinstance(data, dict) else None)
    if not isinstance(container, list):
        shape = "a JSON array" if key is None else f"a JSON object with a '{key}' array"
        raise ValueError(f"{path}: expected {shape}")
    return container


def _official_record_id(record: Any, where: str) -> tuple[QuestionId, str]:
    """The question id of an official-format record, and `where` extended to name it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_describe(record)}")
    if "question_id" not in record:
        raise ValueError(f"{where}: missing field 'question_id'")
    qid = _check_question_id(record["question_id"], where)
    return qid, f"{where} (question_id {qid!r})"


def _read_annotations(path: str) -> dict[QuestionId, dict]:
    """Annotated questions by id, in file order, each as a partial record."""
    annotated: dict[QuestionId, dict] = {}
    for number, ann in enumerate(_object_list(_load_json(path), "annotations", path), 1):
        qid, where = _official_record_id(ann, f"{path}: record {number}")
        if qid in annotated:
            raise ValueError(f"{where}: field 'question_id': duplicate question_id {qid!r}")
        answers = ann.get("answers")
        if not isinstance(answers, list) or len(answers) != NUM_ANSWERS:
            raise ValueError(f"{where}: field 'answers': expected a list of {NUM_ANSWERS} "
                             f"answer objects, got {_describe(answers)}")
        for i, answer in enumerate(answers):
            if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
                raise ValueError(f"{where}: field 'answers[{i}].answer': expected a string")
        for name in ("answer_type", "question_type"):
            if not isinstance(ann.get(name), str):
                raise ValueError(f"{where}: field '{name}': expected a string, "
                                 f"got {_describe(ann.get(name))}")
        annotated[qid] = {
            "question_id": qid,
            "answers": [answer["answer"] for answer in answers],
            "answer_type": ann["answer_type"],
            "question_type": ann["question_type"],
        }
    return annotated


def _read_questions(path: str) -> tuple[dict[QuestionId, dict], bool]:
    """Questions by id, and whether the file is for the multiple-choice task."""
    data = _load_json(path)
    questions: dict[QuestionId, dict] = {}
    for number, question in enumerate(_object_list(data, "questions", path), 1):
        where = f"{path}: record {number}"
        if not isinstance(question, dict) or "question_id" not in question:
            raise ValueError(f"{where}: missing field 'question_id'")
        questions[_check_question_id(question["question_id"], where)] = question
    return questions, data.get("task_type") == "Multiple Choice"


def read_official_pair(results_json: str | os.PathLike, annotations_json: str | os.PathLike,
                       questions_json: str | os.PathLike | None = None) -> list[dict]:
    """Build prediction records from the official results and annotation files.

    ``results_json``: ``[{"question_id", "answer"}, ...]``.
    ``annotations_json``: ``{"annotations": [{"question_id", "answers":
    [{"answer", ...} x 10], "answer_type", "question_type", ...}]}``.
    ``questions_json`` (optional): ``{"questions": [{"question_id", ...}]}``;
    when given, every annotated question must be in it, and for a
    ``"task_type": "Multiple Choice"`` file each answer must be one of the
    question's ``multiple_choices``.

    Like the official loader, there must be exactly one result per annotated
    question.  Records come back in annotation order (the official
    evaluation order).
    """
    results_path, annotations_path = os.fspath(results_json), os.fspath(annotations_json)
    annotated = _read_annotations(annotations_path)
    questions, multiple_choice = ({}, False)
    if questions_json is not None:
        questions_path = os.fspath(questions_json)
        questions, multiple_choice = _read_questions(questions_path)
        for qid in annotated:
            if qid not in questions:
                raise ValueError(f"{questions_path}: no question with question_id {qid!r} "
                                 f"(annotated in {annotations_path})")

    predictions: dict[QuestionId, str] = {}
    for number, result in enumerate(_object_list(_load_json(results_path), None, results_path), 1):
        qid, where = _checked_result(result, f"{results_path}: record {number}", annotated, annotations_path,
                                     predictions)
        if multiple_choice and result["answer"] not in questions[qid].get("multiple_choices", ()):
            raise ValueError(f"{where}: field 'answer': {result['answer']!r} is not one of the "
                             f"question's multiple_choices")
        predictions[qid] = result["answer"]

    missing = [qid for qid in annotated if qid not in predictions]
    if missing:
        sample = ", ".join(repr(q) for q in missing[:5])
        raise ValueError(f"{results_path}: no result for {len(missing)} of {len(annotated)} "
                         f"annotated questions (question_id {sample}{', ...' if len(missing) > 5 else ''}); "
                         f"the official evaluation needs exactly one result per annotated question")
    return [dict(record, prediction=predictions[qid]) for qid, record in annotated.items()]


def _checked_result(result, where: str, known, known_name: str, seen) -> tuple[QuestionId, str]:
    """A results record's question id (and where it is, for messages): one of `known`, not already
    in `seen`, with a string answer; else a ValueError naming the record and the field."""
    qid, where = _official_record_id(result, where)
    if qid not in known:
        raise ValueError(f"{where}: field 'question_id': not in {known_name}")
    if qid in seen:
        raise ValueError(f"{where}: field 'question_id': duplicate question_id {qid!r}")
    if not isinstance(result.get("answer"), str):
        raise ValueError(f"{where}: field 'answer': expected a string, got {_describe(result.get('answer'))}")
    return qid, where


def read_question_ids(questions_json: str | os.PathLike) -> list[QuestionId]:
    """The question ids of an official questions file, in file order (duplicates are an error)."""
    path = os.fspath(questions_json)
    ids: list[QuestionId] = []
    seen: set = set()
    for number, question in enumerate(_object_list(_load_json(path), "questions", path), 1):
        qid, where = _official_record_id(question, f"{path}: record {number}")
        if qid in seen:
            raise ValueError(f"{where}: field 'question_id': duplicate question_id {qid!r}")
        seen.add(qid)
        ids.append(qid)
    return ids


def check_results(results: Any, question_ids: Iterable[QuestionId], results_name: str,
                  questions_name: str) -> int:
    """The rules the challenge server and the official loader (``VQA.loadRes``) apply to a
    results file: a JSON array of ``{"question_id", "answer": string}``, exactly one result
    per question of the questions file, no other ids.  Returns the number of results;
    a broken rule is a ValueError naming the file, the record and the field."""
    expected = set(question_ids)
    seen: set = set()
    for number, result in enumerate(_object_list(results, None, results_name), 1):
        qid, _ = _checked_result(result, f"{results_name}: record {number}", expected, questions_name, seen)
        seen.add(qid)
    missing = [qid for qid in question_ids if qid not in seen]
    if missing:
        sample = ", ".join(repr(q) for q in missing[:5])
        raise ValueError(f"{results_name}: no result for {len(missing)} of {len(expected)} questions of "
                         f"{questions_name} (question_id {sample}{', ...' if len(missing) > 5 else ''}); "
                         f"the server needs exactly one answer per question")
    return len(seen)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def write_per_question(path: str | os.PathLike, per_question: dict[QuestionId, float]) -> None:
    """Write ``{"question_id", "accuracy"}`` lines atomically (temp file + rename)."""
    target = os.path.abspath(os.fspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                    dir=os.path.dirname(target))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for qid, accuracy in per_question.items():
                handle.write(json.dumps({"question_id": qid, "accuracy": accuracy}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


_DESCRIPTION = """\
Score answers with the official VQA accuracy metric (GT-Vision-Lab/VQA vqaEval.py).
Per question: min(1, humans-agreeing/3) averaged over the ten leave-one-human-out
subsets; answers are normalised only when the ten human answers differ.
"""

_SCORE_EPILOG = """\
input formats:
  PRED.jsonl       one JSON object per line:
                   {"question_id": 1, "prediction": "two", "answers": [10 strings],
                    "answer_type": "number", "question_type": "how many"}
                   (answer_type and question_type are optional)
  --results        official results file: [{"question_id": 1, "answer": "two"}, ...]
  --annotations    official annotations file: {"annotations": [{"question_id": 1,
                   "answers": [{"answer": ..., "answer_confidence": ..., "answer_id": ...}
                   x 10], "answer_type": ..., "question_type": ..., ...}]}
                   (one result per annotated question is required)
  --questions      official questions file (optional, checked for consistency);
                   --results R.json --questions Q.json alone checks a submission
                   (test-dev / test: no annotations) and scores nothing

output:
  a table of accuracy (percent) overall, per answer type and per question type;
  the last line is always "VQA accuracy: NN.NN".  Exit status 2 on bad input.

examples:
  python -m vlm.vqa_metric score preds.jsonl --per-question acc.jsonl
  python -m vlm.vqa_metric score --results res.json --annotations v2_mscoco_val2014_annotations.json
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqa-rlhf score", description=_DESCRIPTION, epilog=_SCORE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="?", metavar="PRED.jsonl",
                        help="prediction records, one JSON object per line")
    parser.add_argument("--results", metavar="R.json", help="official results file")
    parser.add_argument("--annotations", metavar="A.json", help="official annotations file")
    parser.add_argument("--questions", metavar="Q.json",
                        help="official questions file (optional, with --results)")
    parser.add_argument("--per-question", metavar="OUT.jsonl",
                        help='also write {"question_id", "accuracy"} lines, accuracy in [0, 1]')
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:  # `vqa-rlhf score score PRED.jsonl`, the spelling of earlier releases
        argv = argv[1:]
    args = parser.parse_args(argv)
    official = args.results is not None or args.annotations is not None
    if args.predictions is not None and (official or args.questions is not None):
        parser.error("give either PRED.jsonl or --results/--annotations, not both")
    if args.predictions is None and not (args.results and (args.annotations or args.questions)):
        parser.error("give PRED.jsonl, or --results with --annotations (and optionally --questions), "
                     "or --results with --questions to check a submission")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = _build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as exc:  # --help, or a usage error already reported by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.annotations is None and args.predictions is None:  # a submission: nothing to score
            count = check_results(_load_json(args.results), read_question_ids(args.questions), args.results,
                                  args.questions)
            print(f"{args.results}: valid results file, one answer for each of the {count} questions "
                  f"of {args.questions}")
            return 0
        if args.predictions is not None:
            records = read_prediction_jsonl(args.predictions)
        else:
            records = read_official_pair(args.results, args.annotations, args.questions)
        report = score_records(records)
        if args.per_question:
            write_per_question(args.per_question, report.per_question)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.per_question:
        print(f"per-question accuracies written to {args.per_question}")
    print(report.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
