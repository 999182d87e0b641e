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
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vlm.config import STAGES, ConfigError, RunConfig, load_config, to_dict
from vlm.data import split_exists, training_tasks
from stages.common import DEFAULT_CONFIG, config_path_and_overrides, write_json
from stages.report import build_report, print_table


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
    "ppo.eval_samples=8", "ppo.max_prompts=32",
]
SMOKE_SYNTHETIC = {"train_images": 40, "val_images": 8, "test_images": 8, "rl_images": 8}


def stage_command(config: RunConfig, stage: str, config_path: str, overrides: list[str]) -> list[str]:
    module = STAGES[stage].module
    args = [config_path, *overrides]
    if not STAGES[stage].distributed or config.launcher == "none":
        return [sys.executable, "-m", module, *args]
    if config.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={config.nproc_per_node}",
                "-m", module, *args]
    command = ["deepspeed"]
    if config.hostfile:
        command += ["--hostfile", config.hostfile]
    else:
        command += ["--num_gpus", str(config.nproc_per_node)]
    return command + ["--module", module, *args]


def config_fingerprint(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def set_aside_other_configs_state(stage_dir: Path, fingerprint: str, force: bool) -> None:
    """A stage resumes from its checkpoints only when they were made with the same config.

    A stage records the config it starts with. Started again with another config (or with
    --force), its checkpoints (and SFT's saved processor) belong to that other config: they
    are moved aside to `<name>-<their config>` (never deleted), so the stage starts fresh
    instead of resuming a run of different settings."""
    started = stage_dir / "started.json"
    previous = json.loads(started.read_text()).get("config") if started.is_file() else None
    if force or previous != fingerprint:
        for name in ("checkpoints", "processor"):
            state = stage_dir / name
            if state.exists():
                aside = stage_dir / f"{name}-{previous or 'unknown-config'}"
                suffix = 1
                while aside.exists():
                    aside, suffix = stage_dir / f"{name}-{previous or 'unknown-config'}-{suffix}", suffix + 1
                state.rename(aside)
                print(f"== {stage_dir.name}: {state} is from another config; moved to {aside}, starting fresh",
                      flush=True)
    write_json(started, {"config": fingerprint})


def why_skip(config: RunConfig, stage: str) -> str | None:
    """Why a stage cannot apply to this run's data, or None. Decided when the stage is due
    (after prep wrote the dataset); a dataset that cannot be read is left to the stage to report."""
    if STAGES[stage].needs == "vqa":
        try:
            tasks = training_tasks(config.data, config.data_dir)
        except (OSError, ValueError):
            return None
        if "vqa" not in tasks:
            return (f"it needs VQA, and SFT trains on {' + '.join(sorted(tasks))} only "
                    f"(data.supervision={config.data.supervision}, dataset {config.data_dir})")
    if STAGES[stage].needs == "captions" and not split_exists(config.data_dir, "captions", config.eval.split):
        return f"it scores captions, and {config.data_dir} has no captions/{config.eval.split} split"
    return None


def labeling_instructions(config: RunConfig, config_path: str, overrides: list[str], later: list[str]) -> str:
    """What to do after `sample` when labels come from people (no autolabel stage)."""
    db = config.labels_db
    return (f"\n== candidate answers are in {db}; the run stops here for people to label them:\n"
            f"     vqa-rlhf label --db {db}        # then open http://127.0.0.1:8765 (--help: token, port)\n"
            f"   or bootstrap from ground truth: vqa-rlhf autolabel --db {db} --min-accuracy 0.6\n"
            f"   then continue: ./launch.sh {' '.join([config_path, *overrides])} --stages {','.join(later)}")


def run(config: RunConfig, config_path: str, stages: list[str], overrides: list[str], force: bool) -> int:
    """`config` is `config_path` with `overrides` applied; the stage processes get the path and overrides."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(config)
    for stage in stages:
        marker = run_dir / stage / "done.json"
        if not force and marker.is_file() and json.loads(marker.read_text()).get("config") == fingerprint:
            print(f"== {stage}: done earlier with this config, skipping (--force to rerun)", flush=True)
            continue
        reason = why_skip(config, stage)
        if reason:
            print(f"== {stage}: skipped: {reason}", flush=True)
            continue
        set_aside_other_configs_state(run_dir / stage, fingerprint, force)
        command = stage_command(config, stage, config_path, overrides)
        print(f"== {stage}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        returncode = subprocess.call(command)
        if returncode != 0:
            print(f"== {stage} failed (exit {returncode}); fix and re-run: finished stages are kept, "
                  f"training resumes from its last checkpoint", file=sys.stderr)
            return returncode
        write_json(marker, {"config": fingerprint, "seconds": round(time.perf_counter() - started, 1)})
        later = stages[stages.index(stage) + 1:]
        if stage == "sample" and "autolabel" not in stages and later:
            print(labeling_instructions(config, config_path, overrides, later), flush=True)
            return 0  # people label now; the run continues with --stages
    report = build_report(run_dir)
    print_table(report)
    print(f"report: {run_dir / 'report.md'}")
    return 0


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
                if not config.data.dir:
                    smoke.append(f"data.dir={config.run_dir.with_name(config.name + '-smoke') / 'data'}")
            overrides = [*overrides, *smoke]
            config = load_config(config_path, overrides)
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
