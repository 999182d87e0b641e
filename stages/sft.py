"""Stage 1: supervised fine-tuning on VQA and / or captions, loss on answer (caption) tokens only.

    vqa-rlhf sft configs/default.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m stages.sft configs/default.yaml sft.deepspeed=configs/deepspeed/zero2.json

setup: config -> processor + model (+ LoRA / QLoRA, freezing) -> datasets
train: HF Trainer (DeepSpeed, checkpoints every sft.save_steps, resume after a kill),
       held-out VQA accuracy every sft.eval_steps
save:  <run>/sft/final (stock-loadable model + processor + config), metrics.json

What it trains on (data.supervision, vlm/data.py training_tasks): VQA, captions or both,
whatever the dataset holds by default. VQA + captions mixes data.caption_ratio captions per
VQA question; captions alone (COCO captions, Flickr30k) trains on every train caption and
tracks the val captions' perplexity instead of VQA accuracy.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from torch.utils.data import ConcatDataset
from transformers import set_seed

from vlm.captioning import caption_perplexity
from vlm.config import RunConfig, to_dict
from vlm.data import (
    RejectLog,
    SupervisedDataset,
    answer_carrying,
    caption_items,
    corpus,
    load_split,
    training_tasks,
    vqa_items,
)
from vlm.features import FeatureStore, image_source
from vlm.generate import answer_questions
from vlm.model import build_model, build_processor, count_parameters, load_model
from vlm.retrieval import CaptionEmbeddingExamples, embedding_head, embedding_token_id
from vlm.stage_cli import parse_stage_args, run_stage, write_json
from vlm.train import (
    TrainingClock,
    build_trainer,
    is_main_process,
    mean_logged_loss,
    prepare_for_training,
    train_and_save,
)
from vlm.vqa_metric import score_records


def setup_model(config: RunConfig, work_dir: Path):
    """Processor and model, from a checkpoint, pretrained parts or scratch.

    The processor is saved in the stage dir on first start and reused on resume:
    a tokenizer trained again could differ, a saved one cannot."""
    model_config = config.model
    processor_dir = work_dir / "processor"
    if model_config.checkpoint:
        model, processor = load_model(model_config.checkpoint)
        base_dir = Path(model_config.checkpoint)
    else:
        if processor_dir.is_dir():
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(processor_dir)
        else:
            processor = build_processor(model_config, corpus(config))
            if is_main_process():  # atomically: a processor dir cut short by a kill would be loaded on resume
                staging = processor_dir.with_name(processor_dir.name + ".tmp")
                shutil.rmtree(staging, ignore_errors=True)
                processor.save_pretrained(staging)
                os.replace(staging, processor_dir)
        model = build_model(model_config, processor)
        base_dir = None
    processor.tokenizer.padding_side = "right"
    return prepare_for_training(model, processor, config.sft, base_dir, work_dir, "sft"), processor


def setup_data(config: RunConfig, processor, model, work_dir: Path, tasks: frozenset[str]):
    """Training examples of `tasks` (training_tasks), the held-out records and the image source.

    Held out: the val split's first sft.eval_samples VQA questions, or for captions alone
    its first sft.eval_samples captions."""
    data = config.data
    images = image_source(data.feature_cache, config.data_dir, processor, model, config.sft.freeze_vision,
                          "the model being trained")
    rejects = RejectLog(work_dir / "rejects.jsonl", data.on_bad_record)
    (work_dir / "rejects.jsonl").unlink(missing_ok=True)
    items, caption_examples, sources = [], [], []
    if "vqa" in tasks:
        vqa_train = load_split(config.data_dir, "vqa", data.train_split)
        if data.answer_images:
            vqa_train = answer_carrying(vqa_train, data.answer_images)
        if data.max_train_samples:
            vqa_train = vqa_train.select(range(min(data.max_train_samples, len(vqa_train))))
        sources.append(str(config.data_dir / "vqa" / data.train_split))
        items = list(vqa_items(vqa_train, data, sources[-1], rejects))
    if "captions" in tasks:
        captions = load_split(config.data_dir, "captions", data.train_split)
        if data.answer_images:
            captions = answer_carrying(captions, data.answer_images)
        if "vqa" in tasks:  # the mix: caption_ratio captions per VQA question, drawn at random
            count = int(len(vqa_train) * data.caption_ratio)
            rng = random.Random(config.seed)
            captions = captions.select([rng.randrange(len(captions)) for _ in range(count)])
        elif data.max_train_samples:  # a captioner: every caption (each image has several)
            captions = captions.select(range(min(data.max_train_samples, len(captions))))
        sources.append(str(config.data_dir / "captions" / data.train_split))
        caption_examples = list(caption_items(captions, data, sources[-1]))

    def encode(examples):
        return SupervisedDataset(examples, processor.tokenizer, images, model.config.image_seq_length,
                                 data.max_length, rejects)

    if config.model.clip_head and embedding_head(model) is None:
        raise ValueError(f"model.clip_head is set but {config.model.checkpoint} has no embedding head "
                         f"(it was saved without model.clip_head)")
    if embedding_head(model) is not None:  # model.clip_head: captions also train caption -> CLIP embedding
        if not caption_examples:
            raise ValueError(f"model.clip_head trains on captions: {config.data_dir}/captions/{data.train_split} "
                             f"is missing or data.caption_ratio is 0")
        dataset = ConcatDataset([encode(items), CaptionEmbeddingExamples(encode(caption_examples),
                                                                         embedding_token_id(processor.tokenizer))])
    else:
        dataset = encode(items + caption_examples)
    if len(dataset) == 0:
        raise ValueError(f"no usable training examples in {' and '.join(sources)} (see {rejects.path})")
    val = load_split(config.data_dir, "vqa" if "vqa" in tasks else "captions", data.val_split)
    val_records = [val[i] for i in range(min(config.sft.eval_samples, len(val)))]
    return dataset, val_records, images, rejects


class HeldOutAccuracy(TrainingClock):
    """Official VQA accuracy on a slice of the val split every `eval_steps`, logged with
    the training minutes it took to get there (eval time excluded; a resumed run continues
    the clock from its checkpoint). A captions-only run (`task` "captions") logs the val
    captions' perplexity instead."""

    def __init__(self, config: RunConfig, processor, records, images, log_path: Path, task: str = "vqa"):
        super().__init__()
        self.task = task
        self.config = config
        self.processor = processor
        self.records = records
        self.images = images
        self.log_path = log_path
        self.trainer = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control)
        if self.log_path.exists():
            entries = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
            # A fresh start drops an old curve; a resumed run keeps what led up to its checkpoint.
            entries = [e for e in entries if e["step"] <= state.global_step] if state.global_step else []
            if is_main_process():
                self.log_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
        if state.global_step == 0 and self.config.sft.eval_steps:
            with self.paused():
                self._evaluate(model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control)
        every = self.config.sft.eval_steps
        if every and (state.global_step % every == 0 or state.global_step == state.max_steps):
            with self.paused():
                self._evaluate(model, state)

    def _evaluate(self, model, state):
        cfg = self.config
        if self.task == "captions":
            was_training = model.training
            model.eval()
            perplexity = caption_perplexity(model, self.processor, self.records, self.images, cfg.data,
                                            cfg.eval.batch_size, RejectLog(None, "skip"))
            model.train(was_training)
            self._log(state, {"caption_perplexity": round(perplexity, 4)})
            return
        predictions = answer_questions(
            model, self.processor, self.records, self.images, cfg.data.prompt_template,
            cfg.eval.decoding, cfg.eval.batch_size, cfg.data.max_length,
        )
        report = score_records(
            {"question_id": r["id"], "prediction": p, "answers": r["answers"]}
            for r, p in zip(self.records, predictions)
        )
        self._log(state, {"vqa_accuracy": report.overall})

    def _log(self, state, values: dict):
        entry = {"step": state.global_step, "train_seconds": round(self.seconds, 2), **values}
        if is_main_process():
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.trainer is not None:
            self.trainer.log({f"val_{key}": value for key, value in values.items()})


