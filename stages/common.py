"""Argument parsing and file writing shared by the stage scripts."""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path

from vlm.config import ConfigError, RunConfig, load_config
from vlm.files import DISK_FULL_ADVICE, is_disk_full, write_json  # noqa: F401  (stages import write_json from here)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"vqa-rlhf {prog}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                        help="YAML run config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. sft.lr=3e-4 data.max_train_samples=1000")
    # The DeepSpeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def run_stage(main, argv=None) -> int:
    """A training stage's entry point (`python -m stages.X`, also under torchrun / the DeepSpeed
    launcher): main(), and for a rank of a distributed run, a clean end of the process.

    Why a rank ends with os._exit: torch's gloo worker threads can still be destroying a finished
    async collective (ZeRO-3's parameter all-gathers) that holds a Python tensor; if the interpreter
    is finalizing by then, taking the GIL kills that thread inside a noexcept destructor, the rank
    aborts (std::terminate, SIGABRT) after all its work is done, and the launcher reports the run
    as failed (seen in about 1 run in 20 on this box; core dump: ~AsyncAllgatherWork in
    ProcessGroupGloo::runLoop during Py_FinalizeEx). Everything a stage writes is written and closed
    when main() returns, so the rank flushes its streams and exits without finalization.

    A full disk (ENOSPC, SQLite's "database or disk is full") ends the stage with one line that
    says so and how to continue, instead of a traceback from deep inside a save."""
    try:
        code = main(argv)
    except (OSError, sqlite3.OperationalError) as exc:
        if not is_disk_full(exc):
            raise
        where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else ""
        sys.exit(f"error: the disk is full{where} ({exc}); {DISK_FULL_ADVICE}")
    if "torch.distributed" not in sys.modules:  # never imported, so never initialized (autolabel, prep)
        return code
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model of the stages that read one saved model (eval, caption-eval, retrieval-eval)."""
    parser.add_argument("--model", help="saved model dir (default: <run>/sft/final)")


def model_dir_from(args, config: RunConfig) -> Path:
    return Path(args.model) if args.model else config.sft_final


def config_path_and_overrides(args) -> tuple[str, list[str]]:
    """`vqa-rlhf sft key=value` means the default config with that override."""
    config_path, overrides = args.config, list(args.overrides)
    if "=" in config_path:
        return str(DEFAULT_CONFIG), [config_path, *overrides]
    return config_path, overrides


def config_from_args(args) -> RunConfig:
    config_path, overrides = config_path_and_overrides(args)
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


def parse_stage_args(prog: str, doc: str, argv=None) -> RunConfig:
    parser = stage_parser(prog, doc)
    return config_from_args(parser.parse_intermixed_args(argv))

