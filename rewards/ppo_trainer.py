"""PPO with images (trl 1.12's PPOTrainer, subclassed): the algorithm, its prompts and its collator.

trl 1.12's `trl.experimental.ppo.PPOTrainer` passes only `input_ids` to the models; here the
image (pixels, or cached CLIP features through each model's projector) reaches rollout
generation, the policy / reference log-probs, the value and reward forwards and every PPO
minibatch step. The reward is a rewards.base.Reward fed the decoded answers with their
prompts' record data. rewards/ppo_run.py wires it for the ppo stage; bench/ppo_throughput.py
times it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo.ppo_trainer import PolicyAndValueWrapper, masked_mean, masked_whiten
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

from vlm.data import pad, prompt_ids, reference_of, vqa_prompt
from vlm.image_input import PIXELS, ImageInputKind
from rewards.base import inputs_from_references
from rewards.reward_model import position_ids_from_mask

# ---------------------------------------------------------------- queries

class PromptDataset(torch.utils.data.Dataset):
    """VQA prompts (image placeholder expanded) with their image and their record's reference
    data (vlm.data.reference_of: id, image, question, annotator answers, caption), which the
    reward and the reward-hacking alarm read.

    `image_sources` maps a batch key (vlm.features.ImageInputKind.key) to the source that
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
        input_ids, attention_mask = pad([item["input_ids"] for item in items], self.pad_token_id, side="left")
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
    pixels. `images` holds the batch's image tensors by key (ImageInputKind.key); the cached
    features go through each model's projector here, inside the forward that gets the gradient."""

    policy_input: ImageInputKind = PIXELS
    value_input: ImageInputKind = PIXELS

    def forward(self, images: dict, **kwargs):
        value_images = self.value_input.model_inputs(self.value_model, images[self.value_input.key])
        output = self.critic_backbone(**kwargs, **value_images)
        values = self.value_model.score(output.hidden_states[-1])
        return self.policy(**kwargs, **self.policy_input.model_inputs(self.policy, images[self.policy_input.key])), values


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
                 policy_input: ImageInputKind = PIXELS, critic_input: ImageInputKind = PIXELS, **kwargs):
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
                     **self.policy_input.model_inputs(policy, images[self.policy_input.key]), use_cache=False)
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
                **self.policy_input.model_inputs(unwrapped.policy, images[self.policy_input.key]))
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
        critic_images = images[self.critic_input.key]
        values = wrapper.value_model.token_values(
            seq, mask, **self.critic_input.model_inputs(wrapper.value_model, critic_images))[:, context_length - 1:-1]
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
