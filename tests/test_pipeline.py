"""launch.sh end to end (--smoke), the report it writes, and the CLI's help."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_DIMS


def test_smoke_run_writes_the_report_and_a_rerun_skips_finished_stages(tmp_path):
    command = [str(REPO / "launch.sh"), "configs/default.yaml", "--smoke", *TINY_DIMS,
               f"output_root={tmp_path}", "name=pipe"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "pipe-smoke"
    report = json.loads((run_dir / "report.json").read_text())
    sft = report["stages"]["sft"]
    assert 0 <= sft["vqa_accuracy"] <= 100
    assert set(sft["by_answer_type"]) == {"yes/no", "number", "other"}
    assert sft["seconds"] > 0 and (run_dir / "sft" / "final" / "model.safetensors").is_file()
    assert sft["checkpoint"] == str(run_dir / "sft" / "final")
    assert 0 <= report["baselines"]["majority_answer"] <= 100
    stages = report["stages"]
    assert set(stages) == {"vision", "sft", "rm", "ppo", "rlhf", "instruct", "caption_eval"}
    # SFT built on the vision stage's tower, kept it frozen and read the tower's feature cache
    assert stages["sft"]["tower_probe"]["shape"] == pytest.approx(
        json.loads((run_dir / "eval" / "sft" / "metrics.json").read_text())["tower_probe"]["shape"])
    assert set(stages["vision"]["probe"]) == {"shape", "colour", "place"}
    assert "sft: feature cache" in result.stdout
    assert set(stages["sft"]["train_check"]["by_question_family"]) <= set(stages["sft"]["by_question_family"])
    assert 0 <= stages["rm"]["accuracy"] <= 100
    assert stages["rm"]["auc"] is None or 0 <= stages["rm"]["auc"] <= 1  # None: one class only in a smoke run
    assert set(stages["rm"]["baselines"]) == {"similarity", "exact_match"}
    assert {"algo", "vqa_accuracy_before", "vqa_accuracy_after", "mean_reward", "kl", "seconds"} <= set(stages["ppo"])
    assert set(stages["instruct"]) == {"vqa_accuracy_before", "vqa_accuracy_after", "description_precision",
                                       "description_recall", "seconds", "vqa_change"}
    assert set(stages["instruct"]["vqa_change"]) == {"change", "ci95", "error_removed"}  # paired, over the policy
    assert {"start", "reference", "methods"} <= set(stages["rlhf"]) and "ppo" in stages["rlhf"]["methods"]
    assert (run_dir / "report.md").read_text().startswith("# Run report")
    provenance = report["provenance"]  # recorded by the pipeline when it started: the stages' threads
    assert provenance == json.loads((run_dir / "provenance.json").read_text())
    assert provenance["seed"] == 0 and provenance["threads"] >= 1 and provenance["cpu"] and provenance["date"]
    assert (run_dir / "report.png").stat().st_size > 1000
    assert "baseline: majority_answer" in result.stdout  # the closing table
    results = json.loads((run_dir / "eval" / "sft" / "results.json").read_text())
    assert results and set(results[0]) == {"question_id", "answer"}  # official results format

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0
    assert again.stdout.count("done earlier with this config, skipping") == 10  # every stage of the config


def test_a_typo_in_an_override_stops_before_any_stage_runs(tmp_path):
    result = subprocess.run([str(REPO / "launch.sh"), "sft.stpes=3", f"output_root={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert "unknown config key 'sft.stpes'; did you mean steps" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("subcommand", ["run", "prep", "synthetic", "sft", "eval", "score", "report", "bench", "instruct", "ask", "chat"])
def test_every_subcommand_explains_itself(subcommand):
    result = subprocess.run([sys.executable, "-m", "stages.cli", subcommand, "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: vqa-rlhf " + subcommand in result.stdout


def test_unknown_subcommand_lists_the_real_ones():
    result = subprocess.run([sys.executable, "-m", "stages.cli", "trian"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "sft" in result.stderr


def test_without_autolabel_the_run_stops_after_sample_and_says_how_to_label_and_continue(tmp_path, monkeypatch,
                                                                                         capsys):
    from vlm import pipeline
    from vlm.config import load_config

    started = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda command: started.append(command[command.index("-m") + 1]) or 0)
    overrides = [f"output_root={tmp_path}", "name=people"]
    config = load_config(REPO / "configs/default.yaml", overrides)
    assert pipeline.run(config, "configs/default.yaml", ["prep", "sft", "sample", "rm", "ppo"], overrides, False) == 0
    assert started == ["stages.prep", "stages.sft", "stages.sample"]
    out = capsys.readouterr().out
    assert f"vqa-rlhf label --db {tmp_path / 'people' / 'labels' / 'labels.db'}" in out
    assert f"./launch.sh configs/default.yaml output_root={tmp_path} name=people --stages rm,ppo" in out


def test_a_changed_stage_setting_reruns_that_stage_and_the_later_ones_only(tmp_path, monkeypatch):
    """A PPO key changed: prep to rm are still done with this config; ppo and instruct run again.
    A shared key (model, data, eval, seed) reruns every stage."""
    from vlm import pipeline
    from vlm.config import load_config

    started = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda command: started.append(command[command.index("-m") + 1]) or 0)
    monkeypatch.setattr(pipeline, "build_report", lambda run_dir: {"stages": {}})
    monkeypatch.setattr(pipeline, "print_table", lambda report: None)
    monkeypatch.setattr(pipeline, "why_skip", lambda config, stage: None)
    stages = ["prep", "vision", "sft", "eval", "rm", "ppo", "instruct"]

    def run(*overrides):
        started.clear()
        overrides = [f"output_root={tmp_path}", "name=r", *overrides]
        assert pipeline.run(load_config(REPO / "configs/default.yaml", overrides), "c.yaml", stages, overrides, False) == 0
        return [module.removeprefix("stages.") for module in started]

    assert run() == ["prep", "vision", "sft", "evaluate", "rm", "ppo", "instruct"]
    assert run() == []
    assert run("ppo.kl_coef=0.5") == ["ppo", "instruct"]
    assert run("ppo.kl_coef=0.5", "sft.lr=5e-4") == ["sft", "evaluate", "rm", "ppo", "instruct"]
    assert run("ppo.kl_coef=0.5", "sft.lr=5e-4", "eval.batch_size=64") == \
        ["prep", "vision", "sft", "evaluate", "rm", "ppo", "instruct"]


def test_a_stage_resumes_its_own_checkpoints_but_never_those_of_another_config(tmp_path, monkeypatch):
    from vlm import pipeline
    from vlm.config import load_config

    monkeypatch.setattr(pipeline.subprocess, "call", lambda command: 0)
    checkpoints = tmp_path / "ppo-run" / "ppo" / "checkpoints"

    def run(*overrides):
        overrides = [f"output_root={tmp_path}", "name=ppo-run", *overrides]
        config = load_config(REPO / "configs/default.yaml", overrides)
        pipeline.run(config, "configs/default.yaml", ["ppo"], overrides, False)
        (tmp_path / "ppo-run" / "ppo" / "done.json").unlink()  # as if killed before it finished
        return pipeline.config_fingerprint(config, "ppo")

    first = run()
    (checkpoints / "checkpoint-20").mkdir(parents=True)
    run()  # same config: the checkpoint stays to be resumed from
    assert (checkpoints / "checkpoint-20").is_dir()
    run("ppo.kl_coef=0.5")  # another config: set aside, kept, and the stage starts fresh
    assert not checkpoints.exists()
    assert (checkpoints.parent / f"checkpoints-{first}" / "checkpoint-20").is_dir()
