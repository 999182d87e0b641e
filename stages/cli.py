"""`vqa-rlhf`: one command, grouped subcommands. `vqa-rlhf SUBCOMMAND --help` for each.

The dispatcher sits above the stages: it names each subcommand's module and imports that
module only when the subcommand runs (by name, importlib), so `vqa-rlhf --help` starts in
a blink while a stage's own `--help` pays for torch. The pipeline's stages come from
vlm.config.STAGES: a new stage is a subcommand without an edit here.
"""
from __future__ import annotations

import importlib
import sys

from vlm.config import STAGES

# subcommand -> (module with main(argv), one-line summary), besides the stages
RUNS_AND_MODELS = {
    "run": ("stages.pipeline", "run a config's stages end to end (what ./launch.sh does)"),
    "report": ("stages.report", "rebuild a run's report.json / report.md / report.png"),
    "docs": ("stages.docs", "regenerate the figures of README.md and docs/ from stored reports (--check: CI)"),
    "compare": ("stages.compare", "runs' reports side by side: VQA accuracy, caption CIDEr-D, time, throughput"),
    "score": ("vlm.vqa_metric", "score predictions with the official VQA accuracy metric"),
    "ask": ("stages.ask", "answer one question about an image with a trained model (streamed)"),
    "chat": ("stages.chat", "interactive multi-turn chat about an image in the terminal (streamed)"),
    "caption": ("stages.caption", "caption images with a trained model (the caption prompt it was trained with)"),
    "synthetic": ("data_prep.synthetic", "generate the built-in synthetic VQA dataset into a directory"),
}


def command_groups() -> dict[str, dict[str, tuple[str, str]]]:
    """Title -> {subcommand: (module, summary)}: the stages first, read from STAGES when asked."""
    stages = {name.replace("_", "-"): (stage.module, stage.summary) for name, stage in STAGES.items()}
    return {"stages (the pipeline's order; `run` runs them all)": stages, "runs and models": RUNS_AND_MODELS}


# Commands with subcommands of their own: `vqa-rlhf label export ...`, `vqa-rlhf bench ppo ...`.
# The first subcommand is the default: `vqa-rlhf label --db X` serves the labeling app.
SUBGROUPS = {
    "label": ("the labeling app and label files", {
        "serve": ("rewards.label_app", "the labeling web app and its JSON API (127.0.0.1; --token when exposed)"),
        "export": ("rewards.export_labels", "export final labels as a datasets dir + JSONL, with labeler stats"),
        "import": ("rewards.import_labels", "import a JSONL of labels made elsewhere into the label store"),
    }),
    "bench": ("benchmarks that print figures", {
        "sft": ("bench.sft_throughput", "SFT throughput and model FLOP utilisation"),
        "ppo": ("bench.ppo_throughput", "PPO rollout and update throughput (samples/s)"),
        "cache": ("bench.feature_cache", "SFT step time with the CLIP feature cache vs features on the fly"),
        "convert": ("bench.convert_vqav2", "VQA v2-sized conversion: seconds, records/s, peak memory"),
        "labels": ("bench.labeling", "labeling app: label submissions/s, next-item latency"),
        "seeds": ("bench.seeds", "vision + SFT + eval for several seeds: test accuracy per family, mean +- sd"),
        "rlhf": ("bench.rlhf", "ways to learn from judgments side by side on one run's labels: PPO, GRPO, DPO, RFT, controls"),
        "chaos": ("bench.chaos", "SIGKILL a staged run at random moments, resume it, compare with an uninterrupted run"),
        "gpu": ("bench.gpu", "every stage's hot path on one GPU, real sizes: bf16 SFT MFU, ZeRO-2/3, PPO, GRPO, eval"),
    }),
}

# Earlier spellings, still accepted, not listed.
ALIASES = {
    "export-labels": ["label", "export"], "import-labels": ["label", "import"],
    **{f"bench-{name}": ["bench", name] for name in SUBGROUPS["bench"][1]},
}


def usage() -> str:
    lines = ["usage: vqa-rlhf SUBCOMMAND [args]   (vqa-rlhf SUBCOMMAND --help)"]
    for title, commands in command_groups().items():
        lines += ["", f"{title}:"] + [f"  {name:<15} {summary}" for name, (_, summary) in commands.items()]
    for group, (title, commands) in SUBGROUPS.items():
        lines += ["", f"{title} (vqa-rlhf {group} SUBCOMMAND):"]
        lines += [f"  {group + ' ' + name:<15} {summary}" for name, (_, summary) in commands.items()]
    return "\n".join(lines)


def group_usage(group: str) -> str:
    title, commands = SUBGROUPS[group]
    default = next(iter(commands))
    lines = [f"usage: vqa-rlhf {group} SUBCOMMAND [args]   ({title}; `vqa-rlhf {group} [args]` is "
             f"`vqa-rlhf {group} {default} [args]`)", ""]
    return "\n".join(lines + [f"  {name:<10} {summary}" for name, (_, summary) in commands.items()])


def resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its argv) for a command line, or None when the subcommand is unknown."""
    if argv[0] in ALIASES:
        argv = [*ALIASES[argv[0]], *argv[1:]]
    name, rest = argv[0].replace("_", "-"), argv[1:]  # caption_eval as the config spells it
    for commands in command_groups().values():
        if name in commands:
            return commands[name][0], rest
    if name in SUBGROUPS:
        commands = SUBGROUPS[name][1]
        if rest and rest[0] in commands:
            return commands[rest[0]][0], rest[1:]
        return next(iter(commands.values()))[0], rest  # the group's first subcommand is its default
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in SUBGROUPS and argv[1:] in ([], ["-h"], ["--help"]):
        print(group_usage(argv[0]))
        return 0
    resolved = resolve(argv)
    if resolved is None:
        print(f"vqa-rlhf: unknown subcommand '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, rest = resolved
    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
