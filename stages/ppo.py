"""RLHF: PPO of the SFT policy against a reward (ppo.reward), with the image in every forward.

    vqa-rlhf ppo configs/default.yaml [key=value ...]
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m stages.ppo configs/default.yaml   # 2 CPU ranks
    accelerate launch --config_file configs/accelerate/zero2.yaml -m stages.ppo configs/default.yaml

setup: policy = <run>/sft/final (full or LoRA: then the reference is the policy with the
       adapter disabled, else a frozen copy); reward = ppo.reward (rewards/base.py: the
       learned reward model <run>/rm/final, the fact-augmented one, official VQA accuracy,
       MiniLM similarity, or a weighted mix); value model = a copy of the reward's learned
       model, else the policy's backbone with a fresh head; queries = the VQA prompts of
       data.rl_split (images SFT never trained on) with their images and record data
       (with data.feature_cache and ppo.freeze_vision: cached CLIP features for every model
       whose tower made the cache, pixels for one whose tower differs, e.g. a reward model
       trained with its vision unfrozen)
train: trl 1.12 `trl.experimental.ppo.PPOTrainer`, subclassed (VisionPPOTrainer) so that
       the image reaches rollout generation, the policy / reference log-probs, the value
       and reward forwards and every PPO minibatch step; checkpoints every ppo.save_steps,
       resume after a kill; held-out VQA accuracy every ppo.eval_steps
log:   <run>/ppo/log.jsonl every update: mean reward, KL, response length, entropy, and the
       rollouts' official VQA accuracy with its agreement with the reward; the reward-hacking
       alarm (reward up, agreement down) stops the run (ppo.stop_on_hacking)
save:  <run>/ppo/final (stock-loadable Llava: the last policy, or the best held-out one when
       the alarm stopped the run or the last is worse on held-out than the start),
       <run>/ppo/value_model, <run>/ppo/metrics.json with greedy test-split VQA accuracy
       before (the SFT policy) and after, compared per question (paired bootstrap CI)

With N processes the N ranks share each update's rollouts (ppo.batch_size per rank), so
ppo.steps updates of one process become ppo.steps / N updates of N times the rollouts.
On a CPU box set ACCELERATE_USE_CPU=true under torchrun: trl's PPOTrainer builds its own
Accelerator(), which otherwise runs every rank alone.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, set_seed
from trl.experimental.ppo import PPOConfig as TRLPPOConfig, PPOTrainer
from trl.experimental.ppo.ppo_trainer import PolicyAndValueWrapper, masked_mean, masked_whiten
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from vlm.config import RunConfig, to_dict
from vlm.data import ImageCache, captions_by_image, check_vqa_record, load_split, prompt_ids, reference_of, vqa_prompt
from vlm.features import FeatureCacheMismatch, FeatureStore, image_inputs, image_source, model_signature
from vlm.files import writing
from vlm.generate import answer_questions
from vlm.model import load_model
from vlm.train import apply_lora, save_final, set_trainable
from vlm.vqa_metric import score_records, vqa_accuracy
from rewards.base import Reward, RewardContext, build_reward, inputs_from_references
from rewards.model_reward import ModelReward
from rewards.reward_model import RewardModel, position_ids_from_mask
from stages.common import config_from_args, run_stage, stage_parser, write_json


# ---------------------------------------------------------------- queries

class PromptDataset(torch.utils.data.Dataset):
    """VQA prompts (image placeholder expanded) with their image and their record's reference
    data (vlm.data.reference_of: id, image, question, annotator answers, caption), which the
    reward and the reward-hacking alarm read.

    `image_sources` maps a batch key ("pixel_values", "image_features") to the source that
    fills it (vlm.data.ImageCache, vlm.features.FeatureStore): one per kind of image input
    the models need. Images are read when an item is, so a VQA v2-sized prompt set does not
    have to fit in memory."""

    def __init__(self, records, tokenizer, image_sources: dict, template: str, image_seq_length: int,
                 captions: dict[str, str] | None = None):
        self.image_sources = image_sources
        self.items = [
            {"input_ids": prompt_ids(tokenizer, vqa_prompt(template, r["question"]), image_seq_length),
             "reference": reference_of(r, captions or {})}
            for r in records
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        return {"input_ids": item["input_ids"], "reference": item["reference"],
                **{key: source(item["reference"]["image"]) for key, source in self.image_sources.items()}}


@dataclass
class PromptCollator:
    """Left padding, so every row's answer starts at the same column; the mask marks the padding."""
    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, width - len(item["input_ids"]):] = torch.tensor(item["input_ids"])
            attention_mask[row, width - len(item["input_ids"]):] = 1
        image_keys = [key for key in items[0] if key not in ("input_ids", "reference")]
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "images": {key: torch.stack([item[key] for item in items]) for key in image_keys},
                "references": [item["reference"] for item in items]}


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on each response's tokens up to and including its first EOS, 0 after.

    GPT-2 pads with EOS, so padding is told from the answer's own EOS by position, not id."""
    is_eos = (responses == eos_token_id).long()
    eos_before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before this position
    return (eos_before == 0).long()


