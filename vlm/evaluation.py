"""VQA evaluation of a saved model: answer a split's questions, score them with the official
metric, write the challenge's results file; and two evaluations compared question by question.

The eval stage (stages/evaluate.py) runs it on the SFT model right after SFT; later stages
that compare against a model already evaluated (ppo, instruct) reuse that stored evaluation
(`stored_or_evaluate`) instead of answering the same questions again.

Writes <run>/eval/<tag>/: results.json (the official results format, [{"question_id",
"answer"}], every question of the split exactly once, answers post-processed as the
challenge's answer processor does, checked against the questions file before it is written),
predictions.jsonl (raw prediction + ground truth, the input of `vqa-rlhf score`) and
metrics.json (overall, per answer type, per question type and family, plus the majority-answer
baseline on the same split).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm.config import RunConfig
from vlm.data import check_vqa_record, load_split
from vlm.features import image_source
from vlm.files import write_json
from vlm.generate import answer_questions
from vlm.model import load_for_inference
from vlm.regions import probe_towers
from vlm.vqa_metric import check_results, official_question_id, read_question_ids, score_records, submission_answer


def _scored(records, predictions, group_field: str):
    return score_records(
        {
            "question_id": r["id"],
            "prediction": p,
            "answers": r["answers"],
            "answer_type": r.get("answer_type"),
            "question_type": r.get(group_field) or r.get("question_type"),
        }
        for r, p in zip(records, predictions)
    )


def majority_answer_baseline(config: RunConfig, records) -> dict:
    """Always answering the train split's most common answer: the floor a model must clear."""
    train = load_split(config.data_dir, "vqa", config.data.train_split)
    answer, _ = Counter(train["multiple_choice_answer"]).most_common(1)[0]
    report = _scored(records, [answer] * len(records), "question_type")
    return {"answer": answer, "vqa_accuracy": report.overall, "by_answer_type": report.by_answer_type}


def memorisation_check(config: RunConfig, model, processor, images) -> dict | None:
    """The same scores on the first eval.train_check_samples training questions: far above the
    test figure, the model memorised its training images instead of learning to see."""
    if not config.eval.train_check_samples:
        return None
    train = load_split(config.data_dir, "vqa", config.data.train_split)
    records = [r for r in train.select(range(min(config.eval.train_check_samples, len(train))))
               if check_vqa_record(r) is None]
    predictions = answer_questions(model, processor, records, images, config.data.prompt_template,
                                   config.eval.decoding, config.eval.batch_size, config.data.max_length)
    report = _scored(records, predictions, "question_type")
    return {"split": config.data.train_split, "count": report.count, "vqa_accuracy": report.overall,
            "by_question_family": _scored(records, predictions, "question_family").by_question_type}


def tower_probe(config: RunConfig, model) -> dict | None:
    """Per-cell shape / colour / place probe of the model's vision tower (vlm/regions.py), where
    the data's captions name their regions (the built-in data); None elsewhere."""
    try:
        return probe_towers(config, {"tower": model.model.vision_tower})["tower"]
    except (ValueError, FileNotFoundError) as exc:
        print(f"note: no per-cell probe of the vision tower: {exc}", flush=True)
        return None


def submission_questions(config: RunConfig, records: list[dict], questions_file: Path | None,
                         partial: bool) -> tuple[list, str]:
    """The question ids a results file must answer, and where they come from: --questions,
    the VQA v2 questions file the split was converted from (meta.json), or the split itself.
    A slice (eval.max_samples) answers only its own questions."""
    split_dir = config.data_dir / "vqa" / config.eval.split
    if partial:
        return ([official_question_id(r["id"]) for r in records],
                f"the first {len(records)} questions of {split_dir} (eval.max_samples: not a complete submission)")
    if questions_file is None:
        meta_path = config.data_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        converted = meta.get("converted", {}).get("vqa", {}).get(config.eval.split, {})
        sources = [Path(s) for s in converted.get("sources", [])]
        if converted.get("converter") == "vqav2" and sources and sources[0].is_file():
            questions_file = sources[0]  # the questions file (the annotations file comes second)
    if questions_file is not None:
        return read_question_ids(questions_file), str(questions_file)
    return [official_question_id(r["id"]) for r in records], str(split_dir)


