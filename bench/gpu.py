"""The GPU benchmark: every stage's hot path on one GPU, real-size architectures, no downloads.

    vqa-rlhf bench gpu [--out bench-gpu.json] [--rows sft,sft-cached,...] [--budget 480] [--row-timeout 120]

Real sizes, built from configs with random weights (bench/sft_throughput.py MODELS):
GPT-2 124M + CLIP ViT-B/32 at 224 px, and GPT-2 774M (gpt2-large) + ViT-L/14 under ZeRO.
Each row runs in its own process (under the `deepspeed` or `accelerate launch` launcher
where it needs one) and prints its figure or its error; then the next row runs:

  sft          bf16 SFT step (124M + B/32, pixels): samples/s, tokens/s, MFU against the
               bf16 matmul peak measured in the same process
  sft-cached   the same with cached CLIP features (data.feature_cache): the tower does not run
  zero2, zero3 SFT steps of 774M + L/14 through the HF Trainer under `deepspeed --num_gpus 1`
               (configs/deepspeed/zero2.json, zero3.json), bf16: samples/s, peak memory
  ppo-zero2, ppo-zero3
               5 PPO updates (124M + B/32, pixels, bf16) under `accelerate launch --config_file
               configs/accelerate/zero2.yaml` (zero3.yaml): rollouts/s
  grpo         5 GRPO steps in bf16 through the stage's own code (rewards/group_rl.py, reward
               vqa_accuracy) on a real-size model over built-in 224 px images: steps/s
  eval         `vqa-rlhf eval`'s path (vlm/evaluation.py) on that model: questions/s and the
               generation's peak memory

All rows share --budget seconds (8 minutes); a row gets at most --row-timeout of them, and
rows left when the budget is spent are reported as not run. The table goes to --out as JSON. Without CUDA it says so in one line and exits 0: no figure
is measured, none estimated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = ("sft", "sft-cached", "zero2", "zero3", "ppo-zero2", "ppo-zero3", "grpo", "eval")
# GPT-2 124M + CLIP ViT-B/32 at 224 px (49 patch tokens), as bench/sft_throughput.py MODELS["gpt2-124m"]
B32 = dict(text_layers=12, text_width=768, text_heads=12, max_positions=1024, vision_layers=12, vision_width=768,
           vision_heads=12, image_size=224, patch_size=32, vision_feature_layer=-2)
# GPT-2 774M (gpt2-large) + CLIP ViT-L/14 at 224 px: 256 patch tokens.
LARGE = dict(text_layers=36, text_width=1280, text_heads=20, max_positions=1024, vision_layers=24,
             vision_width=1024, vision_heads=16, image_size=224, patch_size=14, vision_feature_layer=-2)
SFT_BATCH = 64  # 124M + B/32: 80 tokens per example
ZERO_BATCH = 8  # 774M + L/14: 286 tokens per example
PPO_BATCH = 64
UPDATES = 5


def launcher(row: str, result: Path) -> list[str]:
    """The command that runs one row in its own process, under its launcher."""
    own = ["-m", "bench.gpu", "--row", row, "--result", str(result)]
    if row in ("zero2", "zero3"):
        # the `deepspeed` launcher of this interpreter, found without PATH
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--module", *own[1:]]
    if row.startswith("ppo-"):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / f"{row.removeprefix('ppo-')}.yaml"), "--num_processes", "1",
                *own]
    return [sys.executable, *own]


def run_killable(command: list[str], timeout: int, **kwargs) -> tuple[int, str]:
    """(exit status, stderr or stdout) of a row's command. In its own process group, so that at the
    timeout the launcher and the workers it started die together and leave the GPU to the next row."""
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return process.returncode, err or out


def peak_memory_gib() -> float:
    """The most GPU memory torch held since the process started (or the last reset)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def sft_row(cached: bool) -> dict:
    import torch

    from vlm.model import pick_device
    from bench.sft_throughput import MODELS, bench_model, matmul_peak_flops

    device = pick_device("cuda")
    peak = matmul_peak_flops(8192, 3.0, device, torch.bfloat16)
    bench = dataclasses.replace(MODELS["gpt2-124m"], batch_size=SFT_BATCH, cached_features=cached)
    r = bench_model(bench, steps=20, warmup=3, device=device, bf16=True)
    return {"model": r["model"], "batch": r["batch"], "seq": r["seq"], "samples_s": round(r["samples_s"], 1),
            "tokens_s": round(r["tokens_s"]), "tflops": round(r["tflops"], 1),
            "bf16_matmul_peak_tflops": round(peak / 1e12, 1), "mfu": round(r["tflops"] * 1e12 / peak, 4),
            "peak_memory_gib": peak_memory_gib()}


