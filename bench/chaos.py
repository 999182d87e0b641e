"""Pipeline chaos benchmark: SIGKILL a staged run at seeded random moments, run it again until it
finishes, and check that it ends exactly as a run that was never interrupted.

    vqa-rlhf bench chaos [CONFIG] [--kills 20] [--runs N] [--seed 0] [--out runs/chaos] [key=value ...]
    (also spelled: vqa-rlhf bench-chaos ...)

First the config runs once uninterrupted (`./launch.sh CONFIG --smoke`, unless --no-smoke), the
reference. Then N runs of the same config, each in its own output root, receive the --kills
faults between them (default: one per run). A fault is a SIGKILL of the whole process group
(the pipeline, the stage process, any launcher children), as a preempted node or an OOM kill
would do, at one of three kinds of moment:

  inside      a uniform random offset into the stage, up to the reference run's duration of it
  checkpoint  while a checkpoint or final model is on disk half-written (a `checkpoint-N` without its
              trainer_state.json, PPO's `update-N.tmp`, a `final.tmp`): the n-th such write of the
              stage, n drawn up to the reference's checkpoints + 1, so some kills resume from a
              checkpoint and some hit the final save; stages that checkpoint only
  between     the moment the stage's done.json appears, before the next stage (or the report) starts

After each kill the same `./launch.sh` command runs again, until it exits 0. The stages, their
durations and which of them checkpoint are read from the reference run, never listed here, so a
stage added to the pipeline is covered without touching this file; each stage gets faults in turn
(seeded order), the kind is drawn per fault.
With rlhf.rounds=N the stages of each RLHF round count as stages of their own (`ppo (round 1 of
2)`, written under <run>/rounds/1/), so faults land in every round:

    vqa-rlhf bench chaos configs/default.yaml rlhf.rounds=2 --kills 12

Each finished run is compared with the reference: report.json with its timings and paths taken out
(`seconds`, `train_seconds`, the run dir), every saved model's tensors (`*.safetensors` outside
checkpoints: sft/final, rm/final, ppo/final, ppo/value_model, instruct/final, ...) bit for bit,
and the label store's samples and current labels. A run *lost work* if it did not finish, or if
after a kill a stage that had finished ran again, or a training stage did not resume from the
newest complete checkpoint it had. The last line reads `chaos: K kills, R/N runs identical, L lost`.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch.sh"
POLL = 0.005  # seconds between looks at the run dir while waiting for a moment to kill
TIMING_KEYS = {"seconds", "train_seconds", "run_dir"}
KINDS = ("inside", "checkpoint", "between")


# -- the staged run as a child process ------------------------------------------------------------

class Launch:
    """One `./launch.sh` process in its own session (so a kill takes all of it), its output read
    line by line in a thread and copied to `log`."""

    def __init__(self, command: list[str], log: Path):
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        self._log = open(log, "a")
        self._log.write(f"\n### {' '.join(command)}\n")
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True, env=child_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self._log.write(line)
            self.lines.put(line)
        self.lines.put(None)

    def new_lines(self) -> list[str]:
        lines = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return lines
            if line is not None:
                self.output.append(line)
                lines.append(line)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)

    def wait(self) -> int:
        code = self.process.wait()
        self._reader.join()
        self.new_lines()
        self._log.close()
        return code


def child_env() -> dict:
    env = dict(os.environ)
    # The benchmark measures what happens, not how fast: one thread per process keeps the
    # stage processes from fighting over the cores with other jobs.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


# A stage of an RLHF round as the pipeline names it when rlhf.rounds > 1: `sample (round 1 of 2)`.
ROUND_STAGE = re.compile(r"(\w+) \(round (\d+) of (\d+)\)")


def is_stage_name(name: str) -> bool:
    return name.isidentifier() or ROUND_STAGE.fullmatch(name) is not None


def stage_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage (as the pipeline names it) writes: <run>/<stage>, and for a round before the
    last <run>/rounds/<r>/<stage> (the layout is RunPaths', named once in vlm/config.py)."""
    from vlm.config import RunPaths

    match = ROUND_STAGE.fullmatch(stage)
    if match is None:
        return RunPaths(run_dir).stage_dir(stage)
    name, round, rounds = match[1], int(match[2]), int(match[3])
    return RunPaths(run_dir, run_dir / "rounds" / str(round) if round < rounds else None).stage_dir(name)


