"""What every stage script shares: its argument parser, config loading, a clean process end,
the decoding options of the interactive commands, and atomic JSON writes (vlm/files.py)."""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path

from vlm.config import ConfigError, DecodingConfig, RunConfig, load_config
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


def parse_model_stage_args(prog: str, doc: str, argv=None) -> tuple[RunConfig, Path]:
    """(config, model dir) of a stage that scores one saved model (caption-eval, retrieval-eval)."""
    parser = stage_parser(prog, doc)
    add_model_option(parser)
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    return config, model_dir_from(args, config)


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



def decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding options of the commands that answer a person (ask, chat, caption)."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); above 0: sampling at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where the model runs (default auto: CUDA when there is one, else the CPU); bf16 on "
                             "CUDA when the model was trained in bf16")


def decoding_config(args) -> DecodingConfig:
    import torch  # here: `--help` of these commands does not pay for torch

    torch.manual_seed(args.seed)
    if args.temperature > 0:
        return DecodingConfig(strategy="sample", temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens)
    return DecodingConfig(strategy="greedy", max_new_tokens=args.max_new_tokens)


def open_session(args, command: str):
    """A ChatSession on --model about --image (None: text only), or exit with the reason."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the answer, not library notices
    from transformers.utils import logging

    logging.disable_progress_bar()
    from vlm.chat import ChatSession

    try:
        session = ChatSession(args.model, decoding_config(args), args.device, command)
        session.set_image(args.image)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    return session
