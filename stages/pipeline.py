"""The staged run behind ./launch.sh: each stage as its own process, then the report.

    ./launch.sh                                   # configs/default.yaml, every stage
    ./launch.sh CONFIG [--stages sft,eval] [--smoke] [--force] [key=value ...]

Stages run in order as separate processes (a crash stays in its stage; training
stages start under torchrun or the DeepSpeed launcher when the config's
`launcher` says so). A stage that finished with the same config is skipped, so
re-running after a kill continues where it stopped (training resumes from its
last checkpoint). The run ends with report.json, report.md and report.png in
<run dir> and a table of per-stage metrics.
"""
from __future__ import annotations

import argparse
import os
import sys

from vlm.config import STAGES, ConfigError, load_config
from vlm.pipeline import run
from vlm.stage_cli import DEFAULT_CONFIG, config_path_and_overrides
from rewards.registry import check_reward_config

# --smoke: a few steps on a small slice, to validate a config end to end in minutes.
SMOKE_OVERRIDES = [
    "vision.steps=4", "vision.save_steps=2", "vision.probe_images=16",
    "sft.steps=4", "sft.save_steps=2", "sft.eval_steps=2", "sft.eval_samples=16", "sft.logging_steps=1",
    "sft.batch_size=4", "sft.warmup_steps=0", "data.max_train_samples=64", "eval.max_samples=32",
    "eval.batch_size=16", "eval.caption_max_images=16", "sample.max_questions=16", "sample.k=2", "sample.batch_size=8",
    "instruct.steps=4", "instruct.save_steps=2", "instruct.logging_steps=1", "instruct.batch_size=4",
    "instruct.warmup_steps=0", "instruct.max_train_samples=32", "instruct.describe_samples=8",
    "rm.steps=4", "rm.batch_size=4", "rm.save_steps=2", "rm.logging_steps=1", "rm.warmup_steps=0",
    "ppo.steps=2", "ppo.batch_size=4", "ppo.mini_batches=2", "ppo.save_steps=1", "ppo.eval_steps=2",
    "ppo.eval_samples=8", "ppo.max_prompts=32", "rm.candidate_questions=16", "rm.best_of_n_questions=16",
    "rm.min_labels_per_class=0",  # a 4-step SFT model answers everything wrong: one class of labels
]
SMOKE_SYNTHETIC = {"train_images": 40, "val_images": 8, "test_images": 8, "rl_images": 8}
SMOKE_ANSWER_IMAGES = 16  # of the 40 (when the config gives written answers to some images only)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vqa-rlhf run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: the config's)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of each stage on a small slice, into <run>-smoke")
    parser.add_argument("--force", action="store_true", help="rerun stages that finished earlier")
    args = parser.parse_intermixed_args(argv)
    config_path, overrides = config_path_and_overrides(args)
    try:
        config = load_config(config_path, overrides)
        if args.smoke:
            smoke = [*SMOKE_OVERRIDES, f"name={config.name}-smoke"]
            if config.data.source == "synthetic":
                smoke += [f"data.synthetic.{k}={v}" for k, v in SMOKE_SYNTHETIC.items()]
                if config.data.answer_images:
                    smoke.append(f"data.answer_images={SMOKE_ANSWER_IMAGES}")
                if not config.data.dir:
                    smoke.append(f"data.dir={config.run_dir.with_name(config.name + '-smoke') / 'data'}")
            overrides = [*overrides, *smoke]
            config = load_config(config_path, overrides)
        check_reward_config(config.ppo)  # before the first stage, not when ppo starts an hour later
        stages = args.stages.split(",") if args.stages else list(config.stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(config, config_path, stages, overrides, args.force)


if __name__ == "__main__":
    sys.exit(main())