def started_stage(line: str) -> str | None:
    """The stage a pipeline output line says is starting (`== sft: python -m ...`, `== ppo (round 1
    of 2): ...`), else None."""
    if line.startswith("== ") and ": " in line and "done earlier" not in line:
        name = line[3:].split(":", 1)[0]
        if is_stage_name(name):
            return name
    return None


def skipped_stage(line: str) -> str | None:
    if line.startswith("== ") and "done earlier with this config, skipping" in line:
        return line[3:].split(":", 1)[0]
    return None


# -- what is on disk ------------------------------------------------------------------------------

def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """The stage's resumable checkpoints, oldest first: HF Trainer `checkpoint-N` with its
    trainer_state.json (written last) or PPO `update-N` with its state.json."""
    found = []
    for path in (stage_dir / "checkpoints").glob("*-*"):
        kind, _, step = path.name.rpartition("-")
        if step.isdigit() and ((kind == "checkpoint" and (path / "trainer_state.json").is_file())
                               or (kind == "update" and (path / "state.json").is_file())):
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def half_written(run_dir: Path, ignore: frozenset = frozenset(), skip=("data",)) -> Path | None:
    """A checkpoint or model being written right now: `checkpoint-N` without trainer_state.json,
    or a `*.tmp` dir or file (the atomic writers' staging names), in the stage dirs. `ignore`:
    what an earlier kill left half-written (on disk before this attempt began)."""
    try:
        tops = [e for e in os.scandir(run_dir) if e.is_dir() and e.name not in skip]
    except FileNotFoundError:
        return None
    for top in tops:
        # <stage>/<checkpoints|final|...> is deep enough for every staging name; a round's stages
        # sit two levels lower (rounds/<r>/<stage>/...)
        deepest = 4 if top.name == "rounds" else 2
        for root, dirs, files in os.walk(top.path):
            depth = Path(root).relative_to(run_dir).parts
            for name in dirs + files:
                if (name.endswith(".tmp") or ".tmp-" in name) and Path(root) / name not in ignore:
                    return Path(root) / name
            for name in dirs:
                if name.startswith("checkpoint-") and name[11:].isdigit() and \
                        not os.path.exists(os.path.join(root, name, "trainer_state.json")) and \
                        Path(root) / name not in ignore:
                    return Path(root) / name
            if len(depth) >= deepest:
                dirs[:] = []
    return None


def is_model_write(path: Path) -> bool:
    """A checkpoint (`checkpoints/checkpoint-N`, `checkpoints/update-N.tmp`) or a final model (`final.tmp`)."""
    return path.parent.name == "checkpoints" or path.name == "final.tmp"


def all_half_written(run_dir: Path) -> list[Path]:
    found, ignore = [], set()
    while (path := half_written(run_dir, frozenset(ignore))) is not None:
        found.append(path)
        ignore.add(path)
    return found


def finished_stages(run_dir: Path, stages: list[str]) -> set[str]:
    return {s for s in stages if (stage_dir(run_dir, s) / "done.json").is_file()}


# -- one run: faults, relaunches ------------------------------------------------------------------

