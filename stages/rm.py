"""Reward model: the SFT model's backbone + a scalar head, trained on correct / incorrect labels.

    vqa-rlhf rm configs/default.yaml [key=value ...]
    vqa-rlhf rm --labels DIR --base CHECKPOINT --out DIR [key=value ...]

setup: labels (an export dir; default: exported from the label store) -> split by
       image into train / held-out -> RewardModel.from_sft(base) (+ LoRA, freezing)
train: HF Trainer (DeepSpeed, checkpoints, resume after a kill); pointwise BCE or
       pairwise (rm.objective)
eval:  held-out accuracy (threshold fitted on the training labels) and ROC AUC, beside
       the similarity and exact-match baselines, overall and per question family
save:  <out>/final (RewardModel.save_pretrained + processor), <out>/metrics.json
"""
from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoProcessor, set_seed

from vlm.config import RunConfig, to_dict
from vlm.data import ImageCache
from vlm.files import writing
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
from rewards.labels_io import binary_metrics, fit_threshold, load_labels, pairs_by_question, question_families, split_by_image
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
    out_dir = Path(out_dir or config.run_dir / "rm")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(base or rm.base or config.sft_final)
    labels_dir = labels_dir or (Path(rm.labels) if rm.labels else None)
    if labels_dir is None:
        labels_dir = export_labels_from_store(config, out_dir / "labels")
    set_seed(config.seed)

    rows, image_root = load_labels(labels_dir)
    train_rows, heldout_rows = split_by_image(rows, rm.heldout_fraction)
    check_objective(rm, train_rows)
    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    model = RewardModel.from_sft(base)
    images = ImageCache(processor.image_processor, image_root)
    encode = lambda rs: encode_rows(rs, tokenizer, images, config.data.prompt_template, config.data.answer_template,
                                    model.config.image_seq_length, config.data.max_length)
    train_encoded, heldout_encoded = encode(train_rows), encode(heldout_rows)
    if rm.objective == "pairwise":
        index = {id(r): e for r, e in zip(train_rows, train_encoded)}
        dataset = [(index[id(good)], index[id(bad)]) for good, bad in pairs_by_question(train_rows)]
        collator = PairwiseCollator(tokenizer.pad_token_id)
    else:
        dataset, collator = train_encoded, PointwiseCollator(tokenizer.pad_token_id)

    set_trainable(model, rm)
    if rm.lora.enabled:
        model = apply_lora(model, rm, task_type=None, extra_modules_to_save=["score"])  # the new head trains fully
    if is_main_process():
        positives = sum(r["target"] for r in train_rows)
        print(f"rm: {len(train_rows)} training labels ({positives} correct), {len(heldout_rows)} held out; "
              f"{rm.objective}: {len(dataset)} training examples", flush=True)

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
    threshold = fit_threshold(score(final_model, train_encoded, pad), [r["target"] for r in train_rows])
    heldout_scores = score(final_model, heldout_encoded, pad)
    families = question_families(image_root)
    metrics = binary_metrics(heldout_scores, [r["target"] for r in heldout_rows], threshold)
    metrics["by_group"] = group_accuracy(heldout_rows, heldout_scores, threshold, families)
    metrics.update({
        "objective": rm.objective, "labels": str(labels_dir), "base": str(base),
        "train_labels": len(train_rows), "heldout_labels": len(heldout_rows),
        "steps": trainer.state.global_step, "train_loss": mean_logged_loss(trainer.state.log_history),
        "seconds": round(seconds, 2),
        "checkpoint": str(out_dir / "final"),
        "baselines": evaluate_baselines(train_rows, heldout_rows, families) if is_main_process() else {},
    })
    with gathered_parameters(trainer):
        if trainer.is_world_process_zero():
            save_reward_model(final_model, processor, out_dir / "final", to_dict(config))
            write_json(out_dir / "metrics.json", metrics)
    return metrics


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
    lines = [f"rm ({metrics['objective']}): held-out accuracy {metrics['accuracy']:.2f}%, AUC {metrics['auc']} "
             f"over {metrics['count']} labels"]
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
