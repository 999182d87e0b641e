"""Evaluation: answer a split's questions and score them with the official VQA metric.

    vqa-rlhf eval configs/default.yaml [--model DIR] [--tag NAME] [--questions Q.json] [key=value ...]

Writes <run>/eval/<tag>/: results.json (the official results format,
[{"question_id", "answer"}], ready to submit to the VQA challenge server: every
question of the split exactly once, answers post-processed as the challenge's answer
processor does, checked against the questions file before it is written),
predictions.jsonl (raw prediction + ground truth, the input of `vqa-rlhf score`) and
metrics.json (overall, per answer type, per question type and family, plus the
majority-answer baseline on the same split).

A split without answers (VQA v2 test-dev / test, converted without --annotations)
cannot be scored: it gets results.json and predictions.jsonl only. The questions file
results.json is checked against is --questions, else the file the split was converted
from (the dataset's meta.json), else the split's own records.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from vlm.config import RunConfig
from vlm.data import check_vqa_record, load_split
from vlm.features import image_source
from vlm.generate import answer_questions
from vlm.model import load_model
from vlm.vqa_metric import check_results, official_question_id, read_question_ids, score_records, submission_answer
from stages.common import add_model_option, config_from_args, model_dir_from, run_stage, stage_parser, write_json


def _scored(records, predictions, group_field: str):
    return score_records(
        {
            "question_id": r["id"],
            "prediction": p,
            "answers": r["answers"],
            "answer_type": r.get("answer_type"),
            "question_type": r.get(group_field) or r.get("question_type"),
        }
        for r, p in zip(records, predictions)
    )


def majority_answer_baseline(config: RunConfig, records) -> dict:
    """Always answering the train split's most common answer: the floor a model must clear."""
    train = load_split(config.data_dir, "vqa", config.data.train_split)
    answer, _ = Counter(train["multiple_choice_answer"]).most_common(1)[0]
    report = _scored(records, [answer] * len(records), "question_type")
    return {"answer": answer, "vqa_accuracy": report.overall, "by_answer_type": report.by_answer_type}


def memorisation_check(config: RunConfig, model, processor, images) -> dict | None:
    """The same scores on the first eval.train_check_samples training questions: far above the
    test figure, the model memorised its training images instead of learning to see."""
    if not config.eval.train_check_samples:
        return None
    train = load_split(config.data_dir, "vqa", config.data.train_split)
    records = [r for r in train.select(range(min(config.eval.train_check_samples, len(train))))
               if check_vqa_record(r) is None]
    predictions = answer_questions(model, processor, records, images, config.data.prompt_template,
                                   config.eval.decoding, config.eval.batch_size, config.data.max_length)
    report = _scored(records, predictions, "question_type")
    return {"split": config.data.train_split, "count": report.count, "vqa_accuracy": report.overall,
            "by_question_family": _scored(records, predictions, "question_family").by_question_type}


def tower_probe(config: RunConfig, model) -> dict | None:
    """Per-cell shape / colour probe of the model's vision tower (data_prep/regions.py), where
    the data's captions name their regions (the built-in data); None elsewhere."""
    from data_prep.regions import probe_towers

    try:
        return probe_towers(config, {"tower": model.model.vision_tower})["tower"]
    except (ValueError, FileNotFoundError) as exc:
        print(f"note: no per-cell probe of the vision tower: {exc}", flush=True)
        return None


def submission_questions(config: RunConfig, records: list[dict], questions_file: Path | None,
                         partial: bool) -> tuple[list, str]:
    """The question ids a results file must answer, and where they come from: --questions,
    the VQA v2 questions file the split was converted from (meta.json), or the split itself.
    A slice (eval.max_samples) answers only its own questions."""
    split_dir = config.data_dir / "vqa" / config.eval.split
    if partial:
        return ([official_question_id(r["id"]) for r in records],
                f"the first {len(records)} questions of {split_dir} (eval.max_samples: not a complete submission)")
    if questions_file is None:
        meta_path = config.data_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        converted = meta.get("converted", {}).get("vqa", {}).get(config.eval.split, {})
        sources = [Path(s) for s in converted.get("sources", [])]
        if converted.get("converter") == "vqav2" and sources and sources[0].is_file():
            questions_file = sources[0]  # the questions file (the annotations file comes second)
    if questions_file is not None:
        return read_question_ids(questions_file), str(questions_file)
    return [official_question_id(r["id"]) for r in records], str(split_dir)


