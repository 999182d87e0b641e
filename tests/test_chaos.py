"""The chaos benchmark's own logic (bench/chaos.py): how faults are planned, what counts as the same
result and as a half-written checkpoint. The benchmark itself runs whole pipelines: `vqa-rlhf bench chaos`.
"""
import json
import random
import subprocess
import sys

from conftest import REPO

from bench import chaos

STAGES = ["prep", "sft", "sample", "autolabel", "rm", "ppo", "instruct", "eval", "caption_eval"]


def test_faults_cover_every_stage_and_checkpoint_faults_go_only_to_stages_that_checkpoint():
    checkpoints = {"sft": 2, "rm": 2, "ppo": 1, "instruct": 2}
    plan = chaos.plan(STAGES, checkpoints, kills=20, runs=20, rng=random.Random(0))
    faults = [fault for run in plan for fault in run]
    assert len(plan) == 20 and all(len(run) == 1 for run in plan)
    assert {f["stage"] for f in faults} == set(STAGES)
    at_checkpoints = [f for f in faults if f["kind"] == "checkpoint"]
    assert {f["stage"] for f in at_checkpoints} <= set(checkpoints)
    # the n-th write of the stage: one of its checkpoints or the final model after them
    assert all(1 <= f["nth"] <= checkpoints[f["stage"]] + 1 for f in at_checkpoints)
    assert plan == chaos.plan(STAGES, checkpoints, 20, 20, random.Random(0))  # seeded
    # fewer runs than kills: several faults per run
    assert [len(run) for run in chaos.plan(STAGES, {}, 7, 3, random.Random(1))] == [3, 2, 2]


def test_report_figures_leave_out_timings_and_the_runs_own_paths(tmp_path):
    def report(root, seconds):
        run_dir = root / "default-smoke"
        run_dir.mkdir(parents=True)
        (run_dir / "report.json").write_text(json.dumps({
            "run_dir": str(run_dir), "stages": {"sft": {
                "vqa_accuracy": 40.0, "seconds": seconds, "checkpoint": str(run_dir / "sft" / "final"),
                "val_accuracy_curve": [{"step": 2, "train_seconds": seconds / 2, "vqa_accuracy": 30.0}]}}}))
        return run_dir

    a, b = report(tmp_path / "reference", 3.0), report(tmp_path / "run-00", 9.5)
    assert chaos.report_figures(a) == chaos.report_figures(b)
    data = json.loads((b / "report.json").read_text())
    data["stages"]["sft"]["val_accuracy_curve"][0]["vqa_accuracy"] = 31.0
    (b / "report.json").write_text(json.dumps(data))
    assert chaos.diff_paths(chaos.report_figures(a), chaos.report_figures(b)) == [
        ".stages.sft.val_accuracy_curve[0].vqa_accuracy: 30.0 vs 31.0"]


def test_a_checkpoint_without_its_state_file_or_a_staging_dir_is_half_written(tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run / "data" / "images.tmp-x").mkdir(parents=True)  # the dataset dir is not watched
    assert chaos.half_written(run) is None
    (run / "sft" / "checkpoints" / "checkpoint-4").mkdir()
    assert chaos.half_written(run) == run / "sft" / "checkpoints" / "checkpoint-4"
    (run / "ppo" / "checkpoints" / "update-1.tmp").mkdir(parents=True)
    assert set(chaos.all_half_written(run)) == {run / "sft" / "checkpoints" / "checkpoint-4",
                                                run / "ppo" / "checkpoints" / "update-1.tmp"}
    assert chaos.complete_checkpoints(run / "sft") == [run / "sft" / "checkpoints" / "checkpoint-2"]
    # what a checkpoint fault waits for: checkpoints and final models, not staged exports or JSON files
    assert chaos.is_model_write(run / "ppo" / "checkpoints" / "update-1.tmp")
    assert chaos.is_model_write(run / "rm" / "final.tmp")
    assert not chaos.is_model_write(run / "rm" / "labels.tmp")
    assert not chaos.is_model_write(run / "sft" / "metrics.json.tmp")


def test_each_rlhf_round_is_a_stage_of_its_own_with_its_own_directory(tmp_path):
    # the pipeline's lines with rlhf.rounds=2: faults can be aimed at a round, and found where it writes
    assert chaos.started_stage("== ppo (round 1 of 2): python -m stages.ppo configs/default.yaml") == "ppo (round 1 of 2)"
    assert chaos.started_stage("== sft: python -m stages.sft configs/default.yaml") == "sft"
    assert chaos.skipped_stage("== rm (round 2 of 2): done earlier with this config, skipping (--force to rerun)") \
        == "rm (round 2 of 2)"
    run = tmp_path / "run"
    assert chaos.stage_dir(run, "ppo (round 1 of 2)") == run / "rounds" / "1" / "ppo"
    assert chaos.stage_dir(run, "ppo (round 2 of 2)") == run / "ppo"  # the last round writes where one round does
    assert chaos.stage_dir(run, "sft") == run / "sft"
    (run / "rounds" / "1" / "rm").mkdir(parents=True)
    (run / "rounds" / "1" / "rm" / "done.json").write_text("{}")
    assert chaos.finished_stages(run, ["sft", "rm (round 1 of 2)", "rm (round 2 of 2)"]) == {"rm (round 1 of 2)"}
    # a round's half-written checkpoint, two levels below a stage's usual place, is seen
    (run / "rounds" / "1" / "ppo" / "checkpoints" / "update-3.tmp").mkdir(parents=True)
    assert chaos.half_written(run) == run / "rounds" / "1" / "ppo" / "checkpoints" / "update-3.tmp"


def test_bench_chaos_is_reached_as_a_bench_subcommand_too():
    for command in (["bench", "chaos"], ["bench-chaos"]):
        result = subprocess.run([sys.executable, "-m", "stages.cli", *command, "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "chaos: K kills, R/N runs identical, L lost" in result.stdout
