"""Does a reward know more than the policy? Measurements for the rm stage's report.

- ranking_accuracy: of two answers to the same question whose official VQA accuracy differs,
  how often the reward scores the better one higher (ties in the reward count half). 50% is a
  coin; a reward that only knows what the policy knows stays near it.
- label_noise: the share of labels that disagree with the majority annotator answer (an answer
  two or three of ten annotators gave is labeled correct; the majority answer labeled
  incorrect): noise a reward model trained on the labels has to learn around.
- best_of_n: n sampled answers per held-out question, picked by the reward, against the
  policy's greedy answer, a random sample, a majority vote of the n and the oracle pick (the
  best of the n by the official metric): whether the reward's pick beats what the policy
  would do alone, and how much room the samples leave.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from vlm.data import reference_of, vqa_prompt
from vlm.generate import generate
from vlm.vqa_metric import normalize_answer, vqa_accuracy
from rewards.base import inputs_from_references


def ranking_accuracy(rows: list[dict], scores: list[float]) -> dict:
    """Within-question pairs of labeled answers (rows with ground truth) whose official accuracy differs."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for row, score in zip(rows, scores):
        if row["gt_answers"]:
            groups.setdefault((row["question_id"], row["image"]), []).append(
                (vqa_accuracy(row["answer"], row["gt_answers"]), score))
    right, pairs = 0.0, 0
    for answers in groups.values():
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                (acc_a, score_a), (acc_b, score_b) = answers[i], answers[j]
                if acc_a == acc_b:
                    continue
                pairs += 1
                right += 0.5 if score_a == score_b else float((score_a > score_b) == (acc_a > acc_b))
    return {"accuracy": round(100.0 * right / pairs, 2) if pairs else None, "pairs": pairs}


def majority_answer(gt_answers: list[str]) -> str:
    """The most common normalized annotator answer (ties: the first given)."""
    normalized = [normalize_answer(a) for a in gt_answers]
    counts = Counter(normalized)
    return max(normalized, key=lambda a: (counts[a], -normalized.index(a)))


def label_noise(rows: list[dict]) -> dict:
    """Labels (rows with ground truth) that disagree with the majority annotator answer."""
    judged = [r for r in rows if r["gt_answers"]]
    noisy = sum((normalize_answer(r["answer"]) == majority_answer(r["gt_answers"])) != bool(r["target"])
                for r in judged)
    return {"share": round(100.0 * noisy / len(judged), 2) if judged else None, "labels": len(judged),
            "noisy": noisy}


@torch.no_grad()
def best_of_n(policy, processor, reward, records: list[dict], images, captions: dict[str, str], data, decoding,
              n: int, batch_size: int, seed: int = 0) -> dict:
    """Test accuracy (%, official metric) of: the greedy answer, the reward's pick of n samples, a
    random sample (the mean over the n), the majority vote of the n, and the oracle pick.

    `images` is the policy's image source; `data` the DataConfig (prompt template, max length);
    `decoding` the sampling settings (temperature, top_p, max_new_tokens)."""
    torch.manual_seed(seed)
    policy.eval()
    tokenizer = processor.tokenizer
    totals = dict.fromkeys(("greedy", "reward", "random", "majority", "oracle"), 0.0)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        pixels = torch.stack([images(r["image"]) for r in batch])
        prompts = [vqa_prompt(data.prompt_template, r["question"]) for r in batch]
        greedy = generate(policy, tokenizer, prompts, pixels, replace(decoding, strategy="greedy"), data.max_length,
                          image_kind=images.kind)
        sampled = generate(policy, tokenizer, prompts, pixels, replace(decoding, strategy="sample"), data.max_length,
                           num_return_sequences=n, image_kind=images.kind)
        references = [reference_of(r, captions) for r in batch for _ in range(n)]
        scores = reward(inputs_from_references(references, sampled)).tolist()
        for i, record in enumerate(batch):
            answers, rewards = sampled[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]
            accuracies = [vqa_accuracy(a, record["answers"]) for a in answers]
            votes = Counter(normalize_answer(a) for a in answers)
            voted = max(range(n), key=lambda k: (votes[normalize_answer(answers[k])], -k))
            totals["greedy"] += vqa_accuracy(greedy[i], record["answers"])
            totals["reward"] += accuracies[max(range(n), key=lambda k: (rewards[k], -k))]
            totals["random"] += sum(accuracies) / n
            totals["majority"] += accuracies[voted]
            totals["oracle"] += max(accuracies)
    return {"n": n, "questions": len(records), **{k: round(100.0 * v / len(records), 2) for k, v in totals.items()}}


def question_group(record: dict) -> str:
    """The group a record's candidates come from: its question family, else its answer type."""
    return record.get("question_family") or record.get("answer_type") or "all"


def family_candidates(records: list[dict], limit: int = 20, forms: int = 3) -> dict[str, dict[str, list[str]]]:
    """Each question family's candidate answers: the majority answers its questions have in `records`
    (the `limit` most common; the synthetic families: counts, the six colours, yes / no, the shapes,
    the sides), each with its surface forms, the `forms` commonest annotator spellings of it ("2",
    "two"; "yes", "Yes"): a model that learned the annotators' spread splits its belief among them."""
    counts: dict[str, Counter] = {}
    spellings: dict[str, Counter] = {}
    for record in records:
        family = question_group(record)
        counts.setdefault(family, Counter())[majority_answer(record["answers"])] += 1
        for answer in record["answers"]:
            spellings.setdefault(normalize_answer(answer), Counter())[answer.strip()] += 1
    return {family: {answer: [form for form, _ in spellings.get(answer, Counter({answer: 1})).most_common(forms)]
                     for answer, _ in sorted(counter.most_common(limit))}
            for family, counter in counts.items()}


@torch.no_grad()
def candidate_top1(reward, records: list[dict], candidates: dict[str, dict[str, list[str]]],
                   captions: dict[str, str]) -> dict:
    """Does the reward know the answers? For each record, every candidate answer of its family is
    scored (a candidate: its best-scored surface form); the record counts as right when the
    top-scored candidate has the best official VQA accuracy among them (ties in score: the first
    candidate). Per family and overall, in %."""
    right: Counter = Counter()
    total: Counter = Counter()
    skipped = 0
    for record in records:
        family = question_group(record)
        answers = list((candidates.get(family) or {}).items())
        if len(answers) < 2:
            continue
        texts = [form for _, forms in answers for form in forms]
        try:
            scores = reward(inputs_from_references([reference_of(record, captions)] * len(texts), texts)).tolist()
        except ValueError:  # the record does not fit the reward's input (e.g. facts beyond data.max_length)
            skipped += 1
            continue
        best, position = [], 0
        for _, forms in answers:
            best.append(max(scores[position:position + len(forms)]))
            position += len(forms)
        accuracies = [vqa_accuracy(answer, record["answers"]) for answer, _ in answers]
        pick = max(range(len(answers)), key=lambda k: (best[k], -k))
        right[family] += accuracies[pick] == max(accuracies)
        total[family] += 1
    by_family = {family: round(100.0 * right[family] / total[family], 2) for family in sorted(total)}
    overall = round(100.0 * sum(right.values()) / sum(total.values()), 2) if total else None
    return {"overall": overall, "questions": sum(total.values()), "by_family": by_family, "skipped": skipped}
