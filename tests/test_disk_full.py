"""A full disk (ENOSPC) during a checkpoint, a metrics file or a label write: a clear error, nothing
written before it damaged, and the run continues once there is space again.

The disk fills up for real where the tests may mount a size-limited tmpfs (root), and by
injection everywhere: an OSError(ENOSPC) from the writer, as the kernel raises it, and for the
label store SQLite's own page limit, which fails a write the same way a full disk does
(SQLITE_FULL, "database or disk is full"). The real one matters: on a full disk torch.save raises
a RuntimeError that does not say ENOSPC (vlm.files.writing turns it into one).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from vlm.files import is_disk_full, write_json
from vlm.train import last_complete_checkpoint

DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


@pytest.fixture(autouse=True)
def _tensorboard_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tensorboard"))


def disk_full_for(paths_containing: str):
    """torch.save that fails like a full disk for files whose path contains `paths_containing`
    (after the checkpoint's weights were written: the half-written case)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if paths_containing in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    return save


def test_a_full_disk_during_an_sft_checkpoint_is_one_clear_error_and_the_run_resumes_once_there_is_space(
        tiny_overrides, tmp_path, monkeypatch, capsys):
    from vlm.stage_cli import run_stage
    from stages import sft

    overrides = [*tiny_overrides, "sft.steps=6", "sft.save_steps=2", "sft.save_total_limit=5"]
    assert run_stage(sft.main, [str(DEFAULT_CONFIG), *overrides, "name=straight"]) == 0

    argv = [str(DEFAULT_CONFIG), *overrides, "name=full"]
    checkpoints = tmp_path / "full" / "sft" / "checkpoints"
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", disk_full_for("checkpoint-4"))
        with pytest.raises(SystemExit) as stopped:
            run_stage(sft.main, argv)
    message = str(stopped.value.code)
    assert message.startswith("error: the disk is full while writing ") and "checkpoint-4" in message
    assert "free space and run the same command again" in message
    # checkpoint-4 is half there (weights, no optimizer, no trainer_state.json): never resumed from.
    assert (checkpoints / "checkpoint-4" / "model.safetensors").is_file()
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-2")
    assert not (tmp_path / "full" / "sft" / "final").exists()
    capsys.readouterr()

    assert run_stage(sft.main, argv) == 0  # space is back
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in capsys.readouterr().out
    a = load_file(tmp_path / "straight" / "sft" / "final" / "model.safetensors")
    b = load_file(tmp_path / "full" / "sft" / "final" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((tmp_path / "full" / "sft" / "metrics.json").read_text())["steps"] == 6


def disk_bytes(directory: Path, leave_out=()) -> int:
    """What the files under `directory` take on a tmpfs (whole pages), without those under `leave_out`."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in directory.rglob("*")
               if f.is_file() and not any(part in leave_out for part in f.relative_to(directory).parts))


@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a size-limited tmpfs: mount(bytes), remount(bytes). Needs root; skipped elsewhere."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")

    def mount(size: int, *options: str):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs",
                               str(mountpoint)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    yield mountpoint, mount
    # lazily: the TensorBoard writer of the in-process runs may still hold a file open there
    subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True)


def test_a_really_full_disk_during_an_sft_checkpoint_is_one_clear_error_and_the_run_resumes_once_there_is_space(
        tiny_overrides, tmp_path, small_disk, capsys):
    from vlm.stage_cli import run_stage
    from stages import sft

    overrides = [*tiny_overrides, "sft.steps=6", "sft.save_steps=2", "sft.save_total_limit=5"]
    assert run_stage(sft.main, [str(DEFAULT_CONFIG), *overrides, "name=straight"]) == 0
    straight = tmp_path / "straight" / "sft"
    # Room for everything the run writes before checkpoint-4, and for half of checkpoint-4.
    size = disk_bytes(straight, {"checkpoint-4", "checkpoint-6", "final", "metrics.json"}) \
        + disk_bytes(straight / "checkpoints" / "checkpoint-4") // 2
    mountpoint, mount = small_disk
    mount(size)
    argv = [str(DEFAULT_CONFIG), *overrides, f"output_root={mountpoint}", "name=full"]
    with pytest.raises(SystemExit) as stopped:
        run_stage(sft.main, argv)
    message = str(stopped.value.code)
    assert message.startswith("error: the disk is full while writing ") and "No space left on device" in message
    checkpoints = mountpoint / "full" / "sft" / "checkpoints"
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-2")
    capsys.readouterr()

    mount(64 * 2**20, "remount")  # space is back
    assert run_stage(sft.main, argv) == 0
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in capsys.readouterr().out
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(mountpoint / "full" / "sft" / "final" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_full_disk_while_writing_a_json_file_keeps_the_old_file_and_leaves_no_staging_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 70.0})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as raised:
        write_json(path, {"accuracy": 71.0})
    assert is_disk_full(raised.value)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"accuracy": 70.0}
    assert list(tmp_path.iterdir()) == [path]


def test_a_full_label_store_answers_507_keeps_every_stored_label_and_takes_labels_again_once_there_is_space(
        tmp_path):
    from test_label_app import Server, make_dataset, post_label

    from rewards.label_store import LabelStore

    with LabelStore(tmp_path / "labels.db", create=True) as store:
        store.add_samples(tmp_path / "data", make_dataset(tmp_path / "data", 20))
    server = Server(tmp_path / "labels.db")
    try:
        # The disk is full: the store's file cannot grow by a single page.
        pages = server.store._db.execute("PRAGMA page_count").fetchone()[0]
        server.store._db.execute(f"PRAGMA max_page_count = {pages}")
        stored, status = [], 201
        for attempt in range(5000):
            status, data = post_label(server, attempt % 20 + 1, labeler=f"labeler-{attempt}")
            if status != 201:
                break
            stored.append(json.loads(data)["label_id"])
        assert status == 507, data
        assert "disk is full" in json.loads(data)["error"] and "nothing was stored" in json.loads(data)["error"]

        # Every acknowledged label is there, the refused one is not, the file is sound.
        labels = {row["id"] for row in server.store.all_labels()}
        assert labels == set(stored)
        assert server.store.check_integrity() == "ok"

        server.store._db.execute(f"PRAGMA max_page_count = {pages * 100}")  # space is back
        status, data = post_label(server, attempt % 20 + 1, labeler=f"labeler-{attempt}")
        assert status == 201, data
    finally:
        server.close()
    with sqlite3.connect(tmp_path / "labels.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == len(stored) + 1