# ---------------------------------------------------------------- the trainer

class VisionPolicyAndValue(PolicyAndValueWrapper):
    """Upstream's policy + critic pair (one module, so DDP and DeepSpeed see one model), with
    an image input for each: the policy may read cached features while the critic reads
    pixels. `images` holds the batch's image tensors by key; the cached features go through
    each model's projector here, inside the forward that gets the gradient."""

    policy_input = "pixel_values"
    value_input = "pixel_values"

    def forward(self, images: dict, **kwargs):
        value_images = image_inputs(self.value_model, images[self.value_input], self.value_input)
        output = self.critic_backbone(**kwargs, **value_images)
        values = self.value_model.score(output.hidden_states[-1])
        return self.policy(**kwargs, **image_inputs(self.policy, images[self.policy_input], self.policy_input)), values


class VisionPPOTrainer(PPOTrainer):
    """trl 1.12's PPOTrainer with images.

    Upstream's train() passes only input_ids to the models and derives attention masks
    from `ids != pad_token_id`. Here the loop is the same algorithm (rollout -> KL-shaped
    rewards -> GAE -> clipped policy and value losses over minibatches, the same config
    fields and the same metric names), with these differences:
      * the image goes into generation, the policy / reference / value forwards and the
        minibatch update (through VisionPolicyAndValue, so DDP and DeepSpeed see one
        module): as pixels, or as cached CLIP features for the models named by
        `policy_input` (policy and reference) and `critic_input` (value);
      * the reward is a rewards.base.Reward (upstream's `reward_model` slot): it gets the
        decoded answers with their prompts' record data (image, question, reference
        answers, caption), so a learned reward model, the official VQA accuracy or a mix
        of rewards all plug in the same way;
      * attention masks come from the collator (left padding) and from the first EOS of
        each response, never from the pad id: GPT-2's pad is its EOS, and the EOS that ends
        an answer is part of the action and is what the reward model reads;
      * `<image>` is suppressed in generation and its logit is masked the same way in every
        log-prob, so the ratio and the KL are over the distribution that was sampled;
      * gradient clipping (ppo max_grad_norm), checkpoints with resume (a resumed run
        reseeds per update and ends where an uninterrupted run ends), and a per-update hook
        for the reward-hacking alarm and held-out evaluation.
    """

    def __init__(self, *args, image_token_id: int, max_grad_norm: float, on_update=None,
                 policy_input: str = "pixel_values", critic_input: str = "pixel_values", **kwargs):
        super().__init__(*args, **kwargs)
        # Upstream wraps policy and critic in its PolicyAndValueWrapper, which hands both the
        # same inputs; ours gives each its own image input (the module is the same object).
        pair = self.accelerator.unwrap_model(self.model)
        pair.__class__ = VisionPolicyAndValue
        pair.policy_input, pair.value_input = policy_input, critic_input
        self.policy_input, self.critic_input = policy_input, critic_input
        self.image_token_id = image_token_id
        self.max_grad_norm = max_grad_norm
        self.on_update = on_update  # (trainer, update, rollout, metrics) -> None; may add to metrics
        self.start_update = 0
        self.stop_requested = False  # set by on_update (the reward-hacking guard): the loop ends there
        self.train_seconds = 0.0  # across resumes: a resumed run starts from its checkpoint's count

    # -- forwards, all with the image

    def _suppressed(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits as generation saw them: temperature applied, `<image>` impossible."""
        logits = logits / (self.args.temperature + 1e-7)
        logits[..., self.image_token_id] = torch.finfo(logits.dtype).min
        return logits

    def _logprobs(self, policy, seq, mask, images, context_length, responses):
        out = policy(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     **image_inputs(policy, images[self.policy_input], self.policy_input), use_cache=False)
        return selective_log_softmax(self._suppressed(out.logits[:, context_length - 1:-1]), responses)

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        args, accelerator = self.args, self.accelerator
        device = accelerator.device
        queries = batch["input_ids"].to(device)
        query_mask = batch["attention_mask"].to(device)
        images = {key: tensor.to(device) for key, tensor in batch["images"].items()}
        context_length = queries.shape[1]
        tokenizer = self.processing_class
        generation_config = GenerationConfig(
            max_new_tokens=args.response_length, do_sample=True, temperature=args.temperature + 1e-7, top_k=0,
            top_p=1.0, suppress_tokens=[self.image_token_id], eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with unwrap_model_for_generation(self.model, accelerator,
                                         gather_deepspeed3_params=args.ds3_gather_for_generation) as unwrapped:
            generated = unwrapped.policy.generate(
                input_ids=queries, attention_mask=query_mask, generation_config=generation_config,
                **image_inputs(unwrapped.policy, images[self.policy_input], self.policy_input))
        responses = generated[:, context_length:]
        if (responses == self.image_token_id).any():
            raise RuntimeError("PPO rollout sampled <image> although it is suppressed")
        mask_r = response_mask(responses, tokenizer.eos_token_id)
        responses = responses.masked_fill(mask_r == 0, tokenizer.pad_token_id)
        seq = torch.cat([queries, responses], 1)
        mask = torch.cat([query_mask, mask_r], 1)
        wrapper = accelerator.unwrap_model(self.model)
        logprobs = self._logprobs(wrapper.policy, seq, mask, images, context_length, responses)
        if self.ref_model is None:  # LoRA: the reference is the policy with its adapter disabled
            with self.null_ref_context():
                ref_logprobs = self._logprobs(wrapper.policy, seq, mask, images, context_length, responses)
        else:
            ref_logprobs = self._logprobs(self.ref_model, seq, mask, images, context_length, responses)
        critic_images = images[self.critic_input]
        values = wrapper.value_model.token_values(
            seq, mask, **image_inputs(wrapper.value_model, critic_images, self.critic_input))[:, context_length - 1:-1]
        texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
        scores = self.reward_model(inputs_from_references(batch["references"], texts)).to(device)
        has_eos = ((responses == tokenizer.eos_token_id) & mask_r.bool()).any(1)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~has_eos).float()
        return {"queries": queries, "seq": seq, "mask": mask, "images": images,
                "responses": responses, "response_mask": mask_r, "logprobs": logprobs,
                "ref_logprobs": ref_logprobs, "values": values, "scores": scores,
                "context_length": context_length, "texts": texts, "references": batch["references"]}

    def advantages(self, r: dict):
        """Per-token rewards (KL penalty + the score on the last token), GAE advantages and returns."""
        args = self.args
        valid = r["response_mask"].bool()
        logr = (r["ref_logprobs"] - r["logprobs"]).masked_fill(~valid, 0.0)
        kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        last = r["response_mask"].sum(1) - 1
        rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += r["scores"]
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, valid, shift_mean=False).masked_fill(~valid, 0)
        values = r["values"].masked_fill(~valid, 0.0)
        lastgaelam, reversed_adv = 0.0, []
        length = rewards.shape[1]
        for t in reversed(range(length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + args.gamma * next_values - values[:, t]
            lastgaelam = delta + args.gamma * args.lam * lastgaelam
            reversed_adv.append(lastgaelam)
        advantages = torch.stack(reversed_adv[::-1], 1)
        returns = advantages + values
        advantages = masked_whiten(advantages, valid).masked_fill(~valid, 0)
        return advantages, returns, values, kl, non_score_reward

    def ppo_update(self, r: dict, advantages, returns, values, update: int) -> dict:
        args, accelerator = self.args, self.accelerator
        stats = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")}
        n = r["seq"].shape[0]
        generator = torch.Generator().manual_seed(self.args.seed * 7919 + update)
        context_length = r["context_length"]
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, args.local_mini_batch_size):
                idx = order[start:start + args.local_mini_batch_size].to(r["seq"].device)
                valid = r["response_mask"][idx].bool()
                seq, mask = r["seq"][idx], r["mask"][idx]
                # One call through the (DDP / DeepSpeed) wrapper: policy logits + value per token, both with the image.
                output, vpred_all = self.model(
                    images={key: tensor[idx] for key, tensor in r["images"].items()},
                    input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True, return_dict=True, use_cache=False,
                )
                logits = self._suppressed(output.logits[:, context_length - 1:-1])
                new_logprobs = selective_log_softmax(logits, r["responses"][idx])
                vpred = vpred_all[:, context_length - 1:-1].squeeze(-1).masked_fill(~valid, 0)
                vpred_clipped = torch.clamp(vpred, values[idx] - args.cliprange_value, values[idx] + args.cliprange_value)
                vf_losses = torch.max((vpred - returns[idx]) ** 2, (vpred_clipped - returns[idx]) ** 2)
                vf_loss = 0.5 * masked_mean(vf_losses, valid)
                logratio = (new_logprobs - r["logprobs"][idx]).masked_fill(~valid, 0)
                ratio = logratio.exp()
                pg_losses = -advantages[idx] * ratio
                pg_losses_clipped = -advantages[idx] * torch.clamp(ratio, 1 - args.cliprange, 1 + args.cliprange)
                pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), valid)
                loss = pg_loss + args.vf_coef * vf_loss
                accelerator.backward(loss)
                if self.max_grad_norm:
                    accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                with torch.no_grad():
                    probs = torch.softmax(logits, -1)
                    entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
                    stats["approxkl"].append(0.5 * masked_mean(logratio ** 2, valid))
                    stats["clipfrac"].append(masked_mean((pg_losses_clipped > pg_losses).float(), valid))
                    stats["pg_loss"].append(pg_loss.detach())
                    stats["vf_loss"].append(vf_loss.detach())
                    stats["vf_clipfrac"].append(masked_mean(((vpred_clipped - returns[idx]) ** 2 >
                                                             (vpred - returns[idx]) ** 2).float(), valid))
                    stats["entropy"].append(masked_mean(entropy, valid))
                    stats["ratio"].append(masked_mean(ratio, valid))
        return {k: accelerator.gather_for_metrics(torch.stack(v)).mean().item() for k, v in stats.items()}

    def _batches(self):
        """The dataloader repeated; reseeded at the start so a resumed run sees the same order."""
        torch.manual_seed(self.args.seed)
        while True:
            yield from self.dataloader

    def train(self):
        args, accelerator = self.args, self.accelerator
        self.model.train()
        self.state.max_steps = args.num_total_batches
        self.state.global_step = self.start_update
        self.state.episode = self.start_update * args.batch_size
        batches = self._batches()
        for _ in range(self.start_update):  # skip what a resumed run already trained on
            next(batches)
        started, seconds_before = time.time(), self.train_seconds
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)  # progress bar
        for update in range(self.start_update, args.num_total_batches):
            torch.manual_seed(self.local_seed + update)  # sampling draws the same after a resume
            rollout = self.rollout(next(batches))
            with torch.no_grad():
                advantages, returns, values, kl, non_score_reward = self.advantages(rollout)
            stats = self.ppo_update(rollout, advantages, returns, values, update)
            self.lr_scheduler.step()
            self.train_seconds = seconds_before + time.time() - started
            self.state.global_step = update + 1
            self.state.episode += args.batch_size
            gather = lambda t: accelerator.gather_for_metrics(t).float().mean().item()
            metrics = {
                "step": update + 1,
                "mean_reward": gather(rollout["scores"]),
                "kl": gather(kl.sum(1)),
                "non_score_reward": gather(non_score_reward.sum(1)),
                "response_length": gather(rollout["response_mask"].sum(1).float()),
                "rollout_entropy": gather(-(rollout["logprobs"] * rollout["response_mask"]).sum(1)),
                "entropy": stats["entropy"],
                "approxkl": stats["approxkl"], "clipfrac": stats["clipfrac"], "pg_loss": stats["pg_loss"],
                "vf_loss": stats["vf_loss"], "ratio": stats["ratio"],
                "lr": self.lr_scheduler.get_last_lr()[0],
                "seconds": round(self.train_seconds, 2),
            }
            if self.on_update is not None:
                self.on_update(self, update + 1, rollout, metrics)
            self.log({k: v for k, v in metrics.items() if k != "step"})
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.stop_requested:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)


# ---------------------------------------------------------------- the stage

class PPORun:
    """Wires the stage: paths, models, the reward, logging, evaluation, checkpoints, the guard."""

    def __init__(self, config: RunConfig, work_dir: Path | None = None):
        self.config = config
        self.work_dir = Path(work_dir or config.run_dir / "ppo")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.policy_dir = config.ppo_policy
        self.log_path = self.work_dir / "log.jsonl"
        self.checkpoints = self.work_dir / "checkpoints"
        self.best_dir = self.work_dir / "best"  # the best held-out policy so far (the guard keeps it)

    def build(self):
        cfg, ppo = self.config, self.config.ppo
        if not (self.policy_dir / "config.json").is_file():
            raise SystemExit(f"error: no policy (ppo.policy) at {self.policy_dir}: run the earlier stages first")
        policy, processor = load_model(self.policy_dir)
        tokenizer = processor.tokenizer
        self.processor = processor
        self.images = image_source(cfg.data.feature_cache, cfg.data_dir, processor, policy, ppo.freeze_vision,
                                   "the PPO policy")  # policy and reference; held-out evaluation
        self._pixels = None
        try:
            self.reward = build_reward(cfg, RewardContext(processor, self._critic_images, cfg.data_dir))
        except FileNotFoundError as exc:
            raise SystemExit(f"error: {exc}") from None
        value_model = self._value_model_start().train()
        set_trainable(policy, _trainable_parts(ppo))
        set_trainable(value_model, _trainable_parts(ppo))
        for model in (policy, value_model):
            # Llava reads the vision tower's hidden states before its post_layernorm: a weight that gets
            # no gradient, which DDP (several ranks) refuses unless it is frozen.
            for name, param in model.named_parameters():
                if "vision_tower" in name and "post_layernorm" in name:
                    param.requires_grad_(False)
        ref_model = None
        if ppo.lora.enabled:
            policy = apply_lora(policy, _trainable_parts(ppo))
        else:
            ref_model = copy.deepcopy(policy).eval()
            for param in ref_model.parameters():
                param.requires_grad_(False)
        critic_images = self._critic_images(value_model)
        image_sources = {source.input_name: source for source in (self.images, critic_images)}
        split = cfg.ppo_prompt_split
        prompt_records = [r for r in load_split(cfg.data_dir, "vqa", split) if check_vqa_record(r) is None]
        if ppo.max_prompts:
            prompt_records = prompt_records[:ppo.max_prompts]
        if split == cfg.data.train_split:
            print(f"ppo: WARNING: RL prompts come from {split}, the split SFT trained on: even a perfect reward "
                  f"then teaches remembered answers (set data.rl_split / ppo.prompt_split to unseen images)",
                  flush=True)
        dataset = PromptDataset(prompt_records, tokenizer, image_sources, cfg.data.prompt_template,
                                policy.config.image_seq_length, captions_by_image(cfg.data_dir))
        val = load_split(cfg.data_dir, "vqa", cfg.data.val_split)
        self.val_records = [val[i] for i in range(min(ppo.eval_samples, len(val)))]
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        args = TRLPPOConfig(
            output_dir=str(self.checkpoints), per_device_train_batch_size=ppo.batch_size,
            gradient_accumulation_steps=1, num_mini_batches=ppo.mini_batches, num_ppo_epochs=ppo.ppo_epochs,
            # ppo.steps updates on one process; N ranks share the episodes: steps / N updates
            total_episodes=ppo.steps * ppo.batch_size, local_rollout_forward_batch_size=ppo.batch_size,
            learning_rate=ppo.lr, weight_decay=ppo.weight_decay, warmup_steps=ppo.warmup_steps,
            lr_scheduler_type="linear", response_length=ppo.max_new_tokens, stop_token="eos",
            temperature=ppo.temperature, missing_eos_penalty=ppo.missing_eos_penalty, kl_coef=ppo.kl_coef,
            kl_estimator=ppo.kl_estimator, cliprange=ppo.cliprange, cliprange_value=ppo.cliprange_value,
            vf_coef=ppo.vf_coef, gamma=ppo.gamma, lam=ppo.lam, whiten_rewards=ppo.whiten_rewards,
            num_sample_generations=0, save_strategy="no", report_to=[], logging_steps=1, seed=cfg.seed,
            use_cpu=not torch.cuda.is_available(), bf16=False, disable_tqdm=False,
        )
        if world_size > 1 and not torch.cuda.is_available():
            # trl's PPOTrainer builds its own Accelerator(); on a box without CUDA under torchrun it
            # then runs each rank alone (silently) unless told to use the CPU: ranks share over gloo.
            os.environ["ACCELERATE_USE_CPU"] = "true"
        self.trainer = VisionPPOTrainer(
            args=args, processing_class=tokenizer, model=policy, ref_model=ref_model, reward_model=self.reward,
            value_model=value_model, train_dataset=dataset, eval_dataset=dataset,
            data_collator=PromptCollator(tokenizer.pad_token_id), image_token_id=policy.config.image_token_index,
            max_grad_norm=ppo.max_grad_norm, on_update=self.on_update,
            policy_input=self.images.input_name, critic_input=critic_images.input_name,
        )
        return self.trainer

    def _value_model_start(self) -> RewardModel:
        """The critic starts as the reward's learned model when it has one (its head already reads
        answers), else as the policy's backbone with a fresh head (ppo.reward=vqa_accuracy)."""
        parts = self.reward.parts.values() if hasattr(self.reward, "parts") else [self.reward]
        learned = next((part for part in parts if isinstance(part, ModelReward)), None)
        if learned is not None:
            return copy.deepcopy(learned.model)
        torch.manual_seed(self.config.seed)
        return RewardModel.from_sft(self.policy_dir)

    def _critic_images(self, model):
        """The image source of a model that reads images beside the policy (the value model, a
        reward model): the policy's feature cache when that model's tower (kept frozen) made it
        too, else pixels. A reward model may have trained its tower (rm.freeze_vision=false): a
        reason for pixels, not an error."""
        if not isinstance(self.images, FeatureStore):  # the policy reads pixels: so do they
            return self.images
        try:
            self.images.check_matches(model_signature(model, self.processor), "the reward model")
            return self.images
        except FeatureCacheMismatch as mismatch:
            if self._pixels is None:
                print(f"note: the reward and value models read pixels: data.feature_cache was made by another "
                      f"vision tower ({mismatch.details})", flush=True)
        if self._pixels is None:  # one pixel cache for every model that needs pixels
            self._pixels = ImageCache(self.processor.image_processor, self.config.data_dir)
        return self._pixels

    # -- per update: the reward-hacking alarm and guard, held-out accuracy, checkpoints

    def on_update(self, trainer, update: int, rollout: dict, metrics: dict) -> None:
        ppo = self.config.ppo
        references = rollout["references"]
        accuracy = torch.tensor([vqa_accuracy(a, ref["answers"]) for a, ref in zip(rollout["texts"], references)])
        reward_says = (rollout["scores"].cpu() > self.reward.threshold)
        agree = (reward_says == (accuracy >= self.config.autolabel.min_accuracy)).float()
        gather = lambda t: trainer.accelerator.gather_for_metrics(t.to(trainer.accelerator.device)).float().mean().item()
        metrics["rollout_vqa_accuracy"] = 100 * gather(accuracy)
        metrics["rm_vqa_agreement"] = 100 * gather(agree)
        last = update == trainer.args.num_total_batches
        if trainer.accelerator.is_main_process:
            entries = self.read_log() + [metrics]
            alarm = hacking_alarm(entries, ppo.hacking_window, ppo.hacking_drop)
        else:
            alarm = False
        alarm = bool(trainer.accelerator.reduce(torch.tensor([float(alarm)], device=trainer.accelerator.device),
                                                reduction="sum").item())
        if alarm:
            metrics["hacking_alarm"] = True
            trainer.stop_requested = ppo.stop_on_hacking
        stopping = last or trainer.stop_requested
        if ppo.eval_steps and (update % ppo.eval_steps == 0 or stopping):
            metrics["val_vqa_accuracy"] = self.held_out_accuracy(trainer)
            self.keep_if_best(trainer, update, metrics["val_vqa_accuracy"])
        if trainer.accelerator.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}) + "\n")
            if "val_vqa_accuracy" in metrics:
                print(f"ppo {update}/{trainer.args.num_total_batches}: held-out VQA accuracy "
                      f"{metrics['val_vqa_accuracy']:.2f}, reward {metrics['mean_reward']:.3f}, KL {metrics['kl']:.3f}, "
                      f"rollout VQA accuracy {metrics['rollout_vqa_accuracy']:.1f}, agreement of the reward with "
                      f"the ground truth {metrics['rm_vqa_agreement']:.1f}%", flush=True)
            if alarm:
                print(f"ppo {update}: REWARD-HACKING ALARM: over the last {ppo.hacking_window} updates the reward "
                      f"rose while its agreement with the ground truth fell by {ppo.hacking_drop}+ points"
                      + ("; stopping (ppo.stop_on_hacking)" if ppo.stop_on_hacking else ""), flush=True)
        if ppo.save_steps and update % ppo.save_steps == 0 and not stopping:
            self.save_checkpoint(trainer, update)

    def read_log(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def keep_if_best(self, trainer, update: int, accuracy: float) -> None:
        """Saves the policy's weights when its held-out accuracy beats every earlier one (ties keep
        the earlier: the less optimised policy). Update 0 is the starting policy."""
        accelerator = trainer.accelerator
        best = self.best()
        if best is not None and accuracy <= best["val_vqa_accuracy"]:
            return
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            policy = accelerator.unwrap_model(trainer.model).policy
            save_file({k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()},
                      str(tmp / "policy.safetensors"))
            (tmp / "best.json").write_text(json.dumps({"update": update, "val_vqa_accuracy": accuracy}))
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(tmp, self.best_dir)
        accelerator.wait_for_everyone()

    def best(self) -> dict | None:
        path = self.best_dir / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def restore_best(self, trainer) -> dict:
        from safetensors.torch import load_file

        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        policy.load_state_dict(load_file(str(self.best_dir / "policy.safetensors")))
        return self.best()

    def held_out_accuracy(self, trainer) -> float:
        """Greedy, official metric, on a slice of the val split (rank 0 answers; others wait)."""
        accuracy = torch.zeros(1, device=trainer.accelerator.device)
        if trainer.accelerator.is_main_process:
            cfg = self.config
            policy = trainer.accelerator.unwrap_model(trainer.model).policy
            predictions = answer_questions(policy, self.processor, self.val_records, self.images,
                                           cfg.data.prompt_template, cfg.eval.decoding, cfg.eval.batch_size,
                                           cfg.data.max_length)
            policy.train()
            accuracy[0] = score_records({"question_id": r["id"], "prediction": p, "answers": r["answers"]}
                                        for r, p in zip(self.val_records, predictions)).overall
        return trainer.accelerator.reduce(accuracy, reduction="sum").item()

    def save_checkpoint(self, trainer, update: int) -> None:
        """Policy + value weights, optimizer and scheduler, atomically (tmp dir + rename); keeps the last two."""
        from safetensors.torch import save_file

        accelerator = trainer.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = self.checkpoints / f"update-{update}"
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            # critic_backbone is the value model's backbone under a second name: saved once.
            state = {k: v.contiguous() for k, v in accelerator.unwrap_model(trainer.model).state_dict().items()
                     if not k.startswith("critic_backbone.")}
            with writing(tmp):  # a full disk: one clear error; update-N.tmp is never resumed from
                save_file(state, str(tmp / "model.safetensors"))
                torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps({"update": update, "seconds": trainer.train_seconds}))
            os.replace(tmp, final)
            for old in sorted(self._complete_checkpoints(), key=_update_of)[:-2]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _complete_checkpoints(self) -> list[Path]:
        return [p for p in self.checkpoints.glob("update-*") if p.name.split("-")[-1].isdigit()
                and (p / "state.json").is_file()]

    def resume(self, trainer) -> int:
        """Loads the newest complete checkpoint; the log keeps only what led up to it."""
        from safetensors.torch import load_file

        found = self._complete_checkpoints() if self.config.ppo.resume else []
        update = 0
        if found:
            latest = max(found, key=_update_of)
            update = _update_of(latest)
            wrapper = trainer.accelerator.unwrap_model(trainer.model)
            missing, unexpected = wrapper.load_state_dict(load_file(str(latest / "model.safetensors")), strict=False)
            missing = [k for k in missing if not k.startswith("critic_backbone.")]  # aliases of value_model.model
            if missing or unexpected:
                raise RuntimeError(f"{latest}: checkpoint does not match the model: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
            trainer.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
            trainer.lr_scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
            trainer.train_seconds = json.loads((latest / "state.json").read_text()).get("seconds", 0.0)
            if trainer.accelerator.is_main_process:
                print(f"ppo: resuming from {latest}", flush=True)
        if trainer.accelerator.is_main_process:
            entries = [json.loads(l) for l in self.log_path.read_text().splitlines() if l.strip()] \
                if self.log_path.is_file() else []
            # a fresh start drops an old curve; a resumed run keeps what led up to its checkpoint
            self.log_path.write_text("".join(json.dumps(e) + "\n" for e in entries if update and e["step"] <= update))
            if not update:  # a fresh start: an earlier run's best policy is not a candidate
                shutil.rmtree(self.best_dir, ignore_errors=True)
        trainer.start_update = update
        return update


def _update_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _trainable_parts(ppo):
    """The PPO section seen as a TrainConfig for set_trainable / apply_lora."""
    from vlm.config import TrainConfig

    return TrainConfig(freeze_vision=ppo.freeze_vision, lora=ppo.lora, lr=ppo.lr)


def hacking_alarm(log: list[dict], window: int, drop: float) -> bool:
    """Reward hacking, read off the update log: over the last `window` updates the mean reward is
    above the first `window` updates' while the reward's agreement with the ground truth (official
    VQA accuracy of the same rollouts) is at least `drop` points below theirs."""
    entries = [e for e in log if "mean_reward" in e and "rm_vqa_agreement" in e]
    if window < 1 or len(entries) < 2 * window:
        return False
    mean = lambda rows, key: sum(e[key] for e in rows) / len(rows)
    first, recent = entries[:window], entries[-window:]
    return (mean(recent, "mean_reward") > mean(first, "mean_reward")
            and mean(first, "rm_vqa_agreement") - mean(recent, "rm_vqa_agreement") >= drop)


def train(config: RunConfig, work_dir: Path | None = None) -> dict:
    if config.ppo.algo in ("grpo", "rloo"):  # critic-free, trl's own VLM support + an image-aware reward function
        from stages.group_rl import train as train_group_relative

        return train_group_relative(config, work_dir)
    set_seed(config.seed)
    run = PPORun(config, work_dir)
    trainer = run.build()
    if run.resume(trainer) == 0 and config.ppo.eval_steps:  # the starting point of the held-out curve
        accuracy = run.held_out_accuracy(trainer)
        run.keep_if_best(trainer, 0, accuracy)
        if trainer.accelerator.is_main_process:
            with open(run.log_path, "a") as f:
                f.write(json.dumps({"step": 0, "val_vqa_accuracy": accuracy}) + "\n")
    trainer.train()
    seconds = trainer.train_seconds  # across resumes
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    kept = keep_or_restore(run, trainer)
    metrics: dict = {}
    if accelerator.is_main_process:
        wrapper = accelerator.unwrap_model(trainer.model)
        save_final(wrapper.policy, run.processor, run.work_dir / "final", to_dict(config))
        wrapper.value_model.save_pretrained(str(run.work_dir / "value_model"), safe_serialization=True)
        log = [e for e in run.read_log() if e["step"]]
        tail = log[-max(1, len(log) // 10):]  # the last tenth of the updates: where training ended up
        metrics = {
            "algo": "ppo", "reward": config.ppo.reward, "prompt_split": config.ppo_prompt_split,
            "updates": trainer.state.global_step, "planned_updates": trainer.args.num_total_batches,
            "world_size": accelerator.num_processes, "seconds": round(seconds, 2), "policy": str(run.policy_dir),
            "mean_reward": round(sum(e["mean_reward"] for e in tail) / len(tail), 4),
            "kl": round(sum(e["kl"] for e in tail) / len(tail), 4),
            "hacking_alarm_at": next((e["step"] for e in log if e.get("hacking_alarm")), None),
            "stopped_early": trainer.stop_requested, **kept,
            "checkpoint": str(run.work_dir / "final"),
        }
        write_json(run.work_dir / "metrics.json", metrics)
    return metrics


def keep_or_restore(run: PPORun, trainer) -> dict:
    """Which policy the stage saves: the last one, unless the reward-hacking alarm stopped the run
    or the last held-out accuracy is below the start's; then the best held-out one (which may be
    the starting policy), said loudly. Without held-out evaluation (ppo.eval_steps=0) there is
    nothing to compare, and the last policy is kept with a note."""
    log = run.read_log()
    held_out = [(e["step"], e["val_vqa_accuracy"]) for e in log if "val_vqa_accuracy" in e]
    if not held_out or run.best() is None:
        print("ppo: note: no held-out evaluation (ppo.eval_steps=0): the last policy is kept unchecked", flush=True)
        return {"kept_update": trainer.state.global_step, "kept_because": "last (no held-out evaluation)"}
    start, last = held_out[0][1], held_out[-1][1]
    if trainer.stop_requested:
        reason = f"the reward-hacking alarm stopped the run at update {trainer.state.global_step}"
    elif last < start:
        reason = f"the last policy's held-out accuracy {last:.2f} is below the start's {start:.2f}"
    else:
        return {"kept_update": trainer.state.global_step, "kept_because": "last",
                "val_vqa_accuracy_start": start, "val_vqa_accuracy_kept": last}
    best = run.restore_best(trainer)
    if trainer.accelerator.is_main_process:
        print(f"ppo: WARNING: {reason}; saving the best held-out policy instead, from update {best['update']} "
              f"(held-out VQA accuracy {best['val_vqa_accuracy']:.2f}; "
              f"{'the starting policy, unchanged' if best['update'] == 0 else 'a PPO checkpoint'})", flush=True)
    return {"kept_update": best["update"], "kept_because": f"best held-out: {reason}",
            "val_vqa_accuracy_start": start, "val_vqa_accuracy_kept": best["val_vqa_accuracy"]}


def evaluate_before_after(config: RunConfig, metrics: dict, work_dir: Path | None = None, tag: str = "ppo") -> dict:
    """Greedy test-split VQA accuracy of the starting policy and of the PPO policy (official metric),
    compared question by question: paired bootstrap 95% CI of the change, better / worse question
    counts, per question family, and the share of the start's error removed."""
    from stages.evaluate import compare_evaluations, evaluate

    work_dir = Path(work_dir or config.run_dir / "ppo")
    policy_dir = config.ppo_policy
    before_path = config.run_dir / "eval" / "sft" / "metrics.json"
    if (not config.ppo.policy and before_path.is_file()
            and json.loads(before_path.read_text())["split"] == config.eval.split
            and (before_path.parent / "predictions.jsonl").is_file()):
        before, before_dir = json.loads(before_path.read_text()), before_path.parent
    else:
        before, before_dir = evaluate(config, policy_dir, "ppo-before"), config.run_dir / "eval" / "ppo-before"
    after = evaluate(config, work_dir / "final", tag)
    metrics.update({"vqa_accuracy_before": before["vqa_accuracy"], "vqa_accuracy_after": after["vqa_accuracy"],
                    "eval_split": after["split"], "eval_count": after["count"],
                    **compare_evaluations(before_dir, config.run_dir / "eval" / tag, seed=config.seed)})
    write_json(work_dir / "metrics.json", metrics)
    return metrics


def oracle_control(config: RunConfig) -> dict:
    """The same PPO budget with the verifiable reward (official VQA accuracy), into <run>/ppo-oracle:
    how far a reward that knows the answer gets the same policy, prompts and updates."""
    oracle = copy.deepcopy(config)
    oracle.ppo.reward, oracle.ppo.reward_weights = "vqa_accuracy", {}
    work_dir = config.run_dir / "ppo-oracle"
    metrics = train(oracle, work_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        metrics = evaluate_before_after(oracle, metrics, work_dir, "ppo-oracle")
    return metrics


def main(argv=None) -> int:
    parser = stage_parser("ppo", __doc__)
    parser.add_argument("--algo", choices=["ppo", "grpo", "rloo"], help="the RL algorithm (default: ppo.algo)")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    if args.algo:
        config.ppo.algo = args.algo
    metrics = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        metrics = evaluate_before_after(config, metrics)
    if config.ppo.oracle_control and config.ppo.reward != "vqa_accuracy":
        oracle = oracle_control(config)
        if int(os.environ.get("RANK", "0")) == 0:
            metrics["oracle_control"] = {key: oracle[key] for key in (
                "vqa_accuracy_after", "error_removed", "ci95", "updates", "seconds")}
            write_json(config.run_dir / "ppo" / "metrics.json", metrics)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(metrics))
    return 0


def summary(metrics: dict) -> str:
    low, high = metrics["ci95"]
    lines = [f"ppo ({metrics['reward']}): {metrics['updates']} updates in {metrics['seconds']:.0f} s; test VQA accuracy "
             f"{metrics['vqa_accuracy_before']:.2f} -> {metrics['vqa_accuracy_after']:.2f} "
             f"(95% CI of the change {low:+.2f}..{high:+.2f} points; {metrics['error_removed']:.1f}% of the error "
             f"removed; {metrics['better']} questions better, {metrics['worse']} worse); "
             f"reward {metrics['mean_reward']:.3f}, KL {metrics['kl']:.3f}"]
    if metrics.get("oracle_control"):
        oracle = metrics["oracle_control"]
        lines.append(f"  oracle control (reward = official VQA accuracy, same budget): -> {oracle['vqa_accuracy_after']:.2f}, "
                     f"{oracle['error_removed']:.1f}% of the error removed")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_stage(main))
