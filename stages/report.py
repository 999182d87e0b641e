"""The run report: report.json, report.md and report.png from a run dir's stage outputs.

    vqa-rlhf report runs/default
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.report import build_report, print_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory, e.g. runs/default")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        sys.exit(f"error: no run directory {args.run_dir}")
    print_table(build_report(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
