"""Regenerate the figures of README.md and docs/ from stored reports, and the pictures.

    vqa-rlhf docs                       rewrite every generated block (vlm/docs.py) from its stored source
    vqa-rlhf docs --check               exit 1 naming each block that differs from its source (CI runs it)
    vqa-rlhf docs --store runs/default  copy a finished run's report.json into docs/reports/<name>/
    vqa-rlhf docs --pictures runs/default
                                        docs/img/: the run's report.png and ppo.png, and a screenshot of
                                        the labeling page on the run's label store (Debian chromium)

After a new default run: `vqa-rlhf docs --store runs/default --pictures runs/default && vqa-rlhf docs`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def store_report(run_dir: Path) -> Path:
    out = REPO / "docs" / "reports" / run_dir.name / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "report.json", out)
    return out


def pictures(run_dir: Path) -> list[Path]:
    img = REPO / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    written = []
    for source, name in ((run_dir / "report.png", "report.png"), (run_dir / "ppo" / "ppo.png", "ppo.png")):
        if source.is_file():
            shutil.copyfile(source, img / name)
            written.append(img / name)
    store = run_dir / "labels" / "labels.db"
    if store.is_file():
        from rewards.label_browser import screenshot_labeling_page

        written.append(screenshot_labeling_page(store, img / "labeling.png"))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated block is stale")
    parser.add_argument("--store", metavar="RUN_DIR", help="copy RUN_DIR/report.json into docs/reports/<run name>/")
    parser.add_argument("--pictures", metavar="RUN_DIR", help="refresh docs/img/ from RUN_DIR")
    args = parser.parse_args(argv)
    from vlm.docs import regenerate

    if args.store:
        print(f"docs: stored {store_report(Path(args.store))}")
    if args.pictures:
        for path in pictures(Path(args.pictures)):
            print(f"docs: wrote {path}")
    stale = regenerate(REPO, check=args.check)
    if args.check:
        if stale:
            print("docs: generated blocks that differ from their stored source (run `vqa-rlhf docs`):\n  "
                  + "\n  ".join(stale), file=sys.stderr)
            return 1
        print("docs: every generated block matches its stored source")
    elif not args.store and not args.pictures:
        print(f"docs: {len(stale)} generated block(s) rewritten" + (": " + ", ".join(stale) if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
