"""Ways to learn from judgments, side by side on one run's labels: which removes most of the
few-answers SFT model's test error, at what cost in labels and seconds.

    vqa-rlhf bench rlhf [CONFIG] [--methods ppo,grpo,dpo,rft,judge,verifiable,ceiling] [key=value ...]
    vqa-rlhf bench rlhf [CONFIG] --seeds 0,1,2 [--methods ppo,verifiable] [key=value ...]

Reads a finished run of CONFIG (./launch.sh): its SFT model, the labels its last reward model
learned from (<run>/rm/labels), its reward model and its test evaluation of the SFT model. Each
method starts from that SFT model in a run of its own, <run>/bench-rlhf/<method>/ (the run's data,
vision tower and feature cache), is answered greedily on the test split and compared with the SFT
model question by question (paired bootstrap 95% CI; error removed = share of the SFT model's error).

  ppo         the mission's path, as the run did it: labels -> reward model -> PPO, every round (read)
  grpo, rloo  trl's GRPO / RLOO against the run's reward model, ppo.steps updates
  dpo         DPO of the policy on (correct, incorrect) answers to one question (rm.objective=dpo)
  rft         rejection-sampling fine-tuning: SFT on the answers labeled correct (ReST / RAFT)
  judge       the run's likelihood reward model answering as a policy (its own greedy answers)
  noisy       the mission's path again from the SFT model with a labeler who errs on 10% of the
              answers (autolabel.error_rate=0.1): new labels, reward model and PPO
  verifiable  control: PPO with official VQA accuracy as the reward (a perfect labeler), same budget
  ceiling     control: SFT on the rl images' written answers (a person answers every rl question)

--seeds: the whole run once per seed (seed=N drives the training and the built-in dataset alike, so
each seed is another dataset, SFT model, labels and reward model; the config's own seed is the
config's own run, others go to <name>-seed<N>; a seed's finished stages are skipped), the methods on
each, and per method the mean +- sd over seeds of test accuracy and error removed, and whether the
paired CI is above zero on every seed. Written to the first seed's run as table.json's `seeds`.

Writes <run>/bench-rlhf/table.json (the run's report shows it: `vqa-rlhf report <run>`) and prints
the table. A method that fails prints its error and the bench goes on. Finished methods are kept:
a re-run measures only the missing ones (--force: all again).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlm.config import ConfigError, RunConfig, load_config
from vlm.evaluation import compare_evaluations
from vlm.files import write_json
from vlm.stage_cli import DEFAULT_CONFIG, config_path_and_overrides

METHODS = ("ppo", "grpo", "rloo", "dpo", "rft", "judge", "noisy", "verifiable", "ceiling")
DEFAULT_METHODS = ("ppo", "grpo", "dpo", "rft", "judge", "noisy", "verifiable", "ceiling")
NOISY_LABELER_ERROR = 0.1


def method_overrides(config: RunConfig, method: str) -> list[str]:
    """A method's own run: <run>/bench-rlhf/<method>, reading the run's data, tower, SFT model, labels."""
    run = config.run_dir
    shared = [f"output_root={run / 'bench-rlhf'}", f"name={method}", f"data.dir={config.data_dir}",
              f"model.vision_model={config.model.vision_model}", f"data.feature_cache={config.data.feature_cache}",
              f"ppo.policy={config.sft_final}", f"rm.base={config.sft_final}", "rm.best_of_n=0",
              "rm.candidate_questions=0", "rlhf.rounds=1", "ppo.oracle_control=false"]
    if method == "noisy":  # its own labels (its own label store), reward model and PPO
        return [*shared, f"sample.model={config.sft_final}", f"autolabel.error_rate={NOISY_LABELER_ERROR}"]
    return [*shared, f"ppo.reward_model={config.paths.final('rm')}", f"rm.labels={config.paths.stage_dir('rm') / 'labels'}"]


def plan(config: RunConfig, method: str, bench_dir: Path) -> tuple[list[list[str]], Path]:
    """(commands to run: [module, its own arguments], the evaluation folder of the method's policy)."""
    stage = lambda module, *extra: [module, *extra]  # measure() adds the interpreter, config and overrides
    evaluate = lambda model: stage("stages.evaluate", "--model", str(model), "--tag", "policy")
    if method in ("grpo", "rloo", "verifiable"):
        extra = ["ppo.reward=vqa_accuracy"] if method == "verifiable" else [f"ppo.algo={method}"]
        return [stage("stages.ppo", *extra)], bench_dir / "eval" / "ppo"
    if method in ("dpo", "rft"):
        extra = ["rm.objective=dpo", "rm.lr=1.0e-4"] if method == "dpo" else [
            "rm.objective=likelihood", "rm.only_correct=true"]
        return [stage("stages.rm", *extra), evaluate(bench_dir / "rm" / "final")], bench_dir / "eval" / "policy"
    if method == "judge":
        return [evaluate(config.paths.final("rm"))], bench_dir / "eval" / "policy"
    if method == "noisy":
        return [stage("stages.sample"), stage("stages.autolabel"), stage("stages.rm"), stage("stages.ppo")], \
            bench_dir / "eval" / "ppo"
    if method == "ceiling":
        extra = [f"model.checkpoint={config.sft_final}", f"data.train_split={config.data.rl_split}",
                 "data.answer_images=null"]
        return [stage("stages.sft", *extra), stage("stages.evaluate", *extra)], bench_dir / "eval" / "sft"
    raise ValueError(method)


def measure(config: RunConfig, config_path: str, overrides: list[str], method: str, force: bool) -> dict:
    bench_dir = config.run_dir / "bench-rlhf" / method
    result_path = bench_dir / "result.json"
    if result_path.is_file() and not force:
        return json.loads(result_path.read_text())
    sft_eval = config.paths.eval_dir("sft")
    if method == "ppo":  # the run's own path: what the report's stages.rlhf says
        report = json.loads(config.paths.report_json.read_text())
        entry = report["stages"]["rlhf"]["methods"]["ppo"]
        return {key: entry[key] for key in ("test", "change", "ci95", "error_removed", "labels", "seconds", "rounds")}
    if force and bench_dir.exists():
        shutil.rmtree(bench_dir)
    started = time.perf_counter()
    commands, eval_dir = plan(config, method, bench_dir)
    for command in commands:
        module, *extra = command
        command = [sys.executable, "-m", module, config_path, *overrides, *method_overrides(config, method), *extra]
        print(f"== bench rlhf {method}: {' '.join(command)}", flush=True)
        if subprocess.call(command) != 0:
            raise RuntimeError(f"{command[2]} failed (exit status above)")
    seconds = round(time.perf_counter() - started, 1)
    after = json.loads((eval_dir / "metrics.json").read_text())
    change = compare_evaluations(sft_eval, eval_dir, seed=config.seed)
    rm_metrics = bench_dir / "rm" / "metrics.json"
    labels = None
    if method == "noisy":
        noisy_rm = json.loads(rm_metrics.read_text())
        labels = noisy_rm["train_labels"] + noisy_rm["heldout_labels"]
    if method in ("dpo", "rft", "judge", "grpo", "rloo"):  # they learn from the run's labels (or its reward model)
        run_rm = json.loads(config.paths.metrics("rm").read_text())
        labels = run_rm["train_labels"] + run_rm["heldout_labels"]
        if method == "judge":
            seconds = run_rm["seconds"]
    result = {"test": after["vqa_accuracy"], "change": change["change"], "ci95": change["ci95"],
              "error_removed": change["error_removed"], "labels": labels, "seconds": seconds, "rounds": 1,
              **({"trained_on": json.loads(rm_metrics.read_text())["train_labels"]} if rm_metrics.is_file() else {})}
    write_json(result_path, result)
    return result


def table(start: float, results: dict[str, dict]) -> str:
    lines = [f"{'method':<12}{'test VQA':>10}{'change (95% CI)':>26}{'error removed':>15}{'labels':>9}{'seconds':>9}",
             f"{'sft (start)':<12}{start:>10.2f}"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<12}  failed: {r['error']}")
            continue
        change = f"{r['change']:+.2f} ({r['ci95'][0]:+.2f}..{r['ci95'][1]:+.2f})"
        lines.append(f"{name:<12}{r['test']:>10.2f}{change:>26}{r['error_removed']:>14.1f}%"
                     f"{r['labels'] if r['labels'] is not None else '-':>9}{r['seconds']:>9.0f}")
    return "\n".join(lines)


def seed_overrides(config: RunConfig, overrides: list[str], seed: int) -> list[str]:
    """The run of `seed`: the config's own run for its own seed, else <name>-seed<N> with seed=N."""
    return list(overrides) if seed == config.seed else [*overrides, f"seed={seed}", f"name={config.name}-seed{seed}"]


def measure_run(config: RunConfig, config_path: str, overrides: list[str], methods: list[str],
                force: bool) -> tuple[float, dict[str, dict]]:
    """(the SFT model's test accuracy, each method's result or its error) on one finished run."""
    start = json.loads(config.paths.eval_metrics("sft").read_text())["vqa_accuracy"]
    results: dict[str, dict] = {}
    for method in methods:
        try:
            results[method] = measure(config, config_path, overrides, method, force)
        except Exception as exc:  # one method's failure is its row, not the end of the bench
            results[method] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"bench rlhf: {method} failed: {exc}", file=sys.stderr, flush=True)
    return start, results