def submission(records: list[dict], predictions: list[str]) -> list[dict]:
    """The official results format, answers as the challenge's answer processor leaves them."""
    return [{"question_id": official_question_id(r["id"]), "answer": submission_answer(p)}
            for r, p in zip(records, predictions)]


def evaluate(config: RunConfig, model_dir: Path, tag: str, questions_file: Path | None = None) -> dict:
    out_dir = config.run_dir / "eval" / tag
    split = config.eval.split
    records = load_split(config.data_dir, "vqa", split)
    total = len(records)
    if config.eval.max_samples:
        records = records.select(range(min(config.eval.max_samples, len(records))))
    records = list(records)
    for r in records:  # every question is answered: a submission needs all of them
        for name in ("question", "image"):
            if not isinstance(r.get(name), str) or not r[name].strip():
                raise ValueError(f"{config.data_dir}/vqa/{split}: record {r.get('id')}: field '{name}' is empty; "
                                 f"every question needs an answer in the results file")
    if not records:
        raise ValueError(f"{config.data_dir}/vqa/{split}: no questions")
    results_path = out_dir / "results.json"
    # The questions the results file must answer, checked before hours of answering: a question
    # the converter rejected (its image missing, say) is named now.
    question_ids, checked_against = submission_questions(config, records, questions_file, len(records) < total)
    try:
        check_results(submission(records, [""] * len(records)), question_ids, str(results_path), checked_against)
    except ValueError as exc:
        raise ValueError(f"{config.data_dir}/vqa/{split} cannot give a complete results file (questions the "
                         f"converter rejected are in {config.data_dir}/rejects.jsonl): {exc}") from None

    torch.manual_seed(config.seed)  # sampling decodes are reproducible
    model, processor = load_model(model_dir)
    images = image_source(config.data.feature_cache, config.data_dir, processor, model, True, str(model_dir))
    started = time.perf_counter()
    predictions = answer_questions(
        model, processor, records, images, config.data.prompt_template, config.eval.decoding,
        config.eval.batch_size, config.data.max_length, progress=True,
    )
    seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    results = submission(records, predictions)
    check_results(results, question_ids, str(results_path), checked_against)
    write_json(results_path, results)
    # Scored: the questions that have their ten answers (all of them, or none in test-dev / test).
    scored = [(r, p) for r, p in zip(records, predictions) if check_vqa_record(r) is None]
    report = _scored(*zip(*scored), "question_type") if scored else None
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for r, p in zip(records, predictions):
            f.write(json.dumps({
                "question_id": r["id"], "question": r["question"], "prediction": p, "answers": r["answers"],
                "answer_type": r.get("answer_type"), "question_type": r.get("question_type"),
                "question_family": r.get("question_family"),
                "accuracy": report.per_question.get(r["id"]) if report else None,
            }) + "\n")
    tmp.replace(out_dir / "predictions.jsonl")
    where = {"results": str(results_path), "results_checked_against": checked_against}
    if report is None:
        # Nothing to score: no metrics.json (one left from another split would be read as this one's).
        (out_dir / "metrics.json").unlink(missing_ok=True)
        return {"model": str(model_dir), "split": split, "count": len(records), "scored": 0, **where,
                "seconds": round(seconds, 2)}
    by_family = _scored(*zip(*scored), "question_family").by_question_type
    metrics = {
        "model": str(model_dir),
        "split": split,
        **where,
        "count": report.count,
        "scored": report.count,
        "vqa_accuracy": report.overall,
        "by_answer_type": report.by_answer_type,
        "by_question_type": report.by_question_type,
        "by_question_family": by_family,
        "seconds": round(seconds, 2),
        "samples_per_second": round(len(records) / seconds, 1),
        "baselines": {"majority_answer": majority_answer_baseline(config, [r for r, _ in scored])},
        "train_check": memorisation_check(config, model, processor, images),
        "tower_probe": tower_probe(config, model),
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def read_predictions(eval_dir: Path) -> dict[str, dict]:
    """An evaluation's predictions.jsonl by question id."""
    path = Path(eval_dir) / "predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions (run `vqa-rlhf eval` for it)")
    return {str(row["question_id"]): row for row in map(json.loads, filter(str.strip, path.read_text().splitlines()))}