def zero_row(stage: str) -> dict:
    """SFT steps of 774M + L/14 through the HF Trainer with the project's DeepSpeed config."""
    import torch
    from transformers import Trainer, TrainerCallback

    from vlm.config import ModelConfig, TrainConfig
    from vlm.train import training_arguments
    from bench.sft_throughput import BenchModel, batch_for, build

    bench = BenchModel("gpt2-774m (ViT-L/14)", ModelConfig(**LARGE), vocab_size=50258, batch_size=ZERO_BATCH,
                       text_tokens=30)
    torch.manual_seed(0)
    model = build(bench)
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 leaves each weight a placeholder
    batch = batch_for(model, bench)
    examples = [{key: value[i] for key, value in batch.items()} for i in range(bench.batch_size)] * 32
    steps, warmup = 10, 3
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    config = TrainConfig(steps=steps, batch_size=bench.batch_size, bf16=True, warmup_steps=0,
                         deepspeed=str(REPO / "configs" / "deepspeed" / f"{stage}.json"), logging_steps=10**6,
                         save_steps=10**6, eval_steps=0)
    args = training_arguments(config, Path(tempfile.mkdtemp()), 0, save_strategy="no", report_to=[],
                              disable_tqdm=True)
    collate = lambda rows: {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[StepTimer()]).train()
    step = sorted(times[warmup:])[len(times[warmup:]) // 2]
    return {"model": bench.name, "zero": stage, "batch": bench.batch_size, "seq": batch["input_ids"].shape[1],
            "params_m": round(params / 1e6, 1), "step_s": round(step, 3),
            "samples_s": round(bench.batch_size / step, 1), "peak_memory_gib": peak_memory_gib()}


def ppo_row(stage: str) -> dict:

    from bench.ppo_throughput import bench_model
    from bench.sft_throughput import MODELS

    r = bench_model(MODELS["gpt2-124m"], UPDATES, PPO_BATCH, max_new_tokens=8, ppo_epochs=2, mini_batches=2,
                    images="pixels", bf16=True)
    return {"model": r["model"], "zero": stage, "updates": UPDATES, "batch": r["batch"],
            "rollout_s": round(r["rollout_s"], 3), "update_s": round(r["update_s"], 3),
            "rollouts_s": round(r["total_sps"], 1), "peak_memory_gib": peak_memory_gib()}


def real_size_run(work: Path, overrides: list[str], test_images: int = 8):
    """A run config over built-in 224 px images and a saved 124M + B/32 model (random weights), for the
    rows that run the stages' own code. Its vocabulary is the built-in BPE's (512 tokens), not GPT-2's
    50,257: random weights over a padded vocabulary emit ids no tokenizer here can decode."""
    import torch

    from vlm.config import load_config
    from vlm.data import corpus
    from vlm.model import build_model, build_processor
    from data_prep.synthetic import SyntheticConfig, generate

    data = work / "data"
    generate(SyntheticConfig(image_size=B32["image_size"], train_images=40, val_images=8, test_images=test_images, rl_images=32),
             data, progress=False)
    dims = ["model.vision_model=null", *(f"model.{key}={value}" for key, value in B32.items())]
    config = load_config(REPO / "configs" / "default.yaml", [
        *dims, f"data.dir={data}", "data.feature_cache=null", f"output_root={work}", "name=bench", *overrides])
    torch.manual_seed(0)
    processor = build_processor(config.model, corpus(config))
    model = build_model(config.model, processor)
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    return config, work / "model"


def grpo_row() -> dict:

    from rewards.group_rl import train

    work = Path(tempfile.mkdtemp())
    config, model_dir = real_size_run(work, [
        "ppo.algo=grpo", "ppo.bf16=true", f"ppo.steps={UPDATES}", "ppo.batch_size=32", "ppo.num_generations=4",
        "ppo.reward=vqa_accuracy", f"ppo.policy={work / 'model'}", "ppo.save_steps=0", "ppo.resume=false"])
    metrics = train(config, work / "grpo")
    return {"model": "gpt2-124m (ViT-B/32)", "steps": metrics["updates"], "batch": config.ppo.batch_size,
            "train_seconds": metrics["seconds"], "steps_s": round(metrics["updates"] / metrics["seconds"], 3),
            "peak_memory_gib": peak_memory_gib()}


def eval_row() -> dict:
    import torch

    from vlm.evaluation import evaluate

    work = Path(tempfile.mkdtemp())
    config, model_dir = real_size_run(work, ["sft.bf16=true", "eval.batch_size=256", "eval.train_check_samples=0"],
                                      test_images=1000)  # 4,000 questions
    torch.cuda.reset_peak_memory_stats()
    metrics = evaluate(config, model_dir, "bench")
    return {"model": "gpt2-124m (ViT-B/32)", "questions": metrics["count"], "batch": config.eval.batch_size,
            "dtype": metrics["dtype"], "questions_s": metrics["samples_per_second"],
            "peak_memory_gib": peak_memory_gib()}


def run_row(row: str) -> dict:
    if row in ("sft", "sft-cached"):
        return sft_row(cached=row == "sft-cached")
    if row in ("zero2", "zero3"):
        return zero_row(row)
    if row.startswith("ppo-"):
        return ppo_row(row.removeprefix("ppo-"))
    return {"grpo": grpo_row, "eval": eval_row}[row]()


def row_line(row: str, result: dict) -> str:
    if "error" in result:
        return f"{row:<11} error: {result['error']}"
    return f"{row:<11} " + ", ".join(f"{key} {value}" for key, value in result.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"), help="the table as JSON")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--budget", type=int, default=480, help="seconds all rows may take together (default 480)")
    parser.add_argument("--row-timeout", type=int, default=120, help="seconds one row may take (default 120)")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, in the process a launcher starts
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
        return 0
    if args.row:  # inside a launcher: one row, its result (or error) to --result
        try:
            result = run_row(args.row)
        except Exception as exc:  # the row's error goes into the table; the bench goes on
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if int(os.environ.get("RANK", "0")) == 0:
            args.result.write_text(json.dumps(result))
        return 0

    rows = args.rows.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    gpu = torch.cuda.get_device_name(0)
    print(f"bench gpu: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; device cuda:0, dtype bfloat16",
          flush=True)
    table = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    deadline = time.perf_counter() + args.budget
    for row in rows:
        result_path = Path(tempfile.mkdtemp()) / "result.json"
        started = time.perf_counter()
        timeout = min(args.row_timeout, int(deadline - started))
        if timeout < 10:
            table["rows"][row] = {"error": f"not run: the {args.budget} s budget is spent"}
            print(row_line(row, table["rows"][row]), flush=True)
            continue
        try:
            status, output = run_killable(launcher(row, result_path), timeout, cwd=REPO, env=env)
            if result_path.is_file():
                result = json.loads(result_path.read_text())
            else:
                result = {"error": f"exit {status}: " + " | ".join(output.strip().splitlines()[-3:])}
        except subprocess.TimeoutExpired:
            result = {"error": f"timed out after {timeout} s"}
        except OSError as exc:  # the launcher itself is missing
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        table["rows"][row] = result
        print(row_line(row, result), flush=True)
        args.out.write_text(json.dumps(table, indent=2))  # after every row: a stopped bench keeps its rows
    print(f"bench gpu: table in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
