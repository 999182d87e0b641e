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

import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoProcessor, LlavaForConditionalGeneration, set_seed

from vlm.config import RunConfig, to_dict
from vlm.data import ImageCache, captions_by_image, check_vqa_record, load_split
from vlm.features import image_source
from vlm.files import writing
from vlm.model import load_for_inference
from vlm.stage_cli import config_from_args, run_stage, stage_parser, write_json
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
from vlm.vqa_metric import vqa_accuracy
from rewards.answer_likelihood import (
    JudgedAnswerCollator,
    PreferencePairCollator,
    answer_probabilities,
    encode_judged_rows,
    with_reference_log_probs,
)
from rewards.baselines import evaluate_baselines, group_accuracy
from rewards.diagnostics import best_of_n, candidate_top1, family_candidates, label_noise, ranking_accuracy
from rewards.label_store import LabelStore
from rewards.labels_io import (
    binary_metrics,
    fit_threshold,
    load_labels,
    load_preference_pairs,
    pairs_by_question,
    question_families,
    split_by_image,
)
from rewards.model_reward import FactModelReward, LikelihoodReward, ModelReward
from rewards.reward_model import RewardModel
from rewards.train_rm import (
    LANGUAGE_MODEL_OBJECTIVES,
    PairwiseCollator,
    PointwiseCollator,
    RewardTrainer,
    check_objective,
    encode_rows,
    reward_prompt,
    score,
)


def export_labels_from_store(config: RunConfig, out_dir: Path) -> Path:
    """The pipeline's default labels: the label store (sample.db) exported as `vqa-rlhf label export` does."""
    db = config.labels_db
    if not db.is_file():
        raise SystemExit(f"error: no label store at {db}: run the sample stage (and label or autolabel) first, "
                         "or set rm.labels=DIR (a `vqa-rlhf label export` dir)")
    with LabelStore(db) as store:
        store.export(out_dir)
    return out_dir


@dataclass
class Labels:
    """The labels the reward model learns from, split by image (train / held out)."""
    rows: list[dict]
    image_root: Path
    train_rows: list[dict]
    heldout_rows: list[dict]
    preferences: list  # people's pairwise preferences, on training images only
    facts_template: str | None  # rm.facts: the template the images' reference facts are read with


def read_labels(config: RunConfig, labels_dir: Path) -> Labels:
    rm = config.rm
    rows, image_root = load_labels(labels_dir)
    facts_template = captions = None
    if rm.facts and rm.objective in LANGUAGE_MODEL_OBJECTIVES:
        raise SystemExit("error: config keys 'rm.facts' and 'rm.objective': the likelihood reward model reads the "
                         "policy's own prompt, without facts (set rm.facts=false or rm.objective=pointwise)")
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
    preferences = [pair for pair in load_preference_pairs(labels_dir) if pair[0]["image"] not in heldout_images]
    if rm.facts:
        for pair in preferences:
            for row in pair:
                row["facts"] = captions.get(row["image"])
    try:
        check_objective(rm, train_rows, preferences, config.sample)
    except ValueError as exc:
        raise SystemExit(f"error: the labels in {labels_dir}: {exc}") from None
    return Labels(rows, image_root, train_rows, heldout_rows, preferences, facts_template)


def training_set(rm, labels: Labels, train_encoded: list[dict], encode, pad_token_id: int):
    """(dataset, collator): every training label (pointwise, likelihood; with rm.only_correct the correct
    ones), or correct-vs-incorrect pairs of a question (dpo) plus people's preferences (pairwise)."""
    if rm.objective == "likelihood":
        if rm.only_correct:  # rejection-sampling fine-tuning: SFT on the answers labeled correct
            return [row for row in train_encoded if row["target"] >= 0.5], JudgedAnswerCollator(pad_token_id)
        return train_encoded, JudgedAnswerCollator(pad_token_id)
    if rm.objective not in ("pairwise", "dpo"):
        return train_encoded, PointwiseCollator(pad_token_id)
    index = {id(r): e for r, e in zip(labels.train_rows, train_encoded)}
    dataset = [(index[id(good)], index[id(bad)]) for good, bad in pairs_by_question(labels.train_rows)]
    if rm.objective == "dpo":  # the labels' pairs only: people's preferences have no reference log-probs
        return dataset, PreferencePairCollator(pad_token_id)
    dataset += list(zip(encode([good for good, _ in labels.preferences]),
                        encode([bad for _, bad in labels.preferences])))
    return dataset, PairwiseCollator(pad_token_id)