def run_with_faults(command: list[str], run_dir: Path, faults: list[dict], durations: dict[str, float],
                    stages: list[str], log: Path, rng: random.Random, max_attempts: int) -> dict:
    """Runs `command` until it exits 0, SIGKILLing it at each fault's moment (in stage order).
    Returns what happened: the faults as they landed, attempts, lost-work findings."""
    pending = sorted(faults, key=lambda f: stages.index(f["stage"]))
    landed, findings = [], []
    attempts = 0
    expect = None  # what the attempt after a kill must do: skip finished stages, resume checkpoints
    while attempts < max_attempts:
        attempts += 1
        leftovers = frozenset(all_half_written(run_dir))
        launch = Launch(command, log)
        fault = pending[0] if pending else None
        current, stage_started, deadline, fired = None, None, None, None
        writes_seen: list[Path] = []  # distinct checkpoints / final models seen half-written in the stage
        while launch.process.poll() is None:
            for line in launch.new_lines():
                stage = started_stage(line)
                if stage:
                    current, stage_started = stage, time.monotonic()
                    if fault and stage == fault["stage"] and fault["kind"] == "inside":
                        deadline = stage_started + rng.uniform(0, durations.get(stage, 1.0))
            if fault and current and fired is None:
                moment, fault = fault_moment(fault, current, stage_started, deadline, run_dir, stages,
                                             leftovers, writes_seen)
                if moment is not None:
                    if fault["kind"] == "between":  # the next stage may have started its process already
                        killed_in = f"after {fault['stage']}"
                    else:
                        killed_in = current if not (stage_dir(run_dir, current) / "done.json").is_file() else f"after {current}"
                    launch.kill()
                    resumable = complete_checkpoints(stage_dir(run_dir, current))
                    fired = {**fault, "moment": moment, "killed_in": killed_in,
                             "finished": sorted(finished_stages(run_dir, stages), key=stages.index),
                             "checkpoint": str(resumable[-1]) if resumable else None, "stage_at_kill": current}
            time.sleep(POLL)
        code = launch.wait()
        if expect is not None:
            findings += check_resumed(expect, launch.output)
            expect = None
        if fired is not None:
            landed.append(fired)
            pending.pop(0)
            expect = fired
            continue
        if code == 0:
            if pending:  # the run ended before a fault's moment came (e.g. a stage faster than planned)
                landed += [{**f, "moment": "never: the run finished first", "killed_in": None} for f in pending]
            return {"finished": True, "attempts": attempts, "faults": landed, "findings": findings}
        findings.append(f"attempt {attempts} failed with exit {code} without a fault (see {log})")
        expect = None
    return {"finished": False, "attempts": attempts, "faults": landed, "findings": findings}


def fault_moment(fault: dict, current: str, stage_started: float, deadline: float | None, run_dir: Path,
                 stages: list[str], leftovers: frozenset, writes_seen: list[Path]) -> tuple[str | None, dict]:
    """Whether the fault's moment has come, said in words (None: not yet), and the fault as it
    lands: a checkpoint fault whose stage ended before a write was seen becomes a `between` one.
    `writes_seen` gathers the stage's half-written checkpoints and final models as they appear."""
    moment = None
    if fault["kind"] == "inside" and deadline is not None and time.monotonic() >= deadline:
        moment = f"{time.monotonic() - stage_started:.2f} s into {current}"
    elif fault["kind"] == "checkpoint" and current == fault["stage"]:
        # checkpoints and final models only: exports and JSON files are staged too, briefly
        writes_seen += [p for p in all_half_written(run_dir)
                        if is_model_write(p) and p not in leftovers and p not in writes_seen]
        if len(writes_seen) >= fault.get("nth", 1):
            moment = f"writing {writes_seen[-1].relative_to(run_dir)}"
    elif fault["kind"] == "between" and (stage_dir(run_dir, fault["stage"]) / "done.json").is_file():
        moment = f"after {fault['stage']} finished"
    if fault["kind"] == "checkpoint" and moment is None and current != fault["stage"] and \
            stages.index(current) > stages.index(fault["stage"]):
        # the stage ended before a write was seen: the fault lands as the next stage starts
        moment = f"no half-written checkpoint seen in {fault['stage']}; at the start of {current}"
        fault = {**fault, "kind": "between"}
    return moment, fault


def check_resumed(fired: dict, output: list[str]) -> list[str]:
    """Lost work after a kill: a stage that had finished ran again, or the killed stage did not
    continue from the newest complete checkpoint it had."""
    findings = []
    skipped = {skipped_stage(line) for line in output}
    rerun = [s for s in fired["finished"] if s not in skipped]
    if rerun:
        findings.append(f"stage(s) {rerun} had finished before the kill ({fired['moment']}) and ran again")
    checkpoint = fired.get("checkpoint")
    stage = fired.get("stage_at_kill")
    if checkpoint and stage not in fired["finished"] and not any(f"resuming from {checkpoint}" in l for l in output):
        findings.append(f"{stage} was killed ({fired['moment']}) with {checkpoint} on disk and did not resume from it")
    return findings


# -- comparing a run with the reference -----------------------------------------------------------

def report_figures(run_dir: Path) -> dict:
    """report.json without what differs between identical runs: timings and the run's own paths."""
    root = str(run_dir.parent)  # the output root: every path the run writes starts with it

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return value.replace(str(Path(root).resolve()), "<root>").replace(root, "<root>")
        return value

    return clean(json.loads((run_dir / "report.json").read_text()))


