"""GRPO and RLOO (trl 1.12) against the same rewards: `vqa-rlhf ppo ppo.algo=grpo|rloo`.

Both trainers in trl 1.12 take vision-language models natively: a conversational
`prompt` with an image part plus an `image` column; the processor (our LlavaProcessor
with its chat template) expands `<image>` and the trainer passes pixel_values to
generation and to every log-prob forward. What they do not have is a reward that
sees the image and the record: the reward here is the stage's rewards.base.Reward
(ppo.reward), called with each completion and its prompt's record data (image path,
question, reference answers, caption), exactly as PPO calls it. No critic:
group-relative (GRPO) or leave-one-out (RLOO) baselines over ppo.num_generations
answers per question. `<image>` is suppressed in generation.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vlm.config import RunConfig, to_dict
from vlm.data import ImageCache, captions_by_image, check_vqa_record, load_rgb, load_split, reference_of
from vlm.files import write_json
from vlm.image_input import llava_of
from vlm.model import announce_device, load_model, pick_device
from vlm.train import last_complete_checkpoint, save_final, set_trainable, tensorboard_logging
from vlm.vqa_metric import vqa_accuracy
from rewards.base import Reward, RewardContext, build_reward, inputs_from_references
from rewards.reward_model import position_ids_from_mask


class RewardFunction:
    """trl reward function: completions + their prompts' record columns -> the Reward's scores."""

    def __init__(self, reward: Reward):
        self.reward = reward.eval()
        self.__name__ = reward.name  # trl names the reward metric after the function

    @torch.no_grad()
    def __call__(self, prompts, completions, record_id, image_path, question, answers, caption, log_metric=None,
                 **kwargs) -> list[float]:
        texts = [(c[-1]["content"] if isinstance(c, list) else c).strip() for c in completions]
        references = [{"id": i, "image": p, "question": q, "answers": a, "caption": c}
                      for i, p, q, a, c in zip(record_id, image_path, question, answers, caption)]
        scores = self.reward(inputs_from_references(references, texts)).tolist()
        if log_metric is not None:  # the reward-hacking alarm: the official metric on the same rollouts
            log_metric("rollout_vqa_accuracy", 100 * sum(vqa_accuracy(t, a) for t, a in zip(texts, answers)) / len(texts))
        return scores


def positions_from_the_mask(model) -> None:
    """Makes the language model number each row's tokens from its first unmasked token.

    trl 1.12's GRPO / RLOO log-prob forward (`_get_per_token_logps_and_entropies`) passes no
    position_ids, and GPT-2 then numbers every column 0, 1, 2, ...: a left-padded prompt's
    tokens sit at positions shifted by its padding, unlike in generation (which derives
    positions from the mask) and unlike the same prompt unpadded. The old, new and reference
    log-probs of padded rows were those of inputs the policy never sampled from, and the
    KL estimate of a row grew with its padding (the spikes of 20-887 seen with GPT-2). The
    hook fills in mask-derived positions where none are given (generation gives its own)."""
    def with_positions(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and mask is not None and mask.dim() == 2:
            tokens = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
            width = tokens.shape[1] if tokens is not None else mask.shape[1]
            kwargs["position_ids"] = position_ids_from_mask(mask)[:, -width:]
        return args, kwargs

    # on the language model itself: PEFT calls the Llava model's forward() directly, past its hooks
    llava_of(model).model.language_model.register_forward_pre_hook(with_positions, with_kwargs=True)


def prompt_dataset(config: RunConfig):
    from datasets import Dataset

    records = [r for r in load_split(config.data_dir, "vqa", config.ppo_prompt_split) if check_vqa_record(r) is None]
    if config.ppo.max_prompts:
        records = records[:config.ppo.max_prompts]
    captions = captions_by_image(config.data_dir)
    rows = []
    for r in records:
        ref = reference_of(r, captions)
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"].strip()}]}],
            "image": load_rgb(config.data_dir / r["image"]), "record_id": ref["id"], "image_path": ref["image"],
            "question": ref["question"], "answers": ref["answers"], "caption": ref["caption"] or "",
        })
    return Dataset.from_list(rows)


def algo_arguments(config: RunConfig, image_token_index: int, work_dir: Path):
    """trl 1.12's GRPOConfig or RLOOConfig (ppo.algo) from the stage's config: bf16 from ppo.bf16, the
    CPU only where the device rule (config key `device`) says so."""
    ppo = config.ppo
    if ppo.algo == "grpo":
        from trl import GRPOConfig as AlgoConfig
    else:
        from trl import RLOOConfig as AlgoConfig
    device = pick_device(config.device)
    announce_device(ppo.algo, device, torch.bfloat16 if ppo.bf16 else torch.float32)
    return AlgoConfig(
        output_dir=str(work_dir / "checkpoints"), per_device_train_batch_size=ppo.batch_size,
        num_generations=ppo.num_generations, max_completion_length=ppo.max_new_tokens, learning_rate=ppo.lr,
        max_steps=ppo.steps, beta=ppo.kl_coef, temperature=ppo.temperature, logging_steps=1,
        save_steps=ppo.save_steps or ppo.steps, report_to=tensorboard_logging(work_dir / "checkpoints"),
        use_cpu=device.type == "cpu", bf16=ppo.bf16,
        seed=config.seed, deepspeed=ppo.deepspeed, max_grad_norm=ppo.max_grad_norm, remove_unused_columns=False,
        generation_kwargs={"suppress_tokens": [image_token_index]}, num_iterations=ppo.ppo_epochs,
    )


def group_trainer(config: RunConfig, policy, processor, reward: Reward, work_dir: Path):
    """trl 1.12's GRPOTrainer or RLOOTrainer (ppo.algo) for the policy, with the stage's reward."""
    ppo = config.ppo
    if ppo.algo == "grpo":
        from trl import GRPOTrainer as AlgoTrainer
    else:
        from trl import RLOOTrainer as AlgoTrainer
    peft_config = None
    if ppo.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=ppo.lora.r, lora_alpha=ppo.lora.alpha, lora_dropout=ppo.lora.dropout,
                                 target_modules=r".*language_model.*\.(" + "|".join(ppo.lora.target_modules) + r")$",
                                 fan_in_fan_out=True, task_type="CAUSAL_LM")
    return AlgoTrainer(model=policy, reward_funcs=[RewardFunction(reward)],
                       args=algo_arguments(config, policy.config.image_token_index, work_dir),
                       train_dataset=prompt_dataset(config), processing_class=processor,
                       peft_config=peft_config)


def train(config: RunConfig, work_dir: Path | None = None) -> dict:
    ppo = config.ppo
    work_dir = Path(work_dir or config.paths.stage_dir("ppo"))
    work_dir.mkdir(parents=True, exist_ok=True)
    policy_dir = config.ppo_policy
    policy, processor = load_model(policy_dir)
    # ppo.freeze_vision, as PPO does: the tower that made the feature cache stays the same tower
    set_trainable(policy, ppo.as_train_config())
    processor.tokenizer.padding_side = "left"  # trl pads prompts on the left for generation
    pixels = ImageCache(processor.image_processor, config.data_dir)  # trl's trainers read pixels
    try:
        reward = build_reward(config, RewardContext(processor, lambda model: pixels, config.data_dir))
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    trainer = group_trainer(config, policy, processor, reward, work_dir)
    reward.to(trainer.accelerator.device)
    for model in (trainer.accelerator.unwrap_model(trainer.model), trainer.ref_model):
        if model is not None:
            positions_from_the_mask(model)
    resume_from = last_complete_checkpoint(work_dir / "checkpoints") if ppo.resume else None
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    metrics: dict = {}
    if trainer.accelerator.is_main_process:
        log = [e for e in trainer.state.log_history if "reward" in e]
        with open(work_dir / "log.jsonl", "w") as f:
            for e in log:
                f.write(json.dumps({"step": e["step"], "mean_reward": e["reward"], "kl": e.get("kl", 0.0),
                                    "response_length": e.get("completions/mean_length"),
                                    "entropy": e.get("entropy"),
                                    "rollout_vqa_accuracy": e.get("rollout_vqa_accuracy")}) + "\n")
        tail = log[-max(1, len(log) // 10):] or [{"reward": float("nan")}]
        processor.tokenizer.padding_side = "right"
        save_final(trainer.accelerator.unwrap_model(trainer.model), processor, work_dir / "final", to_dict(config))
        metrics = {"algo": ppo.algo, "updates": trainer.state.global_step,
                   "world_size": trainer.accelerator.num_processes, "seconds": round(seconds, 2),
                   "policy": str(policy_dir), "reward": ppo.reward, "prompt_split": config.ppo_prompt_split,
                   "mean_reward": round(sum(e["reward"] for e in tail) / len(tail), 4),
                   "kl": round(sum(e.get("kl", 0.0) for e in tail) / len(tail), 4),
                   "checkpoint": str(work_dir / "final")}
        write_json(work_dir / "metrics.json", metrics)
    return metrics
