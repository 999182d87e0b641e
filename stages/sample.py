"""Candidate answers for labeling: K sampled answers per question plus the greedy one, into the label store.

    vqa-rlhf sample configs/default.yaml [key=value ...]            (the pipeline stage: sample.* keys)
    vqa-rlhf sample --model CKPT --data DIR --split rl --db FILE [--k 4 --temperature 1.0 --top-p 0.95]

Flags override the config's `sample:` section (model default <run>/sft/final,
db default <run>/labels/labels.db). Answers the VQA metric cannot tell apart
("Two", "two", "2") are merged into one sample, keeping the first text (the
greedy answer first). Every sample records its provenance: checkpoint, decoding
settings, split, time. A re-run skips questions already sampled from the same
checkpoint, so a killed run continues where it stopped. Records without a
question or image go to <db dir>/sample_rejects.jsonl.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from vlm.config import DecodingConfig, RunConfig
from vlm.stage_cli import config_from_args, run_stage, stage_parser, write_json
from rewards.label_store import LabelStore, StoreError, now_iso

FLAGS = {  # flag -> sample.* key
    "model": "model", "split": "split", "db": "db", "k": "k", "temperature": "temperature", "top_p": "top_p",
    "max_questions": "max_questions", "max_new_tokens": "max_new_tokens", "batch_size": "batch_size",
}


def check_record(record: dict) -> str | None:
    """Sampling needs a question and an image; ground-truth answers are optional."""
    if not isinstance(record.get("question"), str) or not record["question"].strip():
        return "field 'question' is empty"
    if not isinstance(record.get("image"), str) or not record["image"]:
        return "field 'image' is missing"
    return None


def ground_truth(record: dict) -> list[str]:
    answers = record.get("answers")
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        return answers
    return []


def usable_records(records, images, rejects, source: str) -> list[dict]:
    """Every record with a question and a readable image, in order; the others are counted rejects.
    Every usable record, sampled or not: batches are cut from this list the same way in every run."""
    todo = []
    for record in records:
        problem = check_record(record)
        if problem is None:
            try:
                images(record["image"])  # a missing or corrupt image is found here, not mid-batch
            except (ValueError, FileNotFoundError) as exc:
                problem = str(exc)
        if problem:
            rejects.reject(record.get("id"), source, problem)
            continue
        todo.append(record)
    return todo


def sampling_decoding(settings) -> DecodingConfig:
    """The sampling of sample.*, checked: K sampled answers per question, in batches of questions."""
    if settings.k < 0 or settings.batch_size < 1:
        raise SystemExit(f"error: sample.k must be >= 0 and sample.batch_size >= 1 "
                         f"(got {settings.k}, {settings.batch_size})")
    return DecodingConfig(strategy="sample", temperature=settings.temperature, top_p=settings.top_p,
                          max_new_tokens=settings.max_new_tokens)


def sample_provenance(config: RunConfig, checkpoint: str, split: str) -> dict:
    """What every sample records of where it came from: checkpoint, split, time, decoding settings."""
    settings = config.sample
    return {"checkpoint": checkpoint, "split": split, "created": now_iso(),
            "decoding": {"k": settings.k, "greedy": True, "temperature": settings.temperature,
                         "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
                         "seed": config.seed, "prompt_template": config.data.prompt_template,
                         "rlhf_round": config.round}}


def sample_to_store(config: RunConfig, progress: bool = True) -> dict:
    # Here, not at the top: they pull in torch and transformers, and `vqa-rlhf sample --help`
    # then takes 9 s instead of 0.2 s (measured on the 2-core box).
    from vlm.data import RejectLog, load_split
    from vlm.features import image_source
    from vlm.model import load_for_inference
    from rewards.sampling import sample_candidates

    settings = config.sample
    decoding = sampling_decoding(settings)
    model_dir = Path(settings.model) if settings.model else config.round_start_policy
    db_path = config.labels_db
    split = config.sample_split  # default data.rl_split: images SFT never trained on
    records = load_split(config.data_dir, "vqa", split)
    if settings.max_questions:
        if settings.max_questions > len(records):
            raise SystemExit(f"error: config key 'sample.max_questions' is {settings.max_questions}, but the pool "
                             f"{config.data_dir}/vqa/{split} has {len(records)} questions (null: all of them)")
        records = records.select(range(settings.max_questions))
    rejects = RejectLog(db_path.parent / "sample_rejects.jsonl", config.data.on_bad_record)
    source = f"{config.data_dir}/vqa/{split}"

    store = LabelStore(db_path, create=True)
    checkpoint = str(model_dir.resolve())
    done = store.sampled_question_ids(checkpoint)
    model, processor = load_for_inference(model_dir, config.device, config.inference_bf16, "sample")
    images = image_source(config.data.feature_cache, config.data_dir, processor, model, True, str(model_dir))
    todo = usable_records(records, images, rejects, source)
    batch_of = {str(record["id"]): index // settings.batch_size for index, record in enumerate(todo)}

    provenance = sample_provenance(config, checkpoint, split)
    counts = {"questions": 0, "added": 0, "merged": 0, "empty": 0}
    started = time.perf_counter()
    batch_rows, current_batch = [], None

    def flush():
        # One transaction per batch of questions: a kill loses at most the batch being generated.
        # A batch is stored whole or not at all, so a resumed run regenerates whole batches.
        result = store.add_samples(config.data_dir, batch_rows, provenance)
        counts["added"] += result["added"]
        counts["merged"] += result["merged"]
        batch_rows.clear()

    for record, candidates, empty in sample_candidates(
            model, processor, todo, images, config.data.prompt_template, settings.k, decoding,
            settings.batch_size, config.data.max_length, progress=progress, seed=config.seed, skip=done):
        if batch_of[str(record["id"])] != current_batch:
            flush()
            current_batch = batch_of[str(record["id"])]
        counts["questions"] += 1
        counts["empty"] += empty
        counts["merged"] += 1 + settings.k - empty - len(candidates)
        batch_rows += [{"question_id": str(record["id"]), "image": record["image"], "question": record["question"],
                        "answer": answer, "gt_answers": ground_truth(record), "greedy": greedy}
                       for answer, greedy in candidates]
    flush()
    summary = {**counts, "skipped_already_sampled": len(done), "rejected": rejects.count,
               "samples_in_store": store.count_samples(), "db": str(db_path), "checkpoint": checkpoint,
               "seconds": round(time.perf_counter() - started, 2), **provenance["decoding"]}
    store.close()
    write_json(db_path.parent / "sample.json", summary)
    return summary


def main(argv=None) -> int:
    parser = stage_parser("sample", __doc__)
    parser.add_argument("--model", help="checkpoint to sample from (default: <run>/sft/final)")
    parser.add_argument("--data", help="dataset dir in the project's schema (default: the config's data dir)")
    parser.add_argument("--split", help="split to sample questions from (default: data.rl_split, images SFT never "
                                        "trained on)")
    parser.add_argument("--db", help="label store (default: <run>/labels/labels.db)")
    parser.add_argument("--k", type=int, help="sampled answers per question besides the greedy one")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling top-p")
    parser.add_argument("--max-questions", dest="max_questions", type=int, help="first N questions of the split")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="answer length limit")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="questions per generate() call")
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(args)
    flags = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, **flags))
    if args.data:  # another dataset: the config's feature cache holds the config's images, not these
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, dir=args.data, feature_cache=None))
    try:
        summary = sample_to_store(config)
    except (FileNotFoundError, KeyError, StoreError) as exc:
        sys.exit(f"error: {exc}")
    print(f"sample: {summary['questions']} questions -> {summary['added']} new samples "
          f"({summary['merged']} duplicates merged, {summary['empty']} empty answers dropped, "
          f"{summary['rejected']} records rejected); {summary['samples_in_store']} samples in {summary['db']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
