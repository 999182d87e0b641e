"""The staged run: each stage of vlm.config.STAGES as its own process, then the report.

Stages run in order as separate processes (a crash stays in its stage; training stages
start under torchrun or the DeepSpeed launcher when the config's `launcher` says so). A
stage that finished with the same config is skipped, so re-running after a kill continues
where it stopped (training resumes from its last checkpoint). `./launch.sh` and
`vqa-rlhf run` (stages/pipeline.py) start it; bench/seeds.py runs it once per seed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from vlm.config import ROUND_STAGES, STAGES, RunConfig, to_dict
from vlm.data import split_exists, training_tasks
from vlm.files import write_json
from vlm.report import build_report, machine_provenance, print_table


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


# Read by stages before the eval stage too (SFT's held-out curve decodes with eval.decoding).
SHARED_SECTIONS = {"eval"}


def config_fingerprint(config: RunConfig, stage: str | None = None) -> str:
    """The settings a stage's result depends on: the config without the sections of the stages
    after it in pipeline order, so a changed `ppo.kl_coef` reruns ppo and the stages after it,
    never prep, vision or SFT. A section named after a stage is that stage's; the others (seed,
    model, data, eval, ...) are every stage's. No stage reads a later stage's section."""
    settings = to_dict(config)
    # Where the run computes is not what it computes: a run moved to a GPU machine (device=auto)
    # resumes its stages instead of starting them again.
    settings.pop("device")
    if stage is not None:
        order = list(STAGES)
        later = set(order[order.index(stage) + 1:]) - SHARED_SECTIONS
        if ROUND_STAGES[0] in later:  # the rounds' section is read from the first round stage on
            later.add("rlhf")
        settings = {key: value for key, value in settings.items() if key not in later}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
            f"   or bootstrap from ground truth: vqa-rlhf autolabel --db {db} --min-accuracy {config.autolabel.min_accuracy}\n"
            f"   then continue: ./launch.sh {' '.join([config_path, *overrides])} --stages {','.join(later)}")


def plan_rounds(config: RunConfig, stages: list[str], overrides: list[str]) -> list[tuple[str, RunConfig, list[str]]]:
    """(stage, its config, its overrides) in the order they run: the stages of an RLHF round
    (ROUND_STAGES) repeated for each of rlhf.rounds rounds, each with `rlhf.round=<r>`."""
    if config.rlhf.rounds == 1:
        return [(stage, config, overrides) for stage in stages]
    plan: list = []
    in_round = [stage for stage in stages if stage in ROUND_STAGES]
    for stage in stages:
        if stage not in ROUND_STAGES:
            plan.append((stage, config, overrides))
        elif stage == in_round[0]:  # the whole round, once per round, where its first stage stands
            for round in range(1, config.rlhf.rounds + 1):
                round_config = copy.deepcopy(config)
                round_config.rlhf.round = round
                plan += [(name, round_config, [*overrides, f"rlhf.round={round}"]) for name in in_round]
    return plan


def run(config: RunConfig, config_path: str, stages: list[str], overrides: list[str], force: bool) -> int:
    """`config` is `config_path` with `overrides` applied; the stage processes get the path and overrides."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "provenance.json", machine_provenance(to_dict(config)))  # the report's source line
    for stage, stage_config, stage_overrides in plan_rounds(config, stages, overrides):
        fingerprint = config_fingerprint(stage_config, stage)
        marker = stage_config.paths.done_marker(stage)
        name = (f"{stage} (round {stage_config.round} of {config.rlhf.rounds})"
                if config.rlhf.rounds > 1 and stage in ROUND_STAGES else stage)
        if not force and marker.is_file() and json.loads(marker.read_text()).get("config") == fingerprint:
            print(f"== {name}: done earlier with this config, skipping (--force to rerun)", flush=True)
            continue
        reason = why_skip(stage_config, stage)
        if reason:
            print(f"== {stage}: skipped: {reason}", flush=True)
            continue
        set_aside_other_configs_state(stage_config.paths.stage_dir(stage), fingerprint, force)
        command = stage_command(stage_config, stage, config_path, stage_overrides)
        print(f"== {name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        returncode = subprocess.call(command)
        if returncode != 0:
            print(f"== {name} failed (exit {returncode}); fix and re-run: finished stages are kept, "
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