def held_out_metrics(model, labels: Labels, train_encoded, heldout_encoded, pad_token_id: int,
                     families: dict, scores=score) -> tuple[dict, float]:
    """Held-out accuracy / AUC at the threshold fitted on the training labels, per question group,
    the fit of the training labels, within-question ranking and the labels' noise; and the threshold.
    `scores(model, encoded, pad_token_id)`: the rewards of encoded rows (the reward model's form)."""
    train_scores = scores(model, train_encoded, pad_token_id)
    threshold = fit_threshold(train_scores, [r["target"] for r in labels.train_rows])
    heldout_scores = scores(model, heldout_encoded, pad_token_id)
    metrics = binary_metrics(heldout_scores, [r["target"] for r in labels.heldout_rows], threshold)
    metrics["by_group"] = group_accuracy(labels.heldout_rows, heldout_scores, threshold, families)
    train_fit = binary_metrics(train_scores, [r["target"] for r in labels.train_rows], threshold)
    metrics.update({
        "train_fit": {"accuracy": train_fit["accuracy"], "auc": train_fit["auc"]},
        "ranking_accuracy": ranking_accuracy(labels.heldout_rows, heldout_scores)["accuracy"],
        "ranking_pairs": ranking_accuracy(labels.heldout_rows, heldout_scores)["pairs"],
        "label_noise": label_noise(labels.rows),
        "facts": bool(labels.facts_template),
    })
    return metrics, threshold


