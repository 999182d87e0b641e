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

import os
import sys
from pathlib import Path

import torch

from vlm.evaluation import evaluate
from vlm.stage_cli import add_model_option, config_from_args, model_dir_from, run_stage, stage_parser


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the ranks answer disjoint shards; gloo is enough for the one barrier
        # before rank 0 gathers their answers, on GPUs as on CPUs.
        torch.distributed.init_process_group("gloo")
    try:
        metrics = evaluate(config, model_dir, tag, args.questions, sharded=True)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # each names its file, record and field
        sys.exit(f"error: {exc}")
    if metrics is None:  # a rank other than 0: its shard is in rank 0's results
        return 0
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