def saved_models(run_dir: Path) -> dict[str, Path]:
    """Every saved model's weights file, by path in the run dir; checkpoints and staging dirs aside."""
    models = {}
    for path in run_dir.rglob("*.safetensors"):
        rel = path.relative_to(run_dir)
        if any(part.startswith("checkpoints") or part.endswith(".tmp") or ".tmp-" in part for part in rel.parts):
            continue
        models[str(rel)] = path
    return models


def label_rows(run_dir: Path) -> list | None:
    """The label store's samples and current labels, without times or ids that count retries."""
    db = run_dir / "labels" / "labels.db"
    if not db.is_file():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        samples = con.execute("SELECT s.question_id, s.answer, s.greedy, l.labeler, l.label FROM samples s "
                              "LEFT JOIN labels l ON l.sample_id = s.id AND l.undone_at IS NULL "
                              "ORDER BY s.question_id, s.answer, l.labeler, l.label").fetchall()
    return [list(row) for row in samples]


def differences(reference: Path, run_dir: Path) -> list[str]:
    import torch  # here: `bench chaos --help` in 0.1 s, not 3 s
    from safetensors.torch import load_file

    found = []
    if not (run_dir / "report.json").is_file():
        return ["no report.json"]
    a, b = report_figures(reference), report_figures(run_dir)
    if a != b:
        found.append("report.json: " + "; ".join(diff_paths(a, b)[:5]))
    ref_models, models = saved_models(reference), saved_models(run_dir)
    if ref_models.keys() != models.keys():
        found.append(f"saved models: {sorted(ref_models.keys() ^ models.keys())} in only one run")
    for rel in sorted(ref_models.keys() & models.keys()):
        ta, tb = load_file(ref_models[rel]), load_file(models[rel])
        changed = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
        if changed or ta.keys() != tb.keys():
            found.append(f"{rel}: {len(changed)} of {len(ta)} tensors differ (e.g. {changed[:2]})")
    if label_rows(reference) != label_rows(run_dir):
        found.append("label store: samples or labels differ")
    return found


def diff_paths(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}.{key} only in one")
            else:
                out += diff_paths(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:60]} vs {json.dumps(b)[:60]}"]


# -- the benchmark ----------------------------------------------------------------------------------

def plan(stages: list[str], checkpoints: dict[str, int], kills: int, runs: int,
         rng: random.Random) -> list[list[dict]]:
    """`kills` faults over `runs` runs: stages in turn (in a seeded order, so every stage gets
    faults once there are at least as many kills as stages), a kind drawn per fault.
    `checkpoints`: how many checkpoints each stage that checkpoints wrote in the reference run."""
    order = stages[:]
    rng.shuffle(order)
    per_run: list[list[dict]] = [[] for _ in range(runs)]
    for index in range(kills):
        stage = order[index % len(order)]
        kinds = [k for k in KINDS if k != "checkpoint" or checkpoints.get(stage)]
        fault = {"stage": stage, "kind": rng.choice(kinds)}
        if fault["kind"] == "checkpoint":  # which write: a checkpoint, or the final model after them
            fault["nth"] = rng.randint(1, checkpoints[stage] + 1)
        per_run[index % runs].append(fault)
    return per_run


