"""A PPO run against a reward: the models and the reward built from the config, the per-update
reward-hacking alarm and guard, held-out evaluation, the best held-out policy, checkpoints
with resume. The ppo stage (stages/ppo.py) builds one, trains it and saves what it keeps.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from trl.experimental.ppo import PPOConfig as TRLPPOConfig

from vlm.config import RunConfig
from vlm.data import ImageCache, captions_by_image, check_vqa_record, load_split
from vlm.features import FeatureCacheMismatch, FeatureStore, image_source, model_signature
from vlm.files import writing
from vlm.generate import answer_questions
from vlm.model import announce_device, load_model, pick_device
from vlm.train import apply_lora, set_trainable, tensorboard_logging
from vlm.vqa_metric import score_records, vqa_accuracy
from rewards.base import RewardContext, build_reward
from rewards.model_reward import ModelReward
from rewards.ppo_trainer import PromptCollator, PromptDataset, VisionPPOTrainer
from rewards.reward_model import RewardModel


class PPORun:
    """Wires the stage: paths, models, the reward, logging, evaluation, checkpoints, the guard."""

    def __init__(self, config: RunConfig, work_dir: Path | None = None):
        self.config = config
        self.work_dir = Path(work_dir or config.paths.stage_dir("ppo"))
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
        policy, ref_model = self._trainable(policy, value_model)
        critic_images = self._critic_images(value_model)
        image_sources = {source.kind.key: source for source in (self.images, critic_images)}
        dataset = self._prompts(tokenizer, image_sources, policy.config.image_seq_length)
        val = load_split(cfg.data_dir, "vqa", cfg.data.val_split)
        self.val_records = [val[i] for i in range(min(ppo.eval_samples, len(val)))]
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        args = self._trl_args()
        on_cpu = pick_device(cfg.device).type == "cpu"
        if on_cpu and (world_size > 1 or torch.cuda.is_available()):
            # trl's PPOTrainer builds its own Accelerator(), which reads the device from the environment:
            # on a box without CUDA under torchrun it runs each rank alone (silently) unless told to use
            # the CPU (then ranks share over gloo); on a GPU machine with device=cpu it would take the GPU.
            os.environ["ACCELERATE_USE_CPU"] = "true"
        if ppo.bf16:
            # trl's PPOTrainer builds its Accelerator() from the environment, not from args.bf16: the
            # config's precision reaches it here (over an `accelerate launch --mixed_precision` setting).
            os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
        self.trainer = VisionPPOTrainer(
            args=args, processing_class=tokenizer, model=policy, ref_model=ref_model, reward_model=self.reward,
            value_model=value_model, train_dataset=dataset, eval_dataset=dataset,
            data_collator=PromptCollator(tokenizer.pad_token_id), image_token_id=policy.config.image_token_index,
            max_grad_norm=ppo.max_grad_norm, on_update=self.on_update,
            policy_input=self.images.kind, critic_input=critic_images.kind,
        )
        return self.trainer

    def _trainable(self, policy, value_model):
        """What trains (ppo.freeze_vision, ppo.lora), and the reference: the policy with its LoRA
        adapter disabled, else a frozen copy. -> (policy, reference or None)."""
        ppo = self.config.ppo
        set_trainable(policy, ppo.as_train_config())
        set_trainable(value_model, ppo.as_train_config())
        for model in (policy, value_model):
            # Llava reads the vision tower's hidden states before its post_layernorm: a weight that gets
            # no gradient, which DDP (several ranks) refuses unless it is frozen.
            for name, param in model.named_parameters():
                if "vision_tower" in name and "post_layernorm" in name:
                    param.requires_grad_(False)
        ref_model = None
        if ppo.lora.enabled:
            policy = apply_lora(policy, ppo.as_train_config())
        else:
            ref_model = copy.deepcopy(policy).eval()
            for param in ref_model.parameters():
                param.requires_grad_(False)
        return policy, ref_model

    def _prompts(self, tokenizer, image_sources: dict, image_seq_length: int) -> PromptDataset:
        """The RL queries: the VQA questions of the prompt split (images SFT never trained on)."""
        cfg, ppo = self.config, self.config.ppo
        split = cfg.ppo_prompt_split
        prompt_records = [r for r in load_split(cfg.data_dir, "vqa", split) if check_vqa_record(r) is None]
        if ppo.max_prompts:
            prompt_records = prompt_records[:ppo.max_prompts]
        if split == cfg.data.train_split:
            print(f"ppo: WARNING: RL prompts come from {split}, the split SFT trained on: even a perfect reward "
                  f"then teaches remembered answers (set data.rl_split / ppo.prompt_split to unseen images)",
                  flush=True)
        return PromptDataset(prompt_records, tokenizer, image_sources, cfg.data.prompt_template,
                             image_seq_length, captions_by_image(cfg.data_dir))

    def _trl_args(self) -> TRLPPOConfig:
        cfg, ppo = self.config, self.config.ppo
        device = pick_device(cfg.device)
        announce_device("ppo", device, torch.bfloat16 if ppo.bf16 else torch.float32)
        return TRLPPOConfig(
            output_dir=str(self.checkpoints), per_device_train_batch_size=ppo.batch_size,
            gradient_accumulation_steps=1, num_mini_batches=ppo.mini_batches, num_ppo_epochs=ppo.ppo_epochs,
            # ppo.steps updates on one process; N ranks share the episodes: steps / N updates
            total_episodes=ppo.steps * ppo.batch_size, local_rollout_forward_batch_size=ppo.batch_size,
            learning_rate=ppo.lr, weight_decay=ppo.weight_decay, warmup_steps=ppo.warmup_steps,
            lr_scheduler_type="linear", response_length=ppo.max_new_tokens, stop_token="eos",
            temperature=ppo.temperature, missing_eos_penalty=ppo.missing_eos_penalty, kl_coef=ppo.kl_coef,
            kl_estimator=ppo.kl_estimator, cliprange=ppo.cliprange, cliprange_value=ppo.cliprange_value,
            vf_coef=ppo.vf_coef, gamma=ppo.gamma, lam=ppo.lam, whiten_rewards=ppo.whiten_rewards,
            num_sample_generations=0, save_strategy="no", report_to=tensorboard_logging(self.checkpoints),
            logging_steps=1, seed=cfg.seed,
            use_cpu=device.type == "cpu", bf16=ppo.bf16, disable_tqdm=False,
        )

    def _value_model_start(self) -> RewardModel:
        """The critic starts as the reward's learned scalar-head model when it has one (its head already
        reads answers), else as the policy's backbone with a fresh head (ppo.reward=vqa_accuracy, or a
        likelihood reward model, which has no head)."""
        parts = self.reward.parts.values() if hasattr(self.reward, "parts") else [self.reward]
        learned = next((part for part in parts
                        if isinstance(part, ModelReward) and isinstance(part.model, RewardModel)), None)
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

    def log_starting_point(self, trainer) -> None:
        """A fresh run's update 0: the starting policy's held-out accuracy, the first point of the
        curve and the first candidate for the best policy."""
        accuracy = self.held_out_accuracy(trainer)
        self.keep_if_best(trainer, 0, accuracy)
        if trainer.accelerator.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": 0, "val_vqa_accuracy": accuracy}) + "\n")

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
