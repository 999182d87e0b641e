"""Killed anywhere, a stage finishes the same: each stage SIGKILLed mid-way in a child process, run
again, and compared with a run that was never interrupted (the pattern of the SFT and PPO resume
tests in test_sft.py / test_ppo.py). The whole pipeline under random kills: `vqa-rlhf bench chaos`.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO
from safetensors.torch import load_file

DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

# `python -c` body: argv = kill_at module args... Runs `module.main(args)`; with kill_at > 0 the
# process SIGKILLs itself at the end of that training step (every HF-Trainer stage has a
# TrainingClock callback), after the checkpoint of the step before and before any of its own.
KILL_AT_STEP = """
import importlib, os, signal, sys
from vlm.train import TrainingClock

kill_at = int(sys.argv[1])
if kill_at:
    step_end = TrainingClock.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        step_end(self, args, state, control, **kwargs)
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    TrainingClock.on_step_end = on_step_end
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
"""

# `python -c` body: argv = module args... The process SIGKILLs itself right after the label store
# committed its first batch of samples.
KILL_AFTER_FIRST_SAMPLES = """
import importlib, os, signal, sys
from rewards.label_store import LabelStore

add_samples = LabelStore.add_samples

def add_then_die(self, *args, **kwargs):
    result = add_samples(self, *args, **kwargs)
    if result["added"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

LabelStore.add_samples = add_then_die
sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
"""


# `python -c` body: argv = module args... The process SIGKILLs itself when the stage starts to save
# its final model, after the checkpoint of its last step.
KILL_IN_FINAL_SAVE = """
import importlib, os, signal, sys
import vlm.train

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

vlm.train.save_final = die
sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))
"""


def child(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # each run logs next to its own output
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two safetensors files (bit for bit)."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


def clock_at(checkpoint: Path) -> float:
    """Training seconds counted up to a checkpoint (TrainingClock's entry in trainer_state.json)."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    (entry,) = [v for k, v in saved.items() if k in ("TrainingClock", "HeldOutAccuracy")]
    return entry["attributes"]["seconds"]


def without(metrics: dict, *keys) -> dict:
    return {k: v for k, v in metrics.items() if k not in keys}


# --- reward model --------------------------------------------------------------------------------

def test_rm_killed_mid_training_resumes_to_bit_identical_weights_and_metrics_counting_seconds_across_the_kill(
        saved_tiny_model, tiny_data_dir, tiny_overrides, tmp_path):
    from test_reward_model import planted_labels

    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    args = [DEFAULT_CONFIG, *tiny_overrides, "rm.steps=6", "rm.save_steps=2", "rm.save_total_limit=5",
            "rm.batch_size=8", "rm.logging_steps=1", "rm.warmup_steps=0", "--labels", labels,
            "--base", saved_tiny_model]
    straight = child(KILL_AT_STEP, 0, "stages.rm", *args, "--out", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = child(KILL_AT_STEP, 5, "stages.rm", *args, "--out", tmp_path / "b")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    resumed = child(KILL_AT_STEP, 0, "stages.rm", *args, "--out", tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"rm: resuming from {checkpoints / 'checkpoint-4'}" in resumed.stdout

    assert not same_tensors(tmp_path / "a" / "final" / "model.safetensors", tmp_path / "b" / "final" / "model.safetensors")
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    # accuracy, AUC, per-group figures, baselines and the mean training loss of all 6 steps
    assert without(a, "seconds", "checkpoint") == without(b, "seconds", "checkpoint")
    assert b["steps"] == 6 and b["seconds"] > clock_at(checkpoints / "checkpoint-4") > 0


# --- instruction tuning --------------------------------------------------------------------------

def test_instruct_killed_mid_training_resumes_to_bit_identical_weights_and_counts_seconds_across_the_kill(
        tiny_model, tiny_processor, tiny_overrides, tmp_path):
    init = tmp_path / "init"
    tiny_model.save_pretrained(init)
    tiny_processor.save_pretrained(init)
    args = [DEFAULT_CONFIG, *tiny_overrides, f"instruct.init_from={init}", "instruct.steps=6",
            "instruct.batch_size=4", "instruct.save_steps=2", "instruct.save_total_limit=5",
            "instruct.logging_steps=1", "instruct.warmup_steps=0", "instruct.max_train_samples=16",
            "instruct.describe_samples=2", "instruct.describe_max_new_tokens=4", "eval.max_samples=4",
            "model.dropout=0.1"]  # dropout in play: the RNG state must be restored too
    straight = child(KILL_AT_STEP, 0, "stages.instruct", *args, "name=a")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = child(KILL_AT_STEP, 5, "stages.instruct", *args, "name=b")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    work = tmp_path / "b" / "instruct"
    resumed = child(KILL_AT_STEP, 0, "stages.instruct", *args, "name=b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"instruct: resuming from {work / 'checkpoints' / 'checkpoint-4'}" in resumed.stdout

    different = same_tensors(tmp_path / "a" / "instruct" / "final" / "model.safetensors",
                             work / "final" / "model.safetensors")
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    a = json.loads((tmp_path / "a" / "instruct" / "metrics.json").read_text())
    b = json.loads((work / "metrics.json").read_text())
    for key in ("vqa_accuracy_before", "vqa_accuracy_after", "description_precision", "train_loss", "steps"):
        assert a[key] == b[key], key
    # Training time counts the steps before the kill (up to checkpoint-4) and after it; the
    # stage's seconds are that plus the evaluations of the last start.
    assert b["train_seconds"] > clock_at(work / "checkpoints" / "checkpoint-4") > 0
    assert b["seconds"] > b["train_seconds"]


# --- sampling answers for labeling ---------------------------------------------------------------

def test_sample_killed_after_its_first_batch_resumes_to_the_same_candidates(saved_tiny_model, tiny_data_dir,
                                                                              tmp_path):
    def argv(db: Path):
        return ["--model", saved_tiny_model, "--data", tiny_data_dir, "--split", "train", "--db", db,
                "--max-questions", "8", "--k", "3", "--batch-size", "2", "--temperature", "1.5"]

    def candidates(db: Path) -> list:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT question_id, answer, greedy FROM samples ORDER BY question_id, answer").fetchall()

    straight = child(KILL_AT_STEP, 0, "stages.sample", *argv(tmp_path / "a" / "labels.db"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = child(KILL_AFTER_FIRST_SAMPLES, "stages.sample", *argv(tmp_path / "b" / "labels.db"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first_batch = {row[0] for row in candidates(tmp_path / "b" / "labels.db")}
    assert len(first_batch) == 2  # one batch of two questions was stored before the kill

    resumed = child(KILL_AT_STEP, 0, "stages.sample", *argv(tmp_path / "b" / "labels.db"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "sample.json").read_text())["skipped_already_sampled"] == 2
    # The answers sampled after the resume are those an uninterrupted run samples (each batch
    # draws from its own seed), and nothing of the first batch is stored twice.
    assert candidates(tmp_path / "b" / "labels.db") == candidates(tmp_path / "a" / "labels.db")


# --- a kill after the last step, while the final model is being saved ---------------------------

def test_sft_killed_while_saving_its_final_model_resumes_without_a_step_more(tiny_overrides, tmp_path):
    """Found by the chaos benchmark: resumed from the checkpoint of its last step, the stock Trainer
    took one step more (steps 5 of 4) and the run ended with other weights and figures."""
    args = [DEFAULT_CONFIG, *tiny_overrides, "sft.steps=4", "sft.save_steps=2"]
    straight = child(KILL_AT_STEP, 0, "stages.sft", *args, "name=a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = child(KILL_IN_FINAL_SAVE, "stages.sft", *args, "name=b")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    work = tmp_path / "b" / "sft"
    assert (work / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (work / "final").exists()

    resumed = child(KILL_AT_STEP, 0, "stages.sft", *args, "name=b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not same_tensors(tmp_path / "a" / "sft" / "final" / "model.safetensors", work / "final" / "model.safetensors")
    a = json.loads((tmp_path / "a" / "sft" / "metrics.json").read_text())
    b = json.loads((work / "metrics.json").read_text())
    assert b["steps"] == a["steps"] == 4 and b["train_loss"] == a["train_loss"]
    assert b["seconds"] == round(clock_at(work / "checkpoints" / "checkpoint-4"), 2) > 0
