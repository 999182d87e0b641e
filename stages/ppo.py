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
import sys
from pathlib import Path

from transformers import set_seed

from vlm.config import RunConfig, to_dict
from vlm.evaluation import compare_evaluations, evaluate, stored_or_evaluate
from vlm.stage_cli import config_from_args, run_stage, stage_parser, write_json
from vlm.train import save_final
from rewards.group_rl import train as train_group_relative
from rewards.ppo_run import PPORun, keep_or_restore


def train(config: RunConfig, work_dir: Path | None = None) -> dict:
    if config.ppo.algo in ("grpo", "rloo"):  # critic-free, trl's own VLM support + an image-aware reward function
        return train_group_relative(config, work_dir)
    set_seed(config.seed)
    run = PPORun(config, work_dir)
    trainer = run.build()
    if run.resume(trainer) == 0 and config.ppo.eval_steps:
        run.log_starting_point(trainer)
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


def evaluate_before_after(config: RunConfig, metrics: dict, work_dir: Path | None = None, tag: str = "ppo") -> dict:
    """Greedy test-split VQA accuracy of the starting policy and of the PPO policy (official metric),
    compared question by question: paired bootstrap 95% CI of the change, better / worse question
    counts, per question family, and the share of the start's error removed."""
    work_dir = Path(work_dir or config.paths.stage_dir("ppo"))
    tag = config.round_tag(tag)
    # the eval stage scored the SFT policy right after SFT: reused, not answered again
    before, before_dir = stored_or_evaluate(config, config.ppo_policy, config.round_tag("ppo-before"))
    after = evaluate(config, work_dir / "final", tag)
    metrics.update({"vqa_accuracy_before": before["vqa_accuracy"], "vqa_accuracy_after": after["vqa_accuracy"],
                    "eval_split": after["split"], "eval_count": after["count"],
                    **compare_evaluations(before_dir, config.paths.eval_dir(tag), seed=config.seed)})
    if tag == config.round_tag("ppo"):  # the run's RL, not a control: what all rounds so far bought over SFT
        first_policy = Path(config.ppo.policy) if config.ppo.policy else config.sft_final  # round 1's start
        if first_policy == config.ppo_policy:  # round 1: the comparison above is the one over SFT
            sft_accuracy, versus_sft = before["vqa_accuracy"], {k: metrics[k] for k in (
                "change", "ci95", "error_removed", "better", "worse", "by_family")}
        else:
            sft, sft_dir = stored_or_evaluate(config, first_policy, config.round_tag("sft-again"))
            sft_accuracy = sft["vqa_accuracy"]
            versus_sft = compare_evaluations(sft_dir, config.paths.eval_dir(tag), seed=config.seed)
        metrics["vs_sft"] = {"vqa_accuracy_before": sft_accuracy, "round": config.round, **versus_sft}
        if config.rlhf.reference_report:
            metrics["reference"] = reference_line(Path(config.rlhf.reference_report))
    write_json(work_dir / "metrics.json", metrics)
    return metrics


def reference_line(report_path: Path) -> dict:
    """The all-answers run's SFT test accuracy from its stored report (rlhf.reference_report), with
    where it comes from; a missing or unreadable report is said, not an error at the end of a run."""
    try:
        report = json.loads(report_path.read_text())
        return {"vqa_accuracy": report["stages"]["sft"]["vqa_accuracy"], "source": str(report_path),
                **{key: report[key] for key in ("provenance",) if key in report}}
    except (OSError, ValueError, KeyError) as exc:
        return {"vqa_accuracy": None, "source": str(report_path), "error": f"{type(exc).__name__}: {exc}"}


def oracle_control(config: RunConfig) -> dict:
    """The same PPO budget with the verifiable reward (official VQA accuracy), into <run>/ppo-oracle:
    how far a reward that knows the answer gets the same policy, prompts and updates."""
    oracle = copy.deepcopy(config)
    oracle.ppo.reward, oracle.ppo.reward_weights = "vqa_accuracy", {}
    work_dir = config.paths.stage_dir("ppo-oracle")
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
            write_json(config.paths.metrics("ppo"), metrics)
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
