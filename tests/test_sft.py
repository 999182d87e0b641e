"""The SFT stage (stages/sft.py) as a specification, on the tiny model and the tiny dataset.

Every run here is a real `stages.sft.train` run (HF Trainer, checkpoints, final save) of a
few steps on CPU; what a run changed is seen through a TrainerCallback that snapshots the
parameters when training begins and ends.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from transformers import TrainerCallback

from vlm.config import load_config
from vlm.train import last_complete_checkpoint, model_part
from stages import sft

DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

# `python -c` body for runs in a child process: argv = kill_at_step config overrides...
# A kill_at_step of 0 means "run to the end". SIGKILL cannot be caught: nothing of ours runs
# after it, as in an OOM kill or a pulled plug.
TRAIN_SCRIPT = """
import os, signal, sys
from transformers import TrainerCallback
from stages import sft
from vlm.config import load_config

kill_at = int(sys.argv[1])

class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

sft.train(load_config(sys.argv[2], sys.argv[3:]), callbacks=[KillAtStep()])
"""


@pytest.fixture(autouse=True)
def _tensorboard_in_tmp(monkeypatch, tmp_path):
    # Each run of a test logs into its own tmp dir; the variable is restored afterwards.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tensorboard"))


class Snapshot(TrainerCallback):
    """Copies of every parameter when training begins and when it ends (before the final save)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.modules = {n: m for n, m in model.named_modules()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(self) -> set[str]:
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


def run(overrides: list[str], *extra: str, callbacks=()):
    config = load_config(DEFAULT_CONFIG, [*overrides, *extra])
    return config, sft.train(config, callbacks=list(callbacks))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # the child logs next to its own run
    return env


def run_child(overrides: list[str], kill_at_step: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(kill_at_step), str(DEFAULT_CONFIG), *overrides],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )


def load_stock(final_dir: Path):
    """The final model through stock transformers only, with nothing missing or left over."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(final_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model, AutoProcessor.from_pretrained(final_dir)


def losses(metrics: dict) -> list[float]:
    return [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]


# --- a full SFT run ---------------------------------------------------------------------------

def test_sft_run_saves_a_stock_loadable_model_and_metrics_and_the_loss_goes_down(tiny_overrides):
    snapshot = Snapshot()
    config, metrics = run(tiny_overrides, "sft.steps=30", "sft.save_steps=30", "sft.logging_steps=1",
                          callbacks=[snapshot])
    work = config.run_dir / "sft"

    model, processor = load_stock(work / "final")
    assert "<image>" in processor.tokenizer.get_vocab()
    assert json.loads((work / "final" / "training_config.json").read_text())["sft"]["steps"] == 30
    # The saved weights are the trained ones.
    for name, param in model.named_parameters():
        assert torch.equal(param, snapshot.after[name]), name
    assert not torch.equal(model.lm_head.weight, snapshot.before["lm_head.weight"])

    on_disk = json.loads((work / "metrics.json").read_text())
    assert on_disk["steps"] == metrics["steps"] == 30
    assert on_disk["examples"] == metrics["examples"] > 0
    assert on_disk["rejected"] == metrics["rejected"]
    assert math.isfinite(on_disk["train_loss"])

    curve = losses(metrics)
    assert len(curve) == 30
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.25, f"loss did not go down: first 5 steps {first:.3f}, last 5 steps {last:.3f}"

    # One process consumes one per-device batch per step (the reference for the DeepSpeed test).
    epoch = metrics["log_history"][-1]["epoch"]
    assert epoch == pytest.approx(30 / math.ceil(metrics["examples"] / config.sft.batch_size))


# --- resume after a kill ----------------------------------------------------------------------

def test_a_run_killed_and_resumed_ends_with_bit_identical_weights_to_an_uninterrupted_run(tmp_path, tiny_overrides):
    run_overrides = [*tiny_overrides, "sft.steps=6", "sft.save_steps=2", "sft.save_total_limit=5",
                     # dropout and caption sampling in play, so RNG state must be restored too
                     "model.dropout=0.1", "data.caption_ratio=0.25"]
    a = [*run_overrides, f"output_root={tmp_path / 'a'}"]
    b = [*run_overrides, f"output_root={tmp_path / 'b'}"]

    uninterrupted = run_child(a)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed = run_child(b, kill_at_step=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "b" / "tiny" / "sft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "b" / "tiny" / "sft" / "final").exists()
    # A kill in the middle of writing checkpoint-5 leaves a newer dir without trainer_state.json
    # and with a truncated weights file: it must be ignored.
    half = checkpoints / "checkpoint-5"
    shutil.copytree(checkpoints / "checkpoint-4", half)
    (half / "trainer_state.json").unlink()
    weights = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    resumed = run_child(b)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints / 'checkpoint-4'}" in resumed.stdout

    final_a = load_file(tmp_path / "a" / "tiny" / "sft" / "final" / "model.safetensors")
    final_b = load_file(tmp_path / "b" / "tiny" / "sft" / "final" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    different = [k for k in final_a if not torch.equal(final_a[k], final_b[k])]
    assert not different, f"{len(different)} of {len(final_a)} tensors differ, e.g. {different[:3]}"
    # The resumed run did train from checkpoint-4 on: its log continues at steps 5 and 6.
    metrics_b = json.loads((tmp_path / "b" / "tiny" / "sft" / "metrics.json").read_text())
    metrics_a = json.loads((tmp_path / "a" / "tiny" / "sft" / "metrics.json").read_text())
    assert metrics_b["steps"] == 6
    assert losses(metrics_b) == losses(metrics_a)
    # The figures of the report are those of the uninterrupted run: the mean loss over all six
    # steps (not over the two after the resume), and training seconds that count the steps before
    # the kill (the clock, HeldOutAccuracy, saved with checkpoint-4) as well as those after it.
    assert metrics_b["train_loss"] == metrics_a["train_loss"]
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert metrics_b["seconds"] > state["stateful_callbacks"]["HeldOutAccuracy"]["attributes"]["seconds"] > 0


def test_a_checkpoint_without_trainer_state_is_never_resumed_from(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert last_complete_checkpoint(checkpoints) is None  # no dir yet
    checkpoints.mkdir()
    assert last_complete_checkpoint(checkpoints) is None  # empty dir
    for step, complete in [(2, True), (10, True), (12, False), (20, False)]:
        path = checkpoints / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"weights")
        if complete:
            (path / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-final").mkdir()  # not a step number
    (checkpoints / "checkpoint-final" / "trainer_state.json").write_text("{}")
    # Newest by step number (10 > 2, not by name), skipping the ones cut short.
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-10")


# --- LoRA / QLoRA -----------------------------------------------------------------------------

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def lora_delta(snapshot: Snapshot, module: str, config) -> torch.Tensor:
    """What merging adds to a GPT-2 Conv1D weight (stored in x out, hence the transpose)."""
    a = snapshot.after[f"{module}.lora_A.default.weight"]
    b = snapshot.after[f"{module}.lora_B.default.weight"]
    return (b @ a).T * (config.sft.lora.alpha / config.sft.lora.r)


def test_lora_trains_only_adapters_and_the_projector_and_saves_a_merged_stock_model(tiny_overrides):
    snapshot = Snapshot()
    config, metrics = run(tiny_overrides, "sft.lora.enabled=true", "sft.steps=3", "sft.save_steps=3",
                          callbacks=[snapshot])
    changed = snapshot.changed()
    names = set(snapshot.before)

    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert lora and lora <= changed  # every adapter matrix trained (B from zero, then A)
    projector = {n for n in names if model_part(n) == "projector" and ".modules_to_save." in n}
    assert projector and projector <= changed  # the projector is trained fully
    # Everything else in the language model and projector stays as it was: GPT-2's own
    # weights (wte, wpe, blocks, ln_f, lm_head) and the projector's frozen original copy.
    base_gpt2 = {n for n in names if model_part(n) == "language" and n not in lora}
    assert {n.split(".")[-2] for n in base_gpt2} >= {"wte", "wpe", "ln_f", "lm_head", "base_layer"}
    assert not base_gpt2 & changed
    assert not {n for n in names if ".original_module." in n} & changed
    assert changed <= lora | projector | {n for n in names if model_part(n) == "vision" and ".modules_to_save." in n}

    final_dir = config.run_dir / "sft" / "final"
    model, _ = load_stock(final_dir)
    saved = dict(model.named_parameters())
    assert not any("lora" in n for n in saved)
    prefix = "base_model.model."
    for layer in range(config.model.text_layers):
        for target in LORA_TARGETS:
            module = f"{prefix}model.language_model.h.{layer}.{target}"
            merged = snapshot.before[f"{module}.base_layer.weight"] + lora_delta(snapshot, module, config)
            torch.testing.assert_close(saved[f"model.language_model.h.{layer}.{target}.weight"], merged)
    for name in ("linear_1.weight", "linear_2.bias"):
        trained = snapshot.after[f"{prefix}model.multi_modal_projector.modules_to_save.default.{name}"]
        assert torch.equal(saved[f"model.multi_modal_projector.{name}"], trained)
    assert (config.run_dir / "sft" / "final-adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_gpt2_projections_trains_on_cpu_and_saves_a_merged_full_precision_model(
    tiny_overrides, bits
):
    import bitsandbytes as bnb

    snapshot = Snapshot()
    config, metrics = run(tiny_overrides, "sft.lora.enabled=true", f"sft.lora.quantize_bits={bits}",
                          "sft.steps=3", "sft.save_steps=3", callbacks=[snapshot])
    assert metrics["steps"] == 3 and all(math.isfinite(x) for x in losses(metrics))

    # What bitsandbytes quantized: exactly GPT-2's Conv1D projections in every block (transformers
    # converts Conv1D to bnb Linear layers). Embeddings, lm_head, LayerNorms, the projector and the
    # vision tower stay in full precision.
    quantized_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = {n for n, m in snapshot.modules.items() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    prefix = "base_model.model.model.language_model.h"
    expected = {f"{prefix}.{layer}.{t}.base_layer" for layer in range(config.model.text_layers) for t in LORA_TARGETS}
    assert quantized == expected
    assert all(isinstance(snapshot.modules[n], quantized_cls) for n in quantized)
    storage = torch.uint8 if bits == 4 else torch.int8
    assert all(snapshot.before[f"{n}.weight"].dtype == storage for n in quantized)

    changed = snapshot.changed()
    lora = {n for n in snapshot.before if ".lora_A." in n or ".lora_B." in n}
    assert lora and lora <= changed
    assert not {f"{n}.weight" for n in quantized} & changed  # the quantized base stays frozen

    final_dir = config.run_dir / "sft" / "final"
    assert "quantization_config" not in json.loads((final_dir / "config.json").read_text())
    model, _ = load_stock(final_dir)
    saved = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in saved.values())
    # Merged into the full-precision base the quantized model was made from.
    base = load_file(config.run_dir / "sft" / "base-model" / "model.safetensors")
    for layer in range(config.model.text_layers):
        for target in LORA_TARGETS:
            module = f"{prefix}.{layer}.{target}"
            original = base[f"language_model.model.h.{layer}.{target}.weight"]
            torch.testing.assert_close(saved[f"model.language_model.h.{layer}.{target}.weight"],
                                       original + lora_delta(snapshot, module, config))


# --- freezing ---------------------------------------------------------------------------------

def test_freeze_vision_keeps_the_vision_tower_unchanged_while_the_rest_trains(tiny_overrides):
    snapshot = Snapshot()
    config, _ = run(tiny_overrides, "sft.freeze_vision=true", "sft.steps=2", "sft.save_steps=2", callbacks=[snapshot])
    parts = {part: {n for n in snapshot.before if model_part(n) == part} for part in ("vision", "projector", "language")}
    changed = snapshot.changed()
    assert parts["vision"] and not parts["vision"] & changed
    assert parts["projector"] <= changed
    assert "lm_head.weight" in changed and "model.language_model.h.0.attn.c_attn.weight" in changed
    # ...and the saved model carries the untouched vision tower.
    model, _ = load_stock(config.run_dir / "sft" / "final")
    for name, param in model.named_parameters():
        if model_part(name) == "vision":
            assert torch.equal(param, snapshot.before[name]), name


# --- bad records ------------------------------------------------------------------------------

BAD_RECORDS = {
    "empty_question": ({"question": "   "}, "field 'question' is empty"),
    "nine_answers": (None, "must list 10 answers, got 9"),
    "missing_image": ({"image": "images/train/no-such-image.png"}, "image not found"),
}


def bad_dataset(source: Path, target: Path, kinds: list[str]) -> tuple[Path, dict[str, str]]:
    """A copy of the tiny dataset whose first train records are broken, one per kind; returns
    the dataset dir and {record id: expected reason}."""
    from datasets import Dataset, load_from_disk

    shutil.copytree(source, target, ignore=lambda d, names: ["vqa"] if Path(d) == source else [])
    vqa = load_from_disk(str(source / "vqa"))
    rows = vqa["train"].to_list()
    expected = {}
    for row, kind in zip(rows, kinds):
        change, reason = BAD_RECORDS[kind]
        row.update(change or {"answers": row["answers"][:9]})
        expected[row["id"]] = reason
    vqa["train"] = Dataset.from_list(rows, features=vqa["train"].features)
    vqa.save_to_disk(str(target / "vqa"))
    return target, expected


def test_bad_records_are_skipped_counted_and_written_to_rejects_jsonl(tiny_overrides, tiny_data_dir, tmp_path):
    data_dir, expected = bad_dataset(tiny_data_dir, tmp_path / "bad-data", list(BAD_RECORDS))
    config, metrics = run(tiny_overrides, f"data.dir={data_dir}", "data.caption_ratio=0",
                          "data.on_bad_record=skip", "sft.steps=1", "sft.save_steps=1")
    rejects = [json.loads(line) for line in (config.run_dir / "sft" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} == set(expected)
    for record in rejects:
        assert expected[record["id"]] in record["reason"]
        assert record["source_file"].endswith("vqa/train")
    from datasets import load_from_disk

    n_train = len(load_from_disk(str(data_dir / "vqa"))["train"])
    assert metrics["rejected"] == 3
    assert metrics["examples"] == n_train - 3
    assert json.loads((config.run_dir / "sft" / "metrics.json").read_text())["rejected"] == 3


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_on_bad_record_error_stops_with_a_message_naming_the_record(tiny_overrides, tiny_data_dir, tmp_path, kind):
    data_dir, expected = bad_dataset(tiny_data_dir, tmp_path / "bad-data", [kind])
    (record_id, reason), = expected.items()
    with pytest.raises(ValueError, match=f"record {record_id}: .*{reason}"):
        run(tiny_overrides, f"data.dir={data_dir}", "data.caption_ratio=0", "data.on_bad_record=error")
    assert not (tmp_path / "tiny" / "sft" / "checkpoints").exists()  # it stopped before training


# --- DeepSpeed --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_zero_on_two_cpu_processes_shares_the_batches_between_ranks(tiny_overrides, tmp_path, zero):
    # 64 VQA examples, per-device batch 4: one process needs 16 steps per epoch, two ranks that
    # really split the data need 8. So 8 steps must be exactly one epoch (a single process
    # would be at epoch 0.5 -- see the first test). Under ZeRO-3 each rank holds only a slice
    # of every weight: the final model must still be saved whole.
    examples, batch, steps = 64, 4, 8
    env = child_env()
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vqa-rlhf" / "torch_extensions"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "stages.sft", str(DEFAULT_CONFIG), *tiny_overrides,
        f"data.max_train_samples={examples}", "data.caption_ratio=0", f"sft.batch_size={batch}",
        f"sft.steps={steps}", f"sft.save_steps={steps}", f"sft.deepspeed=configs/deepspeed/{zero}.json",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])

    work = tmp_path / "tiny" / "sft"
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["examples"] == examples and metrics["steps"] == steps
    state = json.loads((work / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert state["epoch"] == pytest.approx(steps * batch * 2 / examples) == pytest.approx(1.0)
    logged = [e for e in metrics["log_history"] if "loss" in e]
    assert [e["epoch"] for e in logged] == pytest.approx([(i + 1) / steps for i in range(steps)])
    # A DeepSpeed checkpoint (engine + ZeRO optimizer states) and a stock-loadable final model.
    assert (work / "checkpoints" / f"checkpoint-{steps}" / f"global_step{steps}").is_dir()
    model, _ = load_stock(work / "final")  # fails on 0-element (still partitioned) tensors
    saved = load_file(work / "final" / "model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters())
