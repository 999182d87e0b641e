"""Runs side by side: VQA accuracy, caption CIDEr-D, SFT time and throughput, from each
run's report.json (rebuilt first when the run has none), plus the model set-up of its
saved training_config.json.

    vqa-rlhf compare runs/default runs/gpt2-vision runs/visiongpt2 [--out runs/compare]

Prints a markdown table and writes <out>/compare.md, compare.json and compare.png
(bar charts of accuracy / CIDEr-D and of training samples/s).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.config import RunPaths
from vlm.report import build_report
from vlm.stage_cli import write_json

COLUMNS = [  # (key, header)
    ("run", "run"), ("projector", "projector"), ("vqa_accuracy", "VQA accuracy"),
    ("majority_baseline", "majority baseline"), ("cider", "caption CIDEr-D"), ("bleu_4", "BLEU-4"),
    ("caption_perplexity", "caption perplexity"), ("sft_steps", "SFT steps"), ("sft_seconds", "SFT seconds"),
    ("train_samples_per_second", "train samples/s"),
]


def run_row(run_dir: Path) -> dict:
    report_path = RunPaths(run_dir).report_json
    report = json.loads(report_path.read_text()) if report_path.is_file() else build_report(run_dir)
    sft = report.get("stages", {}).get("sft", {})
    captions = report.get("stages", {}).get("caption_eval", {})
    row = {"run": run_dir.name, "vqa_accuracy": sft.get("vqa_accuracy"),
           "majority_baseline": report.get("baselines", {}).get("majority_answer"),
           "cider": captions.get("cider"), "bleu_4": captions.get("bleu_4"),
           "caption_perplexity": captions.get("perplexity"),
           "sft_steps": sft.get("steps"), "sft_seconds": sft.get("seconds")}
    # batch size and projector: from the resolved config saved with the final model
    config_path = Path(sft["checkpoint"]) / "training_config.json" if sft.get("checkpoint") else None
    if config_path is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        row["projector"] = config.get("model", {}).get("projector", "llava")
        train = config.get("sft", {})
        if sft.get("seconds") and sft.get("steps"):
            samples = sft["steps"] * train.get("batch_size", 0) * train.get("grad_accum", 1)
            row["train_samples_per_second"] = round(samples / sft["seconds"], 1)
    return row


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def render_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(header for _, header in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["run"] for row in rows]
    panels = [("vqa_accuracy", "VQA accuracy (%)"), ("cider", "caption CIDEr-D"),
              ("train_samples_per_second", "SFT samples/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        values = [row.get(key) or 0.0 for row in rows]
        bars = ax.bar(range(len(rows)), values, color="tab:blue")
        for bar, row in zip(bars, rows):
            ax.annotate(_cell(row.get(key)), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/default")
    parser.add_argument("--out", default="runs/compare", help="where compare.md/.json/.png go (default runs/compare)")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        sys.exit(f"error: no run directory {', '.join(missing)}")
    rows = [run_row(Path(d)) for d in args.run_dirs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(rows)
    tmp = out / "compare.md.tmp"
    tmp.write_text(markdown)
    tmp.replace(out / "compare.md")
    write_json(out / "compare.json", rows)
    plot(rows, out / "compare.png")
    print(markdown, end="")
    print(f"written: {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