def paired_bootstrap_ci(differences: list[float], seed: int = 0, resamples: int = 2000) -> list[float]:
    """95% CI of the mean of per-question differences (percentile bootstrap over questions)."""
    import numpy as np

    values = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # in a loop: 2,400 questions x 2,000 resamples at once is 38 MB of indices
        means[i] = values[rng.integers(0, len(values), len(values))].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return [round(float(low), 2), round(float(high), 2)]


def error_removed(before: float, after: float) -> float:
    """The share (%) of the start's error (100 - accuracy) that the change removed; negative: added."""
    return round(100.0 * (after - before) / (100.0 - before), 2) if before < 100 else 0.0


def compare_evaluations(before_dir: Path, after_dir: Path, seed: int = 0) -> dict:
    """Two evaluations of the same questions compared question by question (official metric, points):
    the change with its paired bootstrap 95% CI, the share of the error removed, how many questions
    got better / worse, and the same per question family (or question type where there is none)."""
    before, after = read_predictions(before_dir), read_predictions(after_dir)
    if before.keys() != after.keys():
        raise ValueError(f"{before_dir} and {after_dir} answer different questions "
                         f"({len(before.keys() - after.keys())} only in the first, "
                         f"{len(after.keys() - before.keys())} only in the second)")
    ids = sorted(before)
    diffs = [100.0 * (after[q]["accuracy"] - before[q]["accuracy"]) for q in ids]
    groups: dict[str, list[str]] = {}
    for q in ids:
        groups.setdefault(before[q].get("question_family") or before[q].get("question_type") or "all", []).append(q)
    mean = lambda qs, rows: 100.0 * sum(rows[q]["accuracy"] for q in qs) / len(qs)
    by_family = {}
    for name, qs in sorted(groups.items()):
        b, a = mean(qs, before), mean(qs, after)
        by_family[name] = {"before": round(b, 2), "after": round(a, 2), "error_removed": error_removed(b, a),
                           "better": sum(after[q]["accuracy"] > before[q]["accuracy"] for q in qs),
                           "worse": sum(after[q]["accuracy"] < before[q]["accuracy"] for q in qs), "count": len(qs)}
    b, a = mean(ids, before), mean(ids, after)
    return {"change": round(a - b, 2), "ci95": paired_bootstrap_ci(diffs, seed), "error_removed": error_removed(b, a),
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs), "by_family": by_family}


def main(argv=None) -> int:
    parser = stage_parser("eval", __doc__)
    add_model_option(parser)
    parser.add_argument("--tag", default=None, help="name of the output folder under <run>/eval (default: sft)")
    parser.add_argument("--questions", type=Path, default=None,
                        help="official questions file results.json must answer exactly (default: the file the "
                             "split was converted from, per the dataset's meta.json)")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    model_dir = model_dir_from(args, config)
    tag = args.tag or (Path(args.model).name if args.model else "sft")
    try:
        metrics = evaluate(config, model_dir, tag, args.questions)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # each names its file, record and field
        sys.exit(f"error: {exc}")
    print(f"eval[{tag}] {metrics['split']}: results file for the VQA challenge server: {metrics['results']} "
          f"({metrics['count']} answers, one per question of {metrics['results_checked_against']})")
    if not metrics["scored"]:
        print(f"eval[{tag}] {metrics['split']}: no answers in this split to score against; submit the results "
              f"file (VQA v2 test-dev / test: https://eval.ai/web/challenges/challenge-page/830)")
        return 0
    print(f"eval[{tag}] {metrics['split']}: VQA accuracy {metrics['vqa_accuracy']:.2f} over {metrics['count']} "
          f"questions (majority-answer baseline {metrics['baselines']['majority_answer']['vqa_accuracy']:.2f})")
    for answer_type, accuracy in sorted(metrics["by_answer_type"].items()):
        print(f"  {answer_type:>8}: {accuracy:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
