"""Stage 3: LLaVA instruction tuning on multi-turn conversations, loss on assistant turns only.

    vqa-rlhf instruct configs/default.yaml [--model DIR] [key=value ...]
    torchrun --nproc_per_node 2 -m stages.instruct configs/default.yaml instruct.deepspeed=configs/deepspeed/zero2.json

setup: the model of an earlier stage (--model / instruct.init_from; default <run>/ppo/final
       if it exists, else <run>/sft/final) + LoRA / QLoRA / freezing as instruct.* says;
       conversations in the LLaVA format (conversations/ of instruct.data_dir, default data.dir;
       text-only records too) + packed VQA examples replayed (instruct.vqa_replay_ratio)
train: HF Trainer (DeepSpeed, checkpoints every instruct.save_steps, resume after a kill)
eval:  VQA accuracy on the test split before (the stored evaluation of the starting model, e.g.
       <run>/eval/ppo, else <run>/eval/instruct-before) and after (<run>/eval/instruct)
       and description quality on held-out images: "Describe the image." scored against the
       scene's objects (vlm/describe_metric.py; synthetic data only), and the exact-match
       accuracy of later turns of held-out conversations answered after the true earlier turns
save:  <run>/instruct/final (stock-loadable model + processor + config), metrics.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from vlm.config import RunConfig, to_dict
from vlm.data import (
    ImageCache,
    RejectLog,
    SupervisedDataset,
    conversation_items,
    load_split,
    prompt_ids,
    vqa_items,
    vqa_prompt,
)
from vlm.describe_metric import DescriptionScore, parse_description
from vlm.evaluation import evaluate, stored_or_evaluate
from vlm.generate import generate
from vlm.model import count_parameters, load_for_inference, load_model
from vlm.stage_cli import config_from_args, run_stage, stage_parser, write_json
from vlm.train import build_trainer, is_main_process, mean_logged_loss, prepare_for_training, train_and_save


def init_model_dir(config: RunConfig) -> Path:
    """The model instruct starts from: instruct.init_from, else the run's PPO policy, else its SFT model."""
    if config.instruct.init_from:
        return Path(config.instruct.init_from)
    ppo = config.paths.final("ppo")
    return ppo if (ppo / "config.json").is_file() else config.sft_final


def conversations_dir(config: RunConfig) -> Path:
    return Path(config.instruct.data_dir) if config.instruct.data_dir else config.data_dir


def setup_model(config: RunConfig, init_dir: Path, work_dir: Path):
    model, processor = load_model(init_dir)
    return prepare_for_training(model, processor, config.instruct, init_dir, work_dir, "instruct"), processor


def setup_data(config: RunConfig, processor, model, work_dir: Path):
    """Conversations + replayed VQA examples; each source reads images from its own dataset dir."""
    data, instruct = config.data, config.instruct
    rejects = RejectLog(work_dir / "rejects.jsonl", data.on_bad_record)
    (work_dir / "rejects.jsonl").unlink(missing_ok=True)
    seq, max_length = model.config.image_seq_length, data.max_length
    positions = model.config.text_config.max_position_embeddings  # GPT-2: n_positions
    if max_length > positions:
        raise ValueError(f"data.max_length={max_length} is longer than the model's context ({positions} positions)")

    conv_dir = conversations_dir(config)
    records = load_split(conv_dir, "conversations", data.train_split)
    if instruct.max_train_samples:
        records = records.select(range(min(instruct.max_train_samples, len(records))))
    source = str(conv_dir / "conversations" / data.train_split)
    conversations = SupervisedDataset(
        conversation_items(records, data, source, rejects), processor.tokenizer,
        ImageCache(processor.image_processor, conv_dir), seq, max_length, rejects,
    )
    if len(conversations) == 0:
        raise ValueError(f"no usable conversations in {source} (see {rejects.path})")
    parts = [conversations]

    replay = int(len(conversations) * instruct.vqa_replay_ratio)
    if replay > 0:
        vqa_source = str(config.data_dir / "vqa" / data.train_split)
        items = list(vqa_items(load_split(config.data_dir, "vqa", data.train_split), data, vqa_source, rejects))
        picks = random.Random(config.seed).sample(items, min(replay, len(items)))
        parts.append(SupervisedDataset(
            picks, processor.tokenizer, ImageCache(processor.image_processor, config.data_dir), seq, max_length,
            rejects,
        ))
    text_only = sum(image is None for _, image in conversations.examples)
    check_text_only_under_zero3(instruct.deepspeed, text_only)
    return torch.utils.data.ConcatDataset(parts), [len(p) for p in parts], text_only, rejects


