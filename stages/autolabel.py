"""Auto-labels from ground truth: samples whose answer scores at least --min-accuracy with the
official VQA metric are `correct`, the others `incorrect`, as labeler `auto`.

    vqa-rlhf autolabel configs/default.yaml [key=value ...]     (the pipeline stage: autolabel.min_accuracy)
    vqa-rlhf autolabel --db FILE --min-accuracy 0.6

Samples without ground truth are left alone. Human labels win over auto labels
in the export. Only changes are written, so a re-run adds nothing. Prints (and
writes to <db dir>/autolabel.json) the agreement between auto and human labels
on the samples people labeled.
"""
from __future__ import annotations

import dataclasses
import sys

from vlm.stage_cli import config_from_args, run_stage, stage_parser, write_json
from rewards.label_store import LabelStore, StoreError


def main(argv=None) -> int:
    parser = stage_parser("autolabel", __doc__)
    parser.add_argument("--db", help="label store (default: the config's sample.db, <run>/labels/labels.db)")
    parser.add_argument("--min-accuracy", dest="min_accuracy", type=float,
                        help="official VQA accuracy (0-1) from which an answer counts as correct (default 0.6)")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    if args.db:
        config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, db=args.db))
    min_accuracy = config.autolabel.min_accuracy if args.min_accuracy is None else args.min_accuracy
    try:
        with LabelStore(config.labels_db) as store:
            counts = store.autolabel(min_accuracy, config.autolabel.error_rate, config.seed)
            agreement = store.stats()["auto_vs_human"]
    except (FileNotFoundError, StoreError) as exc:
        sys.exit(f"error: {exc}")
    report = {"db": str(config.labels_db), "min_accuracy": min_accuracy, "error_rate": config.autolabel.error_rate,
              **counts, "auto_vs_human": agreement}
    write_json(config.labels_db.parent / "autolabel.json", report)
    print(f"autolabel: {counts['correct']} correct, {counts['incorrect']} incorrect "
          f"({counts['written']} written, {counts['unchanged']} unchanged, {counts['flipped']} flipped by "
          f"autolabel.error_rate={config.autolabel.error_rate}), "
          f"{counts['no_ground_truth']} without ground truth")
    if agreement["items"]:
        print(f"  agreement with people on {agreement['items']} samples: {agreement['agreement']:.1%}, "
              f"Cohen's kappa {agreement['kappa']}")
    else:
        print("  no sample has both an auto and a human label yet: agreement not measured")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