def submission(records: list[dict], predictions: list[str]) -> list[dict]:
    """The official results format, answers as the challenge's answer processor leaves them."""
    return [{"question_id": official_question_id(r["id"]), "answer": submission_answer(p)}
            for r, p in zip(records, predictions)]


def questions_to_answer(config: RunConfig, results_path: Path, questions_file: Path | None):
    """eval.split's questions (eval.max_samples of them), each with a question and an image, and the
    question ids the results file must answer, checked before hours of answering: a question the
    converter rejected (its image missing, say) is named now. -> (records, question ids, where from)."""
    split = config.eval.split
    records = load_split(config.data_dir, "vqa", split)
    total = len(records)
    if config.eval.max_samples:
        records = records.select(range(min(config.eval.max_samples, len(records))))
    records = list(records)
    for r in records:  # every question is answered: a submission needs all of them
        for name in ("question", "image"):
            if not isinstance(r.get(name), str) or not r[name].strip():
                raise ValueError(f"{config.data_dir}/vqa/{split}: record {r.get('id')}: field '{name}' is empty; "
                                 f"every question needs an answer in the results file")
    if not records:
        raise ValueError(f"{config.data_dir}/vqa/{split}: no questions")
    question_ids, checked_against = submission_questions(config, records, questions_file, len(records) < total)
    try:
        check_results(submission(records, [""] * len(records)), question_ids, str(results_path), checked_against)
    except ValueError as exc:
        raise ValueError(f"{config.data_dir}/vqa/{split} cannot give a complete results file (questions the "
                         f"converter rejected are in {config.data_dir}/rejects.jsonl): {exc}") from None
    return records, question_ids, checked_against


