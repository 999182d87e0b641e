"""Import labels made elsewhere into the label store.

    vqa-rlhf label import --db FILE --labels FILE.jsonl [--on-bad-record skip|error]

One JSON object per line: {"sample_id": int, "label": "correct"|"incorrect"|"unsure",
"labeler": str, "time": unix seconds or ISO 8601 (optional, default now)}. The
labeler `auto` is allowed here (auto-labels made elsewhere). A bad line (not
JSON, unknown sample, bad label, unknown field) is skipped and written with its
line number and reason to FILE.jsonl.rejects.jsonl, or stops the import with
--on-bad-record error (nothing is imported then). A line equal to a stored label
(same sample, labeler, label and time) is not added again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rewards.label_store import LabelStore, StoreError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf label import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="label store")
    parser.add_argument("--labels", required=True, help="JSONL file of labels")
    parser.add_argument("--on-bad-record", choices=("skip", "error"), default="skip",
                        help="skip bad lines (counted, written to the rejects file) or stop (default skip)")
    args = parser.parse_args(argv)
    from vlm.data import RejectLog  # imports torch: not before --help (0.1 s instead of 4 s)
    labels = Path(args.labels)
    if not labels.is_file():
        sys.exit(f"error: labels file not found: {labels}")
    rejects_path = labels.with_name(labels.name + ".rejects.jsonl")
    try:
        with LabelStore(args.db) as store:
            result = store.import_labels(labels, RejectLog(rejects_path, args.on_bad_record))
    except (FileNotFoundError, StoreError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"imported {result['imported']} labels into {args.db} ({result['already_present']} already present, "
          f"{result['rejected']} rejected" + (f": see {rejects_path})" if result["rejected"] else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
