"""`vqa-rlhf`: one command, a subcommand per job. `vqa-rlhf SUBCOMMAND --help` for each."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line summary)
COMMANDS = {
    "run": ("stages.pipeline", "run a config's stages end to end (what ./launch.sh does)"),
    "prep": ("stages.prep", "write the dataset a config trains on (built-in synthetic or converted)"),
    "synthetic": ("data_prep.synthetic", "generate the built-in synthetic VQA dataset into a directory"),
    "sft": ("stages.sft", "stage 1: answer-only supervised fine-tuning on VQA"),
    "eval": ("stages.evaluate", "answer a split and score it with the official VQA metric"),
    "score": ("vlm.vqa_metric", "score predictions with the official VQA accuracy metric"),
    "report": ("stages.report", "rebuild a run's report.json / report.md / report.png"),
    "bench": ("bench.sft_throughput", "SFT throughput and model FLOP utilisation benchmark"),
}


def usage() -> str:
    lines = ["usage: vqa-rlhf SUBCOMMAND [args]   (vqa-rlhf SUBCOMMAND --help)", "", "subcommands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vqa-rlhf: unknown subcommand '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