def over_seeds(per_seed: dict[int, dict]) -> dict[str, dict]:
    """Per method: mean +- sd over the seeds of the start, test accuracy and error removed, and
    whether the paired CI was above zero on every seed. `per_seed`: seed -> {start, methods}."""
    spread = lambda values: {"mean": round(statistics.mean(values), 2),
                             "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None}
    out = {"start": spread([run["start"] for run in per_seed.values()])}
    names = dict.fromkeys(name for run in per_seed.values() for name in run["methods"])  # in the bench's order
    for name in names:
        runs = {seed: run["methods"][name] for seed, run in per_seed.items() if name in run["methods"]}
        out[name] = {"seeds": sorted(runs), "test": spread([r["test"] for r in runs.values()]),
                     "error_removed": spread([r["error_removed"] for r in runs.values()]),
                     "ci_above_zero_on_every_seed": all(r["ci95"][0] > 0 for r in runs.values()),
                     "per_seed": {str(seed): {k: r[k] for k in ("test", "change", "ci95", "error_removed")}
                                  for seed, r in runs.items()}}
    return out


def seeds_table(summary: dict) -> str:
    from vlm.report import seeds_rows

    lines = [f"{'method':<12}{'seeds':>7}{'test VQA':>18}{'error removed %':>20}  CI above 0 on every seed"]
    lines += [f"{name:<12}{seeds:>7}{test:>18}{removed:>20}  {above}" for name, seeds, test, removed, above in
              seeds_rows(summary)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench rlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="the run's config (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as the run was started with")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: the whole run for each (a seed not "
                                        "finished yet is run first) and mean +- sd over them")
    parser.add_argument("--force", action="store_true", help="measure every method again")
    args = parser.parse_intermixed_args(argv)
    config_path, overrides = config_path_and_overrides(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; methods are {', '.join(METHODS)}")
    try:
        config = load_config(config_path, overrides)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ConfigError as exc:
        parser.error(str(exc))
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, e.g. 0,1,2 (got {args.seeds!r})")
    shown = os.path.relpath(config_path) if Path(config_path).is_absolute() else config_path
    command = " ".join(["vqa-rlhf bench rlhf", shown, *overrides, "--methods", ",".join(methods),
                        *(["--seeds", args.seeds] if seeds else [])])
    from vlm.report import build_report

    per_seed: dict[int, dict] = {}
    run_dirs: dict[int, Path] = {}
    for seed in seeds or [config.seed]:
        run_overrides = seed_overrides(config, overrides, seed)
        run_config = load_config(config_path, run_overrides)
        if seeds and not run_config.paths.report_json.is_file():
            from vlm import pipeline

            print(f"== bench rlhf: seed {seed}: the whole run first ({run_config.run_dir})", flush=True)
            if pipeline.run(run_config, config_path, run_config.stages, run_overrides, force=False) != 0:
                raise SystemExit(f"bench rlhf: the run of seed {seed} failed (see above); re-run to resume it")
        if not run_config.paths.eval_metrics("sft").is_file():
            raise SystemExit(f"bench rlhf: no finished run at {run_config.run_dir}: run ./launch.sh {config_path} first")
        start, results = measure_run(run_config, config_path, run_overrides, methods, args.force)
        per_seed[seed] = {"command": command, "start": start,
                          "methods": {n: r for n, r in results.items() if "error" not in r},
                          "failed": {n: r["error"] for n, r in results.items() if "error" in r}}
        run_dirs[seed] = run_config.run_dir
        if seeds:
            print(f"\nseed {seed} ({run_config.run_dir}):")
        print(table(start, results), flush=True)
    if seeds:  # the spread goes with the first seed's run (the config's own, in the usual 0,1,2)
        per_seed[seeds[0]]["seeds"] = over_seeds(per_seed)
        print(f"\nover seeds {','.join(map(str, seeds))} (mean +- sd over seeds; CI: paired, per seed):")
        print(seeds_table(per_seed[seeds[0]]["seeds"]))
    for seed, out in per_seed.items():
        path = run_dirs[seed] / "bench-rlhf" / "table.json"
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        kept = {n: r for n, r in (earlier.get("methods") or {}).items() if n not in methods}
        if kept:  # methods an earlier bench measured on this run stay in its table, with that command too
            commands = [c for c in earlier["command"].split("; ") if c != command] + [command]
            out = {**out, "methods": {**out["methods"], **kept}, "command": "; ".join(commands)}
        write_json(path, out)
        build_report(run_dirs[seed])  # each run's report shows its table
    return 0


if __name__ == "__main__":
    sys.exit(main())
