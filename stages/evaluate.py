"""Evaluation: answer a split's questions and score them with the official VQA metric.

    vqa-rlhf eval configs/default.yaml [--model DIR] [--tag NAME] [key=value ...]

Writes <run>/eval/<tag>/: results.json (official results format,
[{"question_id", "answer"}]), predictions.jsonl (prediction + ground truth, the
input of `vqa-rlhf score`) and metrics.json (overall, per answer type, per
question type and family, plus the majority-answer baseline on the same split).
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
from vlm.vqa_metric import score_records
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


def evaluate(config: RunConfig, model_dir: Path, tag: str) -> dict:
    out_dir = config.run_dir / "eval" / tag
    split = config.eval.split
    records = load_split(config.data_dir, "vqa", split)
    if config.eval.max_samples:
        records = records.select(range(min(config.eval.max_samples, len(records))))
    records = [r for r in records if check_vqa_record(r) is None]
    if not records:
        raise ValueError(f"{config.data_dir}/vqa/{split}: no scorable records")

    torch.manual_seed(config.seed)  # sampling decodes are reproducible
    model, processor = load_model(model_dir)
    images = image_source(config.data.feature_cache, config.data_dir, processor, model, True, str(model_dir))
    started = time.perf_counter()
    predictions = answer_questions(
        model, processor, records, images, config.data.prompt_template, config.eval.decoding,
        config.eval.batch_size, config.data.max_length, progress=True,
    )
    seconds = time.perf_counter() - started

    report = _scored(records, predictions, "question_type")
    by_family = _scored(records, predictions, "question_family").by_question_type
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", [{"question_id": r["id"], "answer": p} for r, p in zip(records, predictions)])
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for r, p in zip(records, predictions):
            f.write(json.dumps({
                "question_id": r["id"], "question": r["question"], "prediction": p, "answers": r["answers"],
                "answer_type": r.get("answer_type"), "question_type": r.get("question_type"),
                "accuracy": report.per_question[r["id"]],
            }) + "\n")
    tmp.replace(out_dir / "predictions.jsonl")
    metrics = {
        "model": str(model_dir),
        "split": split,
        "count": report.count,
        "vqa_accuracy": report.overall,
        "by_answer_type": report.by_answer_type,
        "by_question_type": report.by_question_type,
        "by_question_family": by_family,
        "seconds": round(seconds, 2),
        "samples_per_second": round(len(records) / seconds, 1),
        "baselines": {"majority_answer": majority_answer_baseline(config, records)},
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def main(argv=None) -> int:
    parser = stage_parser("eval", __doc__)
    add_model_option(parser)
    parser.add_argument("--tag", default=None, help="name of the output folder under <run>/eval (default: sft)")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    model_dir = model_dir_from(args, config)
    tag = args.tag or (Path(args.model).name if args.model else "sft")
    metrics = evaluate(config, model_dir, tag)
    print(f"eval[{tag}] {metrics['split']}: VQA accuracy {metrics['vqa_accuracy']:.2f} over {metrics['count']} "
          f"questions (majority-answer baseline {metrics['baselines']['majority_answer']['vqa_accuracy']:.2f})")
    for answer_type, accuracy in sorted(metrics["by_answer_type"].items()):
        print(f"  {answer_type:>8}: {accuracy:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
