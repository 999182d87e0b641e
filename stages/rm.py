"""Reward model: the SFT model's backbone + a scalar head, trained on correct / incorrect labels.

    vqa-rlhf rm configs/default.yaml [key=value ...]
    vqa-rlhf rm --labels DIR --base CHECKPOINT --out DIR [key=value ...]

setup: labels (an export dir; default: exported from the label store) -> split by
       image into train / held-out -> RewardModel.from_sft(base) (+ LoRA, freezing);
       rm.facts=true: the fact-augmented model (LLaVA-RLHF's Fact-RLHF), which also reads
       the image's captions from the labels' dataset, into <run>/rm-fact
train: HF Trainer (DeepSpeed, checkpoints, resume after a kill); pointwise BCE or
       pairwise (rm.objective); rm.soft_targets: the official VQA accuracy as the target
eval:  held-out accuracy (threshold fitted on the training labels) and ROC AUC, beside
       the similarity and exact-match baselines, overall and per question family; the fit
       of the training labels; within-question ranking accuracy; the labels' noise share;
       best-of-n on the eval split (rewards/diagnostics.py)
save:  <out>/final (RewardModel.save_pretrained + processor), <out>/metrics.json
"""
from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoProcessor, set_seed

from vlm.config import RunConfig, to_dict
from vlm.data import ImageCache, captions_by_image
from vlm.files import writing
from vlm.vqa_metric import vqa_accuracy
from vlm.train import (
    TrainingClock,
    apply_lora,
    gathered_parameters,
    is_main_process,
    last_complete_checkpoint,
    mean_logged_loss,
    part_learning_rates,
    set_trainable,
    training_arguments,
)
from rewards.baselines import evaluate_baselines, group_accuracy
from rewards.diagnostics import label_noise, ranking_accuracy
from rewards.labels_io import (binary_metrics, fit_threshold, load_labels, load_preference_pairs, pairs_by_question,
                               question_families, split_by_image)
from rewards.reward_model import RewardModel
from rewards.train_rm import PairwiseCollator, PointwiseCollator, RewardTrainer, check_objective, encode_rows, score
from stages.common import config_from_args, run_stage, stage_parser, write_json


def export_labels_from_store(config: RunConfig, out_dir: Path) -> Path:
    """The pipeline's default labels: the label store (sample.db) exported as `vqa-rlhf export-labels` does."""
    from rewards.label_store import LabelStore

    db = Path(config.sample.db or config.run_dir / "labels" / "labels.db")
    if not db.is_file():
        raise SystemExit(f"error: no label store at {db}: run the sample stage (and label or autolabel) first, "
                         "or set rm.labels=DIR (a `vqa-rlhf export-labels` dir)")
    with LabelStore(db) as store:
        store.export(out_dir)
    return out_dir