def reference_run(command: list[str], out: Path) -> tuple[Path, list[str], dict[str, float]]:
    log = out / "reference.log"
    started = time.perf_counter()
    launch = Launch(command, log)
    code = launch.wait()
    if code != 0:
        raise SystemExit(f"error: the uninterrupted reference run failed (exit {code}); see {log}")
    report = next((l.split("report: ", 1)[1].strip() for l in launch.output if l.startswith("report: ")), None)
    if report is None:  # e.g. stages without autolabel: the run stops after sample for people to label
        raise SystemExit(f"error: the reference run ended without a report, so there is nothing to compare "
                         f"(see {log}); give the chaos benchmark a config whose run goes to the end")
    run_dir = (REPO / report).parent if not Path(report).is_absolute() else Path(report).parent
    stages = [s for s in map(started_stage, launch.output) if s]
    durations = {s: json.loads((stage_dir(run_dir, s) / "done.json").read_text())["seconds"] for s in stages}
    print(f"reference: {len(stages)} stages in {time.perf_counter() - started:.0f} s ({run_dir})", flush=True)
    return run_dir, stages, durations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "default.yaml"), help="YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--kills", type=int, default=20, help="faults (SIGKILLs) injected in all (default 20)")
    parser.add_argument("--runs", type=int, help="interrupted runs the faults are spread over (default: --kills)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan and moments (default 0)")
    parser.add_argument("--out", default="runs/chaos", help="where the runs go (default runs/chaos)")
    parser.add_argument("--no-smoke", action="store_true", help="the config's own step counts, not --smoke's")
    args = parser.parse_intermixed_args(argv)
    runs = args.runs or max(1, args.kills)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give another --out (runs there would be resumed, not run)")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    def command(root: Path) -> list[str]:
        return [str(LAUNCH), args.config, *([] if args.no_smoke else ["--smoke"]), *args.overrides,
                f"output_root={root}"]

    reference, stages, durations = reference_run(command(out / "reference"), out)
    relative = reference.relative_to(out / "reference")
    checkpoints = {s: len(complete_checkpoints(stage_dir(reference, s))) for s in stages
                   if (stage_dir(reference, s) / "checkpoints").is_dir()}
    faults = plan(stages, checkpoints, args.kills, runs, rng)

    results = []
    for index, run_faults in enumerate(faults):
        root = out / f"run-{index:02d}"
        run_dir = root / relative
        started = time.perf_counter()
        result = run_with_faults(command(root), run_dir, run_faults, durations, stages, out / f"run-{index:02d}.log",
                                 rng, max_attempts=len(run_faults) + 3)
        result["differences"] = differences(reference, run_dir) if result["finished"] else ["did not finish"]
        result["lost"] = not result["finished"] or bool(result["findings"])
        result["identical"] = result["finished"] and not result["differences"]
        results.append(result)
        kills = [f for f in result["faults"] if f.get("killed_in")]
        verdict = "identical" if result["identical"] else "DIFFERENT"
        if result["lost"]:
            verdict += ", LOST WORK"
        print(f"run {index:02d}: {len(kills)} kill(s) [" + "; ".join(f"{f['kind']} {f['stage']}: {f['moment']}"
              for f in result["faults"]) + f"], {result['attempts']} launches, {time.perf_counter() - started:.0f} s: "
              f"{verdict}", flush=True)
        for line in result["differences"] + result["findings"]:
            print(f"    {line}", flush=True)

    return summarize(results, stages, out)


def summarize(results: list[dict], stages: list[str], out: Path) -> int:
    """chaos.json, where the kills landed, and the verdict: 0 when every run ended identical to the
    uninterrupted one without losing work."""
    landed = [f for r in results for f in r["faults"] if f.get("killed_in")]
    (out / "chaos.json").write_text(json.dumps({"stages": stages, "results": results}, indent=2) + "\n")
    # Where the kills landed, which is not always where they were aimed: a stage shorter than the
    # drawn offset passes the kill on to the next one, a stage that ends before a write is seen too.
    inside = Counter(f["killed_in"] for f in landed if not f["killed_in"].startswith("after "))
    after = Counter(f["killed_in"].removeprefix("after ") for f in landed if f["killed_in"].startswith("after "))
    writes = sum(f["moment"].startswith("writing ") for f in landed)
    print("\nkills inside a stage: " + ", ".join(f"{s} {inside[s]}" for s in stages))
    print("kills after a stage, before the next (or the report): " + ", ".join(f"{s} {after[s]}" for s in stages))
    print(f"kills while a checkpoint or final model was half-written: {writes}")
    aimed = Counter(f["kind"] for f in landed)
    print("faults as planned: " + ", ".join(f"{k} {aimed[k]}" for k in KINDS))
    missed = sum(1 for r in results for f in r["faults"] if not f.get("killed_in"))
    if missed:
        print(f"faults that never fired (the run finished first): {missed}")
    identical = sum(r["identical"] for r in results)
    lost = sum(r["lost"] for r in results)
    print(f"runs identical to the uninterrupted one: {identical}/{len(results)}; runs that lost work: {lost}")
    print(f"details: {out / 'chaos.json'}, logs: {out}/*.log")
    print(f"chaos: {len(landed)} kills, {identical}/{len(results)} runs identical, {lost} lost")
    return 0 if identical == len(results) and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