def write_predictions(path: Path, records: list[dict], predictions: list[str], report) -> None:
    """predictions.jsonl: each prediction with its ground truth and score (the input of `vqa-rlhf score`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r, p in zip(records, predictions):
            f.write(json.dumps({
                "question_id": r["id"], "question": r["question"], "prediction": p, "answers": r["answers"],
                "answer_type": r.get("answer_type"), "question_type": r.get("question_type"),
                "question_family": r.get("question_family"),
                "accuracy": report.per_question.get(r["id"]) if report else None,
            }) + "\n")
    tmp.replace(path)


PARTIAL = "answers.partial"  # <run>/eval/<tag>/answers.partial[.rankR-of-W].jsonl while answering


def shard_of_this_rank() -> tuple[int, int]:
    """(rank, world size) of an evaluation under torchrun (the eval stage joins the ranks in a
    process group), (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def partial_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / (f"{PARTIAL}.jsonl" if world == 1 else f"{PARTIAL}.rank{rank}-of-{world}.jsonl")


def partial_key(config: RunConfig, model_dir: Path, dtype: torch.dtype) -> dict:
    """What the answers of a partial file depend on: another model (or the same folder retrained),
    split, decoding, prompt or precision starts the answering over instead of mixing answers."""
    weights = sorted(Path(model_dir).glob("*.safetensors*"))
    return {"model": str(model_dir), "weights_mtime": max((w.stat().st_mtime for w in weights), default=None),
            "split": config.eval.split, "decoding": vars(config.eval.decoding), "seed": config.seed,
            "prompt_template": config.data.prompt_template, "max_length": config.data.max_length,
            "dtype": str(dtype)}


def read_partial(path: Path, key: dict) -> dict[str, str]:
    """The answers a killed evaluation left (question id -> answer) when they are of the same key;
    a torn last line (killed mid-write) is dropped, and the file is rewritten without it so that
    appends start on a line of their own."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if header != {"partial_of": key}:
        path.unlink()
        return {}
    answers, kept = {}, [lines[0]]
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # only the last line can be torn: appends are whole batches, fsynced in order
        answers[row["question_id"]] = row["answer"]
        kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return answers


def answer_resumably(config: RunConfig, model, processor, records: list[dict], images, path: Path,
                     key: dict) -> tuple[dict[str, str], int]:
    """Answers to `records` (question id -> answer; and how many answered now), each batch appended to `path` as soon as it is
    answered: a killed evaluation resumes with the questions it had not answered, none twice.
    Uninterrupted, the batches (and so the answers) are those of one pass over the records."""
    answers = read_partial(path, key)
    todo = [r for r in records if str(r["id"]) not in answers]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"partial_of": key}) + "\n")
    if answers:
        print(f"eval: resuming: {len(answers)} of {len(records)} questions answered before ({path})", flush=True)
    batch_size = config.eval.batch_size
    with open(path, "a") as f, tqdm(total=len(records), initial=len(records) - len(todo), desc="answering",
                                    unit="question", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = answer_questions(model, processor, batch, images, config.data.prompt_template,
                                     config.eval.decoding, batch_size, config.data.max_length)
            f.write("".join(json.dumps({"question_id": str(r["id"]), "answer": a}) + "\n" for r, a in zip(batch, texts)))
            f.flush()
            os.fsync(f.fileno())  # on disk before the next batch: a kill loses at most the batch being answered
            answers.update((str(r["id"]), a) for r, a in zip(batch, texts))
            bar.update(len(batch))
    return answers, len(todo)


def evaluate(config: RunConfig, model_dir: Path, tag: str, questions_file: Path | None = None,
             sharded: bool = False) -> dict | None:
    """Answers eval.split's questions with the model at `model_dir` and scores them into <run>/eval/<tag>.
    `sharded` (the eval stage under torchrun, in a process group): ranks answer disjoint shards and
    rank 0 writes the one results file; the other ranks return None. Not sharded, the training
    stages' rank 0 evaluates alone while the other ranks wait in their own process group."""
    out_dir = config.paths.eval_dir(tag)
    split = config.eval.split
    results_path = out_dir / "results.json"
    records, question_ids, checked_against = questions_to_answer(config, results_path, questions_file)
    rank, world = shard_of_this_rank() if sharded else (0, 1)

    torch.manual_seed(config.seed)  # sampling decodes are reproducible
    model, processor = load_for_inference(model_dir, config.device, config.inference_bf16, f"eval[{tag}]")
    images = image_source(config.data.feature_cache, config.data_dir, processor, model, True, str(model_dir))
    key = partial_key(config, model_dir, model.dtype)
    started = time.perf_counter()
    answers, answered_now = answer_resumably(config, model, processor, records[rank::world], images,
                                             partial_path(out_dir, rank, world), key)
    seconds = time.perf_counter() - started
    if world > 1:
        torch.distributed.barrier()  # every shard's answers are on disk
        if rank != 0:
            return None
        for other in range(1, world):
            answers.update(read_partial(partial_path(out_dir, other, world), key))
    predictions = [answers[str(r["id"])] for r in records]

    out_dir.mkdir(parents=True, exist_ok=True)
    results = submission(records, predictions)
    check_results(results, question_ids, str(results_path), checked_against)
    write_json(results_path, results)
    # Scored: the questions that have their ten answers (all of them, or none in test-dev / test).
    scored = [(r, p) for r, p in zip(records, predictions) if check_vqa_record(r) is None]
    report = _scored(*zip(*scored), "question_type") if scored else None
    write_predictions(out_dir / "predictions.jsonl", records, predictions, report)
    for shard in range(world):  # answered and written: the partial answers are done with
        partial_path(out_dir, shard, world).unlink(missing_ok=True)
    where = {"results": str(results_path), "results_checked_against": checked_against,
             "device": str(next(model.parameters()).device), "dtype": str(model.dtype).removeprefix("torch."),
             "ranks": world}
    if report is None:
        # Nothing to score: no metrics.json (one left from another split would be read as this one's).
        (out_dir / "metrics.json").unlink(missing_ok=True)
        return {"model": str(model_dir), "split": split, "count": len(records), "scored": 0, **where,
                "seconds": round(seconds, 2)}
    metrics = {
        "model": str(model_dir),
        "split": split,
        **where,
        "count": report.count,
        "scored": report.count,
        "vqa_accuracy": report.overall,
        "by_answer_type": report.by_answer_type,
        "by_question_type": report.by_question_type,
        "by_question_family": _scored(*zip(*scored), "question_family").by_question_type,
        "seconds": round(seconds, 2),
        "samples_per_second": round(answered_now * world / seconds, 1),  # answered by this run, all ranks
        "baselines": {"majority_answer": majority_answer_baseline(config, [r for r, _ in scored])},
        "train_check": memorisation_check(config, model, processor, images),
        "tower_probe": tower_probe(config, model),
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def read_predictions(eval_dir: Path) -> dict[str, dict]:
    """An evaluation's predictions.jsonl by question id."""
    path = Path(eval_dir) / "predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions (run `vqa-rlhf eval` for it)")
    return {str(row["question_id"]): row for row in map(json.loads, filter(str.strip, path.read_text().splitlines()))}


def paired_bootstrap_ci(differences: list[float], seed: int = 0, resamples: int = 2000) -> list[float]:
    """95% CI of the mean of per-question differences (percentile bootstrap over questions)."""
    values = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # in a loop: 2,400 questions x 2,000 resamples at once is 38 MB of indices
        means[i] = values[rng.integers(0, len(values), len(values))].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return [round(float(low), 2), round(float(high), 2)]


def error_removed(before: float, after: float) -> float:
    """The share (%) of the start's error (100 - accuracy) that the change removed; negative: added."""
    return round(100.0 * (after - before) / (100.0 - before), 2) if before < 100 else 0.0


def compare_evaluations(before_dir: Path, after_dir: Path, seed: int = 0) -> dict:
    """Two evaluations of the same questions compared question by question (official metric, points):
    the change with its paired bootstrap 95% CI, the share of the error removed, how many questions
    got better / worse, and the same per question family (or question type where there is none)."""
    before, after = read_predictions(before_dir), read_predictions(after_dir)
    if before.keys() != after.keys():
        raise ValueError(f"{before_dir} and {after_dir} answer different questions "
                         f"({len(before.keys() - after.keys())} only in the first, "
                         f"{len(after.keys() - before.keys())} only in the second)")
    ids = sorted(before)
    diffs = [100.0 * (after[q]["accuracy"] - before[q]["accuracy"]) for q in ids]
    groups: dict[str, list[str]] = {}
    for q in ids:
        groups.setdefault(before[q].get("question_family") or before[q].get("question_type") or "all", []).append(q)
    mean = lambda qs, rows: 100.0 * sum(rows[q]["accuracy"] for q in qs) / len(qs)
    by_family = {}
    for name, qs in sorted(groups.items()):
        b, a = mean(qs, before), mean(qs, after)
        by_family[name] = {"before": round(b, 2), "after": round(a, 2), "error_removed": error_removed(b, a),
                           "better": sum(after[q]["accuracy"] > before[q]["accuracy"] for q in qs),
                           "worse": sum(after[q]["accuracy"] < before[q]["accuracy"] for q in qs), "count": len(qs)}
    b, a = mean(ids, before), mean(ids, after)
    return {"change": round(a - b, 2), "ci95": paired_bootstrap_ci(diffs, seed), "error_removed": error_removed(b, a),
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs), "by_family": by_family}