def train(config: RunConfig, labels_dir: Path | None = None, base: Path | None = None,
          out_dir: Path | None = None) -> dict:
    rm = config.rm
    out_dir = Path(out_dir or config.rm_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(base or rm.base or config.sft_final)
    labels_dir = labels_dir or (Path(rm.labels) if rm.labels else None)
    if labels_dir is None:
        labels_dir = export_labels_from_store(config, out_dir / "labels")
    set_seed(config.seed)

    rows, image_root = load_labels(labels_dir)
    facts_template = None
    if rm.facts:
        facts_template = rm.facts_template
        captions = captions_by_image(image_root)
        if not captions:
            raise SystemExit(f"error: rm.facts=true needs the images' reference facts, but the labels' dataset "
                             f"{image_root} has no captions/ (set rm.facts=false)")
        for row in rows:  # an image without a caption is scored without facts, as at scoring time
            row["facts"] = captions.get(row["image"])
    if rm.soft_targets:  # the official VQA accuracy as the target where the ground truth is known
        for row in rows:
            if row["gt_answers"]:
                row["train_target"] = vqa_accuracy(row["answer"], row["gt_answers"])
    train_rows, heldout_rows = split_by_image(rows, rm.heldout_fraction)
    heldout_images = {r["image"] for r in heldout_rows}
    # people's pairwise preferences (pairwise mode of the labeling page), on training images only
    preferences = [pair for pair in load_preference_pairs(labels_dir) if pair[0]["image"] not in heldout_images]
    if rm.facts:
        for pair in preferences:
            for row in pair:
                row["facts"] = captions.get(row["image"])
    check_objective(rm, train_rows, preferences)
    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    model = RewardModel.from_sft(base)
    model.config.facts_template = facts_template  # saved with the model: scoring reads the same facts
    images = ImageCache(processor.image_processor, image_root)
    encode = lambda rs: encode_rows(rs, tokenizer, images, config.data.prompt_template, config.data.answer_template,
                                    model.config.image_seq_length, config.data.max_length, facts_template)
    train_encoded, heldout_encoded = encode(train_rows), encode(heldout_rows)
    if rm.objective == "pairwise":
        index = {id(r): e for r, e in zip(train_rows, train_encoded)}
        dataset = [(index[id(good)], index[id(bad)]) for good, bad in pairs_by_question(train_rows)]
        dataset += list(zip(encode([good for good, _ in preferences]), encode([bad for _, bad in preferences])))
        collator = PairwiseCollator(tokenizer.pad_token_id)
    else:
        dataset, collator = train_encoded, PointwiseCollator(tokenizer.pad_token_id)

    set_trainable(model, rm)
    if rm.lora.enabled:
        model = apply_lora(model, rm, task_type=None, extra_modules_to_save=["score"])  # the new head trains fully
    if is_main_process():
        positives = sum(r["target"] for r in train_rows)
        print(f"rm: {len(train_rows)} training labels ({positives} correct), {len(heldout_rows)} held out, "
              f"{len(preferences)} pairwise preferences; {rm.objective}: {len(dataset)} training examples", flush=True)

    checkpoints = out_dir / "checkpoints"
    clock = TrainingClock()
    trainer = RewardTrainer(
        model=model, args=training_arguments(rm, checkpoints, config.seed), train_dataset=dataset,
        data_collator=collator, part_lrs=part_learning_rates(rm), objective=rm.objective, callbacks=[clock],
    )
    resume_from = last_complete_checkpoint(checkpoints) if rm.resume else None
    if resume_from and is_main_process():
        print(f"rm: resuming from {resume_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = clock.seconds  # across resumes

    final_model = trainer.model
    from peft import PeftModel

    if isinstance(final_model, PeftModel):
        final_model = final_model.merge_and_unload()
    pad = tokenizer.pad_token_id
    train_scores = score(final_model, train_encoded, pad)
    threshold = fit_threshold(train_scores, [r["target"] for r in train_rows])
    heldout_scores = score(final_model, heldout_encoded, pad)
    families = question_families(image_root)
    metrics = binary_metrics(heldout_scores, [r["target"] for r in heldout_rows], threshold)
    metrics["by_group"] = group_accuracy(heldout_rows, heldout_scores, threshold, families)
    train_fit = binary_metrics(train_scores, [r["target"] for r in train_rows], threshold)
    metrics.update({
        "train_fit": {"accuracy": train_fit["accuracy"], "auc": train_fit["auc"]},
        "ranking_accuracy": ranking_accuracy(heldout_rows, heldout_scores)["accuracy"],
        "ranking_pairs": ranking_accuracy(heldout_rows, heldout_scores)["pairs"],
        "label_noise": label_noise(rows),
        "facts": bool(facts_template), "soft_targets": rm.soft_targets,
    })
    metrics.update({
        "objective": rm.objective, "labels": str(labels_dir), "base": str(base),
        "train_labels": len(train_rows), "heldout_labels": len(heldout_rows), "preference_pairs": len(preferences),
        "steps": trainer.state.global_step, "train_loss": mean_logged_loss(trainer.state.log_history),
        "seconds": round(seconds, 2),
        "checkpoint": str(out_dir / "final"),
        "baselines": evaluate_baselines(train_rows, heldout_rows, families) if is_main_process() else {},
    })
    with gathered_parameters(trainer):  # ZeRO-3: whole weights, so rank 0 alone can sample and score
        if trainer.is_world_process_zero():
            save_reward_model(final_model, processor, out_dir / "final", to_dict(config))
            if rm.best_of_n:
                metrics["best_of_n"] = best_of_n_on_eval_split(config, final_model, processor, threshold,
                                                               bool(facts_template))
            write_json(out_dir / "metrics.json", metrics)
    return metrics


def best_of_n_on_eval_split(config: RunConfig, reward_model, processor, threshold: float, facts: bool) -> dict:
    """rm.best_of_n answers sampled by the policy RL starts from for the first rm.best_of_n_questions
    questions of eval.split, picked by this reward model (rewards/diagnostics.py)."""
    from dataclasses import replace

    from rewards.diagnostics import best_of_n
    from rewards.model_reward import FactModelReward, ModelReward
    from vlm.data import check_vqa_record, load_split
    from vlm.features import image_source
    from vlm.model import load_model

    rm, data = config.rm, config.data
    policy_dir = config.ppo_policy
    if not (policy_dir / "config.json").is_file():
        print(f"rm: best-of-n skipped: no policy at {policy_dir}", flush=True)
        return {}
    policy, policy_processor = load_model(policy_dir)
    records = [r for r in load_split(config.data_dir, "vqa", config.eval.split) if check_vqa_record(r) is None]
    records = records[:rm.best_of_n_questions]
    pixels = ImageCache(processor.image_processor, config.data_dir)
    reward = (FactModelReward if facts else ModelReward)(
        reward_model, processor.tokenizer, pixels, data.prompt_template, data.answer_template, data.max_length,
        threshold)
    reward.name = "fact_model" if facts else "model"
    images = image_source(data.feature_cache, config.data_dir, policy_processor, policy, True, str(policy_dir))
    sampling = replace(config.eval.decoding, strategy="sample", temperature=config.sample.temperature,
                       top_p=config.sample.top_p, max_new_tokens=config.sample.max_new_tokens)
    return best_of_n(policy, policy_processor, reward, records, images, captions_by_image(config.data_dir), data,
                     sampling, rm.best_of_n, config.eval.batch_size, seed=config.seed)


def save_reward_model(model, processor, out_dir: Path, run_config: dict) -> None:
    """Atomic, like vlm.train.save_final: a half-written model is never taken for a finished one."""
    import json
    import os
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with writing(out_dir.parent):  # a full disk: one clear error, the model before (if any) kept
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        (tmp / "training_config.json").write_text(json.dumps(run_config, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def summary(metrics: dict) -> str:
    lines = [f"rm ({metrics['objective']}{', fact-augmented' if metrics.get('facts') else ''}): held-out accuracy "
             f"{metrics['accuracy']:.2f}%, AUC {metrics['auc']} over {metrics['count']} labels; training labels "
             f"{metrics['train_fit']['accuracy']:.2f}%; within-question ranking {metrics['ranking_accuracy']}% of "
             f"{metrics['ranking_pairs']} pairs; label noise {metrics['label_noise']['share']}%"]
    bon = metrics.get("best_of_n")
    if bon:
        lines.append(f"  best of {bon['n']} ({bon['questions']} eval questions, VQA accuracy): greedy {bon['greedy']}, "
                     f"reward's pick {bon['reward']}, random sample {bon['random']}, majority vote {bon['majority']}, "
                     f"oracle {bon['oracle']}")
    for name in ("similarity", "exact_match"):
        baseline = metrics["baselines"].get(name)
        if baseline:
            lines.append(f"  baseline {name}: accuracy {baseline['accuracy']:.2f}%, AUC {baseline['auc']}")
    groups = metrics.get("by_group", {})
    sim = metrics["baselines"].get("similarity", {}).get("by_group", {})
    for group, entry in groups.items():
        extra = f" (similarity {sim[group]['accuracy']:.1f}%)" if group in sim else ""
        lines.append(f"  {group:>16}: {entry['accuracy']:.1f}% of {entry['count']}{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = stage_parser("rm", __doc__)
    parser.add_argument("--labels", help="label export dir (vqa-rlhf export-labels); default: rm.labels or the label store")
    parser.add_argument("--base", help="VLM checkpoint for the backbone (default: rm.base or <run>/sft/final)")
    parser.add_argument("--out", help="output dir (default: <run>/rm)")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    metrics = train(config, Path(args.labels) if args.labels else None,
                    Path(args.base) if args.base else None, Path(args.out) if args.out else None)
    if is_main_process():
        print(summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
