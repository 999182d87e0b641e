"""SFT throughput and model FLOP utilisation (MFU) against this machine's measured fp32 matmul peak.

    vqa-rlhf bench [--models default,gpt2-124m] [--steps 20] [--threads N]

For each model (built from configs, random weights, no downloads) it times full
training steps (forward, backward, AdamW) on batches shaped like the real data,
and prints samples/s, tokens/s and achieved TFLOP/s as a share of the peak that
a large fp32 matmul reaches in the same process. FLOPs per step are counted
analytically: 6 x parameters x tokens for every matmul weight (vision tower on
its patches, projector and language model on the full sequence) plus 12 x
layers x seq^2 x width for attention scores.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from vlm.config import ModelConfig
from vlm.image_input import FEATURES, PIXELS, input_kind_of


@dataclass
class BenchModel:
    name: str
    model: ModelConfig
    vocab_size: int
    batch_size: int
    text_tokens: int  # prompt + answer tokens besides the image tokens
    # The built-in run's SFT: the tower frozen, its features read from the cache (vlm/features.py),
    # so a step runs the projector and the language model only.
    cached_features: bool = False


MODELS = {
    # The built-in default (configs/default.yaml): 48 px / 16 px patches -> 10 image tokens,
    # batch 32 of examples averaging ~48 text tokens (4 packed questions or a caption).
    "default": BenchModel("default", ModelConfig(), vocab_size=512, batch_size=32, text_tokens=48),
    "default-cached": BenchModel("default, cached tower", ModelConfig(), vocab_size=512, batch_size=32,
                                 text_tokens=48, cached_features=True),
    # GPT-2 124M + CLIP ViT-B/32 at 224 px (50 image tokens), shapes only: built from configs.
    "gpt2-124m": BenchModel(
        "gpt2-124m (ViT-B/32)",
        ModelConfig(text_layers=12, text_width=768, text_heads=12, max_positions=1024, vision_layers=12,
                    vision_width=768, vision_heads=12, image_size=224, patch_size=32, vision_feature_layer=-2),
        vocab_size=50258, batch_size=4, text_tokens=30,
    ),
}


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time is the work's (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(size: int = 2048, seconds: float = 2.0, device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of a square matmul in `dtype` on `device`: the ceiling MFU is measured against
    (fp32 on the CPU; bf16 on a GPU, where bf16 steps run on the tensor cores)."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def build(bench: BenchModel):
    """The model as vlm.model builds it from scratch, with a vocabulary of the bench's size."""
    from transformers import LlavaForConditionalGeneration

    from vlm.model import llava_config, scratch_configs

    vision, text = scratch_configs(bench.model, bench.vocab_size)
    return LlavaForConditionalGeneration(llava_config(
        vision, text, bench.vocab_size, image_token_id=bench.vocab_size - 1, eos_token_id=0, config=bench.model))


def batch_for(model, bench: BenchModel) -> dict:
    cfg = model.config
    image_tokens = cfg.image_seq_length
    text = torch.randint(0, bench.vocab_size - 1, (bench.batch_size, bench.text_tokens))
    image = torch.full((bench.batch_size, image_tokens), cfg.image_token_index)
    input_ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    labels = input_ids.clone()
    labels[:, : input_ids.shape[1] - 3] = -100  # a short answer at the end, as in VQA
    size = cfg.vision_config.image_size
    if bench.cached_features:
        images = {FEATURES.key: torch.randn(bench.batch_size, image_tokens, cfg.vision_config.hidden_size)}
    else:
        images = {PIXELS.key: torch.randn(bench.batch_size, 3, size, size)}
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, **images}


def forward(model, batch: dict):
    """The training forward; cached features enter through the projector as SFT feeds them."""
    kind = input_kind_of(batch)
    rest = {k: v for k, v in batch.items() if k != kind.key}
    return model(**rest, **kind.model_inputs(model, batch[kind.key]))


def step_flops(model, batch: dict) -> float:
    cfg = model.config
    batch_size, seq = batch["input_ids"].shape
    patches = cfg.image_seq_length
    params = dict(vision=0, projector=0, language=0)
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
            continue  # embeddings are lookups; biases and norms are negligible
        part = "vision" if "vision_tower" in name else "projector" if "projector" in name else "language"
        params[part] += p.numel()
    text, vision = cfg.text_config, cfg.vision_config
    vision_layers = vision.num_hidden_layers
    if input_kind_of(batch).cached:  # the tower does not run: its FLOPs are not the step's
        params["vision"], vision_layers = 0, 0
    matmul = 6 * batch_size * (params["vision"] * patches + params["projector"] * patches + params["language"] * seq)
    attention = 12 * batch_size * (text.n_layer * seq**2 * text.n_embd
                                   + vision_layers * patches**2 * vision.hidden_size)
    return float(matmul + attention)


def bench_model(bench: BenchModel, steps: int, warmup: int = 2, compile: bool = False,
                device: torch.device = torch.device("cpu"), bf16: bool = False) -> dict:
    """Median full training step. `bf16`: fp32 weights under bf16 autocast, as the HF Trainer's
    bf16=True trains (sft.bf16)."""
    torch.manual_seed(0)
    model = build(bench).to(device)
    model.train()
    if bench.cached_features:
        model.model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {key: value.to(device) for key, value in batch_for(model, bench).items()}
    step_forward = torch.compile(forward) if compile else forward
    warmup += 3 if compile else 0  # compilation happens in the first steps
    timings = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_forward(model, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    seconds = sorted(timings)[len(timings) // 2]  # median step
    batch_size, seq = batch["input_ids"].shape
    flops = step_flops(model, batch)
    return {"model": bench.name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "batch": batch_size, "seq": seq, "step_s": seconds, "samples_s": batch_size / seconds,
            "tokens_s": batch_size * seq / seconds, "tflops": flops / seconds / 1e12}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--models and --threads, as the model benchmarks (bench sft, bench ppo) spell them."""
    parser.add_argument("--models", default="default,default-cached,gpt2-124m", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def apply_model_options(parser: argparse.ArgumentParser, args) -> list[str]:
    """The --models names, each checked against MODELS; --threads applied to torch."""
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each model's step under torch.compile, as a second row")
    args = parser.parse_args(argv)
    names = apply_model_options(parser, args)
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak (2048^2, best of 2 s): {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"{'model':<30}{'params M':>9}{'batch':>6}{'seq':>5}{'s/step':>8}{'samples/s':>11}"
          f"{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}")
    runs = [(name, False) for name in names] + ([(name, True) for name in names] if args.compile else [])
    for name, compiled in runs:
        r = bench_model(MODELS[name], args.steps, compile=compiled)
        r["model"] += ", compiled" if compiled else ""
        print(f"{r['model']:<30}{r['params_m']:>9.1f}{r['batch']:>6}{r['seq']:>5}{r['step_s']:>8.3f}"
              f"{r['samples_s']:>11.1f}{r['tokens_s']:>10.0f}{r['tflops'] * 1e3:>9.1f}"
              f"{r['tflops'] * 1e12 / peak:>7.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