def stored_evaluation(config: RunConfig, model_dir: Path) -> tuple[dict, Path] | None:
    """An evaluation of `model_dir` already in <run>/eval (its metrics and folder), or None.

    It counts when it answered this config's questions (same split, same number of answers)
    and was written after the model's weights: an evaluation of an earlier model saved to the
    same folder is not this model's."""
    weights = list(Path(model_dir).glob("*.safetensors*"))  # one file, or shards and their index
    if not weights:
        return None
    saved = max(path.stat().st_mtime for path in weights)
    expected = len(load_split(config.data_dir, "vqa", config.eval.split))
    if config.eval.max_samples:
        expected = min(expected, config.eval.max_samples)
    for metrics_path in sorted(config.paths.eval_root.glob("*/metrics.json")):
        eval_dir = metrics_path.parent
        predictions = eval_dir / "predictions.jsonl"
        if not predictions.is_file() or metrics_path.stat().st_mtime < saved:
            continue
        metrics = json.loads(metrics_path.read_text())
        if (metrics.get("model") == str(model_dir) and metrics.get("split") == config.eval.split
                and sum(1 for line in predictions.open() if line.strip()) == expected):
            return metrics, eval_dir
    return None


def stored_or_evaluate(config: RunConfig, model_dir: Path, tag: str) -> tuple[dict, Path]:
    """The stored evaluation of `model_dir` (the eval stage scores the SFT model right after SFT),
    else a new one into <run>/eval/<tag>: the same questions are never answered twice."""
    stored = stored_evaluation(config, model_dir)
    if stored is not None:
        print(f"eval: {model_dir} was evaluated in {stored[1]}; reusing it", flush=True)
        return stored
    return evaluate(config, model_dir, tag), config.paths.eval_dir(tag)