def train(config: RunConfig, labels_dir: Path | None = None, base: Path | None = None,
          out_dir: Path | None = None) -> dict:
    rm = config.rm
    out_dir = Path(out_dir or config.rm_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(base or rm.base or config.round_start_policy)
    labels_dir = labels_dir or (Path(rm.labels) if rm.labels else None)
    if labels_dir is None:
        labels_dir = export_labels_from_store(config, out_dir / "labels")
    set_seed(config.seed)
    labels = read_labels(config, labels_dir)
    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    images = ImageCache(processor.image_processor, labels.image_root)
    data = config.data
    if rm.objective in LANGUAGE_MODEL_OBJECTIVES:  # the policy's own LM: the answer's probability is the reward
        model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        prompt = lambda row: reward_prompt(data.prompt_template, row["question"])
        encode = lambda rs: encode_judged_rows(rs, tokenizer, images, prompt, data.answer_template,
                                               model.config.image_seq_length, data.max_length)
        scores = answer_probabilities
    else:
        model = RewardModel.from_sft(base)
        model.config.facts_template = labels.facts_template  # saved with the model: scoring reads the same facts
        encode = lambda rs: encode_rows(rs, tokenizer, images, data.prompt_template, data.answer_template,
                                        model.config.image_seq_length, data.max_length, labels.facts_template)
        scores = score
    train_encoded, heldout_encoded = encode(labels.train_rows), encode(labels.heldout_rows)
    if rm.objective == "dpo":  # the frozen reference: the starting model's log p of every training answer
        with_reference_log_probs(model, train_encoded, tokenizer.pad_token_id)
    dataset, collator = training_set(rm, labels, train_encoded, encode, tokenizer.pad_token_id)
    set_trainable(model, rm)
    if rm.lora.enabled:
        # a scalar head is new and trains fully; the likelihood model has none
        model = apply_lora(model, rm, task_type=None,
                           extra_modules_to_save=[] if rm.objective in LANGUAGE_MODEL_OBJECTIVES else ["score"])
    if is_main_process():
        positives = sum(r["target"] for r in labels.train_rows)
        print(f"rm: {len(labels.train_rows)} training labels ({positives} correct), {len(labels.heldout_rows)} held "
              f"out, {len(labels.preferences)} pairwise preferences; {rm.objective}: {len(dataset)} training examples",
              flush=True)

    checkpoints = out_dir / "checkpoints"
    clock = TrainingClock()
    trainer = RewardTrainer(
        model=model, args=training_arguments(rm, checkpoints, config.seed, config.device), train_dataset=dataset,
        data_collator=collator, part_lrs=part_learning_rates(rm), objective=rm.objective, dpo_beta=rm.dpo_beta,
        callbacks=[clock],
    )
    resume_from = last_complete_checkpoint(checkpoints) if rm.resume else None
    if resume_from and is_main_process():
        print(f"rm: resuming from {resume_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume_from)
    final_model = trainer.model.merge_and_unload() if isinstance(trainer.model, PeftModel) else trainer.model
    families = question_families(labels.image_root)
    metrics, threshold = held_out_metrics(final_model, labels, train_encoded, heldout_encoded, tokenizer.pad_token_id,
                                          families, scores)
    metrics.update({
        "soft_targets": rm.soft_targets, "objective": rm.objective, "only_correct": rm.only_correct,
        "labels": str(labels_dir), "base": str(base),
        "train_labels": len(labels.train_rows), "heldout_labels": len(labels.heldout_rows),
        "preference_pairs": len(labels.preferences), "steps": trainer.state.global_step,
        "train_loss": mean_logged_loss(trainer.state.log_history), "seconds": round(clock.seconds, 2),  # across resumes
        "checkpoint": str(out_dir / "final"),
        "baselines": evaluate_baselines(labels.train_rows, labels.heldout_rows, families) if is_main_process() else {},
    })
    with gathered_parameters(trainer):  # ZeRO-3: whole weights, so rank 0 alone can sample and score
        if trainer.is_world_process_zero():
            save_reward_model(final_model, processor, out_dir / "final", to_dict(config))
            metrics.update(eval_split_diagnostics(config, final_model, processor, threshold,
                                                  bool(labels.facts_template)))
            write_json(out_dir / "metrics.json", metrics)
    return metrics


def eval_split_diagnostics(config: RunConfig, reward_model, processor, threshold: float, facts: bool) -> dict:
    """What the reward knows on eval.split: `candidate_top1` (every candidate answer of each question's
    family scored, for the first rm.candidate_questions questions: is the best one on top?) and
    `best_of_n` (rm.best_of_n answers sampled by the policy RL starts from for the first
    rm.best_of_n_questions questions, picked by this reward). rewards/diagnostics.py."""
    rm, data = config.rm, config.data
    records = [r for r in load_split(config.data_dir, "vqa", config.eval.split) if check_vqa_record(r) is None]
    captions = captions_by_image(config.data_dir)
    pixels = ImageCache(processor.image_processor, config.data_dir)
    reward_class = LikelihoodReward if isinstance(reward_model, LlavaForConditionalGeneration) else (
        FactModelReward if facts else ModelReward)
    reward = reward_class(reward_model, processor.tokenizer, pixels, data.prompt_template, data.answer_template,
                          data.max_length, threshold)
    reward.name = "fact_model" if facts else "model"
    out = {}
    if rm.candidate_questions:
        out["candidate_top1"] = candidate_top1(reward, records[:rm.candidate_questions], family_candidates(records),
                                               captions)
    policy_dir = config.ppo_policy
    if not rm.best_of_n:
        return out
    if not (policy_dir / "config.json").is_file():
        print(f"rm: best-of-n skipped: no policy at {policy_dir}", flush=True)
        return out
    policy, policy_processor = load_for_inference(policy_dir, config.device, config.inference_bf16, "rm best-of-n")
    images = image_source(data.feature_cache, config.data_dir, policy_processor, policy, True, str(policy_dir))
    sampling = replace(config.eval.decoding, strategy="sample", temperature=config.sample.temperature,
                       top_p=config.sample.top_p, max_new_tokens=config.sample.max_new_tokens)
    out["best_of_n"] = best_of_n(policy, policy_processor, reward, records[:rm.best_of_n_questions], images, captions,
                                 data, sampling, rm.best_of_n, config.eval.batch_size, seed=config.seed)
    return out


def save_reward_model(model, processor, out_dir: Path, run_config: dict) -> None:
    """Atomic, like vlm.train.save_final: a half-written model is never taken for a finished one."""
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
    probe = metrics.get("candidate_top1")
    if probe and probe["overall"] is not None:
        families = ", ".join(f"{family} {value:.1f}" for family, value in probe["by_family"].items())
        lines.append(f"  candidate probe (every answer of the family scored; best on top): {probe['overall']:.2f}% of "
                     f"{probe['questions']} eval questions ({families})")
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
    parser.add_argument("--labels", help="label export dir (vqa-rlhf label export); default: rm.labels or the label store")
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