def check_text_only_under_zero3(deepspeed_config: str | None, text_only: int) -> None:
    """A batch without images skips the vision tower. Under ZeRO-3 on several ranks each module's
    weights are gathered collectively, so one rank skipping the tower while another runs it would
    hang: refused up front rather than deadlocked later."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (text_only and deepspeed_config and world > 1):
        return
    stage = json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage")
    if stage == 3:
        raise ValueError(f"{text_only} text-only conversations with ZeRO-3 on {world} ranks: a rank whose batch "
                         f"has no image skips the vision tower and the weight gathering hangs; use ZeRO-2 or "
                         f"one process")


def scene_grid(data_dir: Path) -> int:
    meta = data_dir / "meta.json"
    return json.loads(meta.read_text())["config"].get("grid", 3) if meta.is_file() else 3


def evaluate_descriptions(config: RunConfig, model_dir: Path, tag: str) -> dict | None:
    """"Describe the image." on held-out images, scored against their scenes' objects.
    None when the dataset has no scene ground truth (real-image sources)."""
    data, instruct = config.data, config.instruct
    captions = load_split(config.data_dir, "captions", config.eval.split)
    if "objects" not in captions.column_names:
        return None
    if instruct.describe_samples:
        captions = captions.select(range(min(instruct.describe_samples, len(captions))))
    records = list(captions)
    model, processor = load_for_inference(model_dir, config.device, config.inference_bf16, f"describe[{tag}]")
    images = ImageCache(processor.image_processor, config.data_dir)
    prompt = vqa_prompt(data.prompt_template, data.caption_prompt)
    decoding = dataclasses.replace(config.eval.decoding, max_new_tokens=instruct.describe_max_new_tokens)
    grid = scene_grid(config.data_dir)
    score = DescriptionScore()
    out_dir = config.paths.eval_dir(tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "descriptions.jsonl.tmp"
    torch.manual_seed(config.seed)
    batches = range(0, len(records), config.eval.batch_size)
    with open(tmp, "w") as f:
        for start in tqdm(batches, desc=f"describing ({tag})", unit="batch"):
            batch = records[start:start + config.eval.batch_size]
            pixels = torch.stack([images(r["image"]) for r in batch])
            texts = generate(model, processor.tokenizer, [prompt] * len(batch), pixels, decoding, data.max_length)
            for record, text in zip(batch, texts):
                counts = score.add(parse_description(text, grid), record["objects"])
                f.write(json.dumps({"id": record["id"], "image": record["image"], "description": text,
                                    "caption": record["caption"], **counts}) + "\n")
    tmp.replace(out_dir / "descriptions.jsonl")
    result = {"model": str(model_dir), "split": config.eval.split, "prompt": data.caption_prompt,
              **score.result()}
    write_json(out_dir / "description_metrics.json", result)
    return result


def evaluate_followups(config: RunConfig, model_dir: Path, tag: str) -> dict | None:
    """Later turns of held-out conversations, each answered after the true earlier turns (as a
    user would have seen them): exact-match accuracy of the answer, overall and by question.
    None when the dataset has no conversations split to test on."""
    conv_dir = conversations_dir(config)
    try:
        records = load_split(conv_dir, "conversations", config.eval.split)
    except (FileNotFoundError, KeyError):
        return None
    if config.instruct.describe_samples:
        records = records.select(range(min(config.instruct.describe_samples, len(records))))
    model, processor = load_for_inference(model_dir, config.device, config.inference_bf16, f"follow-ups[{tag}]")
    eos = processor.tokenizer.eos_token
    rejects = RejectLog(None, "skip")
    cases = []  # (image, prompt with the true history, expected answer, question)
    too_long = 0  # turns whose history leaves no room for an answer in data.max_length
    seq = model.config.image_seq_length
    for _, _, image, turns in conversation_items(records, config.data, str(conv_dir), rejects):
        if image is None:
            continue
        history = ""
        for index, (prompt, answer) in enumerate(turns):
            if index > 0:
                if len(prompt_ids(processor.tokenizer, history + prompt, seq)) < config.data.max_length:
                    cases.append((image, history + prompt, answer.strip(), prompt.strip().split("\n")[-2]))
                else:
                    too_long += 1
            history += prompt + answer + eos
    if not cases:
        return None
    images = ImageCache(processor.image_processor, conv_dir)
    decoding = dataclasses.replace(config.eval.decoding, max_new_tokens=config.instruct.describe_max_new_tokens)
    right, by_question = 0, {}
    batch_size = config.eval.batch_size
    for start in tqdm(range(0, len(cases), batch_size), desc=f"follow-ups ({tag})", unit="batch"):
        batch = cases[start:start + batch_size]
        pixels = torch.stack([images(c[0]) for c in batch])
        texts = generate(model, processor.tokenizer, [c[1] for c in batch], pixels, decoding, config.data.max_length)
        for (_, _, expected, question), text in zip(batch, texts):
            ok = text.strip().rstrip(".").lower() == expected.rstrip(".").lower()
            right += ok
            key = question.removeprefix("USER: ")
            key = key if key in ("Where is it?", "What shape is it?") else "other"
            counts = by_question.setdefault(key, [0, 0])
            counts[0] += ok
            counts[1] += 1
    return {"turns": len(cases), "skipped_too_long": too_long, "accuracy": round(100.0 * right / len(cases), 2),
            "by_question": {k: round(100.0 * r / n, 2) for k, (r, n) in sorted(by_question.items())}}


def model_scores(config: RunConfig, model_dir: Path, tag: str, reuse_stored: bool = False):
    """(VQA metrics, description metrics, follow-up metrics) of a model, into <run>/eval/<tag>.
    reuse_stored: the VQA scores an earlier stage stored for this model (eval, ppo), if any."""
    vqa = stored_or_evaluate(config, model_dir, tag)[0] if reuse_stored else evaluate(config, model_dir, tag)
    return vqa, evaluate_descriptions(config, model_dir, tag), evaluate_followups(config, model_dir, tag)


def train(config: RunConfig, callbacks=()) -> dict:
    """Runs the stage; returns its metrics. `callbacks` are extra TrainerCallbacks."""
    started = time.perf_counter()
    work_dir = config.paths.stage_dir("instruct")
    work_dir.mkdir(parents=True, exist_ok=True)
    init_dir = init_model_dir(config)
    if not (init_dir / "config.json").is_file():
        raise FileNotFoundError(f"{init_dir}: no model to start from (run the sft stage first, "
                                f"or give --model DIR / instruct.init_from)")
    main = is_main_process()
    before, describe_before, followups_before = (
        model_scores(config, init_dir, "instruct-before", reuse_stored=True) if main else (None, None, None))

    set_seed(config.seed)
    model, processor = setup_model(config, init_dir, work_dir)
    dataset, sizes, text_only, rejects = setup_data(config, processor, model, work_dir)
    if main:
        print(
            f"instruct: from {init_dir}; {sizes[0]} conversations ({text_only} text-only) + "
            f"{sum(sizes[1:])} replayed VQA examples ({rejects.count} rejected), "
            f"{count_parameters(model):,} parameters, {count_parameters(model, True):,} trainable",
            flush=True,
        )
    trainer = build_trainer(model, processor, dataset, config.instruct, work_dir, config.seed, callbacks, config.device)
    training_started = time.perf_counter()
    result, train_seconds, final_dir = train_and_save(
        trainer, processor, config.instruct, work_dir, to_dict(config), "instruct")
    # The stage's seconds: the evaluations of this (last) start plus training across every start.
    training_here = time.perf_counter() - training_started
    if not trainer.is_world_process_zero():
        return {}
    after, describe_after, followups_after = model_scores(config, final_dir, "instruct")
    metrics = {
        "vqa_accuracy_before": before["vqa_accuracy"],
        "vqa_accuracy_after": after["vqa_accuracy"],
        "description_precision": describe_after["objects"]["precision"] if describe_after else None,
        "description_recall": describe_after["objects"]["recall"] if describe_after else None,
        "seconds": round(time.perf_counter() - started - training_here + train_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "init_from": str(init_dir),
        "checkpoint": str(final_dir),
        "steps": trainer.state.global_step,
        "train_loss": mean_logged_loss(trainer.state.log_history),
        "conversations": sizes[0],
        "text_only": text_only,
        "vqa_replayed": sum(sizes[1:]),
        "rejected": rejects.count,
        "description_before": describe_before,
        "description_after": describe_after,
        "followups_before": followups_before,
        "followups_after": followups_after,
        "vqa_by_answer_type_before": before["by_answer_type"],
        "vqa_by_answer_type_after": after["by_answer_type"],
        "log_history": trainer.state.log_history,
    }
    write_json(work_dir / "metrics.json", metrics)
    return metrics


def main(argv=None) -> int:
    parser = stage_parser("instruct", __doc__)
    parser.add_argument("--model", help="model dir to start from (default: instruct.init_from, else "
                                        "<run>/ppo/final if it exists, else <run>/sft/final)")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    if args.model:
        config.instruct.init_from = args.model
    metrics = train(config)
    if is_main_process():
        print(f"instruct: done in {metrics['seconds']:.0f} s; VQA accuracy {metrics['vqa_accuracy_before']:.2f} -> "
              f"{metrics['vqa_accuracy_after']:.2f}", end="")
        if metrics["description_precision"] is not None:
            print(f"; descriptions: precision {metrics['description_precision']:.2f}, "
                  f"recall {metrics['description_recall']:.2f}", end="")
        print(f"; final model in {metrics['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
