"""PPO throughput: rollout and update samples/s of the image-aware PPO trainer (stages/ppo.py).

    vqa-rlhf bench ppo [--models default,gpt2-124m] [--images pixels,features] [--updates 3] [--threads N]

For each model (built from configs, random weights, no downloads; the shapes of
bench/sft_throughput.py) it builds the policy, a reference copy, and a reward and a
value model on the same backbone, vision towers frozen (ppo.freeze_vision, the default),
then times the two halves of a PPO update:
  rollout: sampling ppo.max_new_tokens tokens with the image, then the policy,
           reference, value and reward forwards over prompt + answer;
  update:  advantages and ppo_epochs x mini_batches policy+value forward/backward/AdamW.
Each model runs once per image input: "pixels" (every model runs its CLIP tower) and
"features" (cached CLIP features, data.feature_cache: the towers never run), side by side.
Random weights rarely emit EOS, so every answer runs to the token limit: the worst case.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
from trl.experimental.ppo import PPOConfig as TRLPPOConfig

from vlm.image_input import FEATURES, PIXELS
from rewards.base import Reward
from rewards.ppo_trainer import PromptCollator, VisionPPOTrainer
from rewards.reward_model import RewardModel, RewardModelConfig
from bench.sft_throughput import MODELS, add_model_options, apply_model_options, build, synchronize


class _TokenIds:
    """What the trainer needs of a tokenizer here: the pad / EOS id (GPT-2: the same) and decoding
    (the texts go to the reward, which here does not read them)."""
    pad_token_id = eos_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["-"] * len(ids)


def model_forward_reward(reward_model, dataset, kind, answer_tokens: int):
    """What a learned reward (rewards/model_reward.py) costs: one reward-model forward per answer over
    its prompt + an answer of `answer_tokens` ids, with the image input, at the last token."""
    class ModelForward(Reward):
        def __init__(self):
            super().__init__()
            self.model = reward_model

        @torch.no_grad()
        def score(self, inputs):
            items = [dataset[int(i.record_id)] for i in inputs]
            ids = torch.tensor([item["input_ids"] + [9] * answer_tokens for item in items])
            device = next(self.model.parameters()).device
            images = torch.stack([item[kind.key] for item in items]).to(device)
            return self.model(ids.to(device), torch.ones_like(ids).to(device),
                              **kind.model_inputs(self.model, images)).cpu()

    return ModelForward()


def build_trainer(bench, batch_size: int, max_new_tokens: int, ppo_epochs: int, mini_batches: int, images: str,
                  bf16: bool = False):
    torch.manual_seed(0)
    policy = build(bench)
    config = policy.config
    reward = RewardModel(RewardModelConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"}))
    value = copy.deepcopy(reward)
    ref = copy.deepcopy(policy).eval()
    for model in (policy, value):
        model.model.vision_tower.requires_grad_(False)
    vision = config.vision_config
    kind = {"pixels": PIXELS, "features": FEATURES}[images]
    image_shape = {PIXELS: (3, vision.image_size, vision.image_size),
                   FEATURES: (1 + (vision.image_size // vision.patch_size) ** 2, vision.hidden_size)}[kind]
    prompt = lambda: ([5, 6, 7] + [config.image_token_index] * config.image_seq_length
                      + torch.randint(10, bench.vocab_size - 2, (bench.text_tokens - 6,)).tolist())
    dataset = [{"input_ids": prompt(), kind.key: torch.randn(image_shape),
                "reference": {"id": str(i), "image": str(i), "question": "", "answers": [], "caption": None}}
               for i in range(batch_size)]
    args = TRLPPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, num_mini_batches=mini_batches,
        num_ppo_epochs=ppo_epochs, total_episodes=batch_size * 1000, response_length=max_new_tokens,
        stop_token="eos", local_rollout_forward_batch_size=batch_size, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=bf16, num_sample_generations=0, disable_tqdm=True,
    )
    if bf16:  # trl's PPOTrainer builds its Accelerator() from the environment (rewards/ppo_run.py)
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    return VisionPPOTrainer(
        args=args, processing_class=_TokenIds(), model=policy, ref_model=ref,
        reward_model=model_forward_reward(reward, dataset, kind, max_new_tokens),
        value_model=value, train_dataset=dataset, eval_dataset=dataset, data_collator=PromptCollator(0),
        image_token_id=config.image_token_index, max_grad_norm=1.0, policy_input=kind, critic_input=kind,
    )


def bench_model(bench, updates: int, batch_size: int, max_new_tokens: int, ppo_epochs: int, mini_batches: int,
                images: str, bf16: bool = False) -> dict:
    trainer = build_trainer(bench, batch_size, max_new_tokens, ppo_epochs, mini_batches, images, bf16)
    device = trainer.accelerator.device
    batch = next(iter(trainer.dataloader))
    rollout_s, update_s = [], []
    for i in range(updates + 1):  # the first update warms up
        torch.manual_seed(i)
        synchronize(device)
        start = time.perf_counter()
        rollout = trainer.rollout(batch)
        synchronize(device)
        middle = time.perf_counter()
        with torch.no_grad():
            advantages, returns, values, _, _ = trainer.advantages(rollout)
        trainer.ppo_update(rollout, advantages, returns, values, i)
        synchronize(device)
        end = time.perf_counter()
        if i:
            rollout_s.append(middle - start)
            update_s.append(end - middle)
    rollout_t, update_t = sorted(rollout_s)[len(rollout_s) // 2], sorted(update_s)[len(update_s) // 2]
    return {"model": bench.name, "images": images, "batch": batch_size, "prompt": batch["input_ids"].shape[1],
            "answer_tokens": int(rollout["response_mask"].sum(1).float().mean()),
            "rollout_s": rollout_t, "update_s": update_t, "rollout_sps": batch_size / rollout_t,
            "update_sps": batch_size / update_t, "total_sps": batch_size / (rollout_t + update_t)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--images", default="pixels,features",
                        help="image inputs to time, comma-separated: pixels, features (cached CLIP features)")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per model (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rollouts per update (default: 64 for default, 8 for gpt2-124m)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--mini-batches", type=int, default=2)
    args = parser.parse_args(argv)
    names = apply_model_options(parser, args)
    image_inputs = args.images.split(",")
    if not set(image_inputs) <= {"pixels", "features"}:
        parser.error(f"--images: pixels and/or features, not {args.images!r}")
    print(f"PPO, {args.max_new_tokens} new tokens, {args.ppo_epochs} epochs x {args.mini_batches} minibatches, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<22}{'images':>9}{'batch':>6}{'prompt':>7}{'answer':>7}{'rollout s':>10}{'update s':>9}"
          f"{'rollout/s':>10}{'update/s':>9}{'samples/s':>10}{'vs pixels':>10}")
    for name in names:
        batch_size = args.batch_size or (64 if name == "default" else 8)
        pixels_sps = None
        for images in image_inputs:
            r = bench_model(MODELS[name], args.updates, batch_size, args.max_new_tokens, args.ppo_epochs,
                            args.mini_batches, images)
            pixels_sps = r["total_sps"] if images == "pixels" else pixels_sps
            speedup = f"{r['total_sps'] / pixels_sps:.2f}x" if pixels_sps else "-"
            print(f"{r['model']:<22}{images:>9}{r['batch']:>6}{r['prompt']:>7}{r['answer_tokens']:>7}"
                  f"{r['rollout_s']:>10.3f}{r['update_s']:>9.3f}{r['rollout_sps']:>10.1f}{r['update_sps']:>9.1f}"
                  f"{r['total_sps']:>10.1f}{speedup:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
