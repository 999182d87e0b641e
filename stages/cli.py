"""`vqa-rlhf`: one command, a subcommand per job. `vqa-rlhf SUBCOMMAND --help` for each."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line summary)
COMMANDS = {
    "run": ("stages.pipeline", "run a config's stages end to end (what ./launch.sh does)"),
    "prep": ("stages.prep", "write the dataset a config trains on (built-in synthetic or converted)"),
    "synthetic": ("data_prep.synthetic", "generate the built-in synthetic VQA dataset into a directory"),
    "vision": ("stages.vision", "vision pretraining: the built-in run's own CLIP tower (region-text), before SFT"),
    "sft": ("stages.sft", "stage 1: answer-only supervised fine-tuning on VQA"),
    "eval": ("stages.evaluate", "answer a split and score it with the official VQA metric"),
    "score": ("vlm.vqa_metric", "score predictions with the official VQA accuracy metric"),
    "report": ("stages.report", "rebuild a run's report.json / report.md / report.png"),
    "bench": ("bench.sft_throughput", "SFT throughput and model FLOP utilisation benchmark"),
    "instruct": ("stages.instruct", "stage 3: LLaVA instruction tuning on conversations, loss on assistant turns"),
    "ask": ("stages.ask", "answer one question about an image with a trained model (streamed)"),
    "chat": ("stages.chat", "interactive multi-turn chat about an image in the terminal (streamed)"),
    "bench-convert": ("bench.convert_vqav2", "VQA v2-sized conversion benchmark: seconds, records/s, peak memory"),
    "sample": ("stages.sample", "K sampled + the greedy answer per question into the label store, for labeling"),
    "label": ("rewards.label_app", "the labeling web app and its JSON API (127.0.0.1; --token when exposed)"),
    "autolabel": ("stages.autolabel", "label samples with ground truth by official VQA accuracy, as labeler auto"),
    "export-labels": ("rewards.export_labels", "export final labels as a datasets dir + JSONL, with labeler stats"),
    "import-labels": ("rewards.import_labels", "import a JSONL of labels made elsewhere into the label store"),
    "bench-labels": ("bench.labeling", "labeling app benchmark: label submissions/s, next-item latency"),
    "caption": ("stages.caption", "caption images with a trained model (the caption prompt it was trained with)"),
    "caption-eval": ("stages.caption_eval", "caption a split's images: BLEU-1..4, CIDEr-D (pure Python), perplexity"),
    "retrieval-eval": ("stages.retrieval_eval", "CLIP-GPT caption -> image retrieval: recall@1/5/10 (model.clip_head)"),
    "compare": ("stages.compare", "runs' reports side by side: VQA accuracy, caption CIDEr-D, time, throughput"),
    "bench-cache": ("bench.feature_cache", "SFT step time with the CLIP feature cache vs features on the fly"),
    "rm": ("stages.rm", "train the multimodal reward model on exported labels, with baselines"),
    "ppo": ("stages.ppo", "PPO of the SFT policy against the reward model, images in every forward (trl 1.12)"),
    "bench-seeds": ("bench.seeds", "vision + SFT + eval for several seeds: test accuracy per family, mean +- sd"),
    "bench-ppo": ("bench.ppo_throughput", "PPO rollout and update throughput (samples/s) of default and GPT-2 124M sized models"),
    "bench-chaos": ("bench.chaos", "SIGKILL a staged run at random moments, resume it, compare with an uninterrupted run"),
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
    if name == "bench" and rest and f"bench-{rest[0]}" in COMMANDS:  # `vqa-rlhf bench chaos` = `bench-chaos`
        name, rest = f"bench-{rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"vqa-rlhf: unknown subcommand '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
