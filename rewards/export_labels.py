"""Export the labels for reward-model training.

    vqa-rlhf label export --db FILE --out DIR

DIR is a datasets.Dataset (save_to_disk: `datasets.load_from_disk(DIR)`), plus
DIR/labels.jsonl (the same rows) and DIR/meta.json ({"image_root", "db", "counts",
"exported_at"}). One row per sample with a final label correct|incorrect:
sample_id, question_id, image (relative to image_root), question, answer, label,
labeler, label_source (human|auto), gt_answers ([] when unknown).

The final label: each labeler's latest label counts (re-labels and undos are
history); people's correct/incorrect labels decide by majority (labeler = the
agreeing people, comma-joined; a tie is not exported, only counted); a sample no
person judged correct or incorrect takes the `auto` label if it has one.
Unsure and unlabeled samples are counted, not exported. Also prints the stats
(per-labeler counts, Cohen's kappa between labelers) and writes them to DIR/stats.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewards.label_store import LabelStore, StoreError


def print_stats(stats: dict) -> None:
    print(f"{stats['samples']} samples, {stats['labels_written']} labels written (history included)")
    for name, counts in stats["per_labeler"].items():
        print(f"  {name:<16} {counts['total']:>6} labels: {counts['correct']} correct, "
              f"{counts['incorrect']} incorrect, {counts['unsure']} unsure")
    for pair in stats["inter_labeler_agreement"]:
        print(f"  {' vs '.join(pair['labelers'])}: {pair['items']} items in common, agreement "
              f"{pair['agreement']:.1%}, Cohen's kappa {pair['kappa']}")
    auto = stats["auto_vs_human"]
    if auto["items"]:
        print(f"  auto vs people: {auto['items']} items, agreement {auto['agreement']:.1%}, kappa {auto['kappa']}")
    print("  final labels: " + ", ".join(f"{k} {v}" for k, v in stats["final"].items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf label export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="label store")
    parser.add_argument("--out", required=True, help="output dir (replaced as a whole)")
    args = parser.parse_args(argv)
    try:
        with LabelStore(args.db) as store:
            meta = store.export(args.out)
            stats = store.stats()
    except (FileNotFoundError, StoreError) as exc:
        sys.exit(f"error: {exc}")
    (Path(args.out) / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print_stats(stats)
    counts = meta["counts"]
    print(f"exported {counts['exported']} labeled samples ({counts['correct']} correct, {counts['incorrect']} "
          f"incorrect; {counts['human']} by people, {counts['auto']} auto) to {args.out}; not exported: "
          f"{counts['unsure']} unsure, {counts['tie']} ties, {counts['unlabeled']} unlabeled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