def train(config: RunConfig, callbacks=()) -> dict:
    """Runs the stage; returns its metrics. `callbacks` are extra TrainerCallbacks."""
    work_dir = config.paths.stage_dir("sft")
    work_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    tasks = training_tasks(config.data, config.data_dir)  # before a tokenizer is trained on a missing dataset
    model, processor = setup_model(config, work_dir)
    dataset, val_records, images, rejects = setup_data(config, processor, model, work_dir, tasks)
    if is_main_process():
        print(
            f"sft: {len(dataset)} examples of {' + '.join(sorted(tasks))} ({rejects.count} rejected), "
            f"{count_parameters(model):,} parameters, {count_parameters(model, True):,} trainable",
            flush=True,
        )
        if isinstance(images, FeatureStore):
            print(f"sft: feature cache {images.path} (the vision tower is frozen and made it)", flush=True)

    held_out = HeldOutAccuracy(config, processor, val_records, images, work_dir / "eval_log.jsonl",
                               "vqa" if "vqa" in tasks else "captions")
    trainer = build_trainer(model, processor, dataset, config.sft, work_dir, config.seed, [held_out, *callbacks],
                            config.device)
    held_out.trainer = trainer
    result, seconds, final_dir = train_and_save(trainer, processor, config.sft, work_dir, to_dict(config), "sft")
    metrics = {
        "steps": trainer.state.global_step,
        "train_loss": mean_logged_loss(trainer.state.log_history),
        "seconds": round(seconds, 2),
        "examples": len(dataset),
        "tasks": sorted(tasks),
        "rejected": rejects.count,
        "checkpoint": str(final_dir),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        write_json(work_dir / "metrics.json", metrics)
    return metrics


def main(argv=None) -> int:
    config = parse_stage_args("sft", __doc__, argv)
    metrics = train(config)
    if is_main_process():
        print(f"sft: done in {metrics['seconds']:.0f} s, final model in {metrics['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
