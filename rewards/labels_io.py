"""Exported labels as the reward model and the baselines read them.

An export dir (`vqa-rlhf label export --db FILE --out DIR`) is a `datasets.Dataset`
saved with `save_to_disk`, plus labels.jsonl and meta.json `{"image_root": ...}`.
Rows: sample_id, question_id, image (relative to image_root), question, answer,
label ("correct" | "incorrect"), labeler, label_source ("human" | "auto"), gt_answers.

The held-out split is by image: the same image never lands on both sides, so the
reward model is judged on pictures it has not seen.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlm.vqa_metric import normalize_answer

REQUIRED_FIELDS = ("question_id", "image", "question", "answer", "label")
LABELS = {"correct": 1, "incorrect": 0}


def load_labels(labels_dir: str | Path) -> tuple[list[dict], Path]:
    """(rows, image_root); a bad row is an error naming the dir, the row and the field."""
    from datasets import load_from_disk

    labels_dir = Path(labels_dir)
    meta_path = labels_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{labels_dir}: no meta.json (not a label export; run `vqa-rlhf label export`)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta.get("image_root"), str):
        raise ValueError(f"{meta_path}: field 'image_root' is missing")
    dataset = load_from_disk(str(labels_dir))
    rows = []
    for index, row in enumerate(dataset):
        for name in REQUIRED_FIELDS:
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise ValueError(f"{labels_dir}: row {index} (sample_id {row.get('sample_id')}): field '{name}' is empty")
        if row["label"] not in LABELS:
            raise ValueError(f"{labels_dir}: row {index} (sample_id {row.get('sample_id')}): field 'label' is "
                             f"{row['label']!r}, expected one of {sorted(LABELS)}")
        row = dict(row)
        row["target"] = LABELS[row["label"]]
        row["gt_answers"] = list(row.get("gt_answers") or [])
        rows.append(row)
    if not rows:
        raise ValueError(f"{labels_dir}: no labels")
    return rows, Path(meta["image_root"])


def image_bucket(image: str) -> float:
    """A stable position in [0, 1) per image path (unlike hash(), the same on every run and machine)."""
    return int(hashlib.sha1(image.encode()).hexdigest()[:8], 16) / 16**8


def split_by_image(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Images whose bucket is below `fraction` are held out; with few images (a smoke run) at
    least one image lands on each side, the lowest-bucket one held out."""
    images = sorted({r["image"] for r in rows}, key=image_bucket)
    if len(images) < 2:
        raise ValueError(f"the labels show {len(images)} image(s); a held-out split by image needs at least 2")
    heldout_images = {i for i in images if image_bucket(i) < fraction}
    heldout_images = heldout_images or {images[0]}
    if len(heldout_images) == len(images):
        heldout_images.discard(images[-1])
    train = [r for r in rows if r["image"] not in heldout_images]
    heldout = [r for r in rows if r["image"] in heldout_images]
    return train, heldout


def pairs_by_question(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(correct, incorrect) answers to the same question about the same image, every combination."""
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["question_id"], row["image"]), {0: [], 1: []})[row["target"]].append(row)
    return [(good, bad) for g in groups.values() for good in g[1] for bad in g[0]]


def load_preference_pairs(labels_dir: str | Path) -> list[tuple[dict, dict]]:
    """The export's pairwise preferences (pairs.jsonl, from the labeling page's pairwise mode) as
    (chosen, rejected) rows shaped like label rows; [] when the export has none."""
    path = Path(labels_dir) / "pairs.jsonl"
    if not path.is_file():
        return []
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        pair = json.loads(line)
        for name in ("question_id", "image", "question", "chosen", "rejected"):
            if not isinstance(pair.get(name), str) or not pair[name].strip():
                raise ValueError(f"{path}: line {number}: field '{name}' is empty")
        common = {"question_id": pair["question_id"], "image": pair["image"], "question": pair["question"],
                  "gt_answers": list(pair.get("gt_answers") or [])}
        pairs.append(({**common, "sample_id": pair.get("chosen_sample_id"), "answer": pair["chosen"], "target": 1},
                      {**common, "sample_id": pair.get("rejected_sample_id"), "answer": pair["rejected"], "target": 0}))
    return pairs


def binary_metrics(scores: list[float], targets: list[int], threshold: float) -> dict:
    """Accuracy (%) at a threshold and ROC AUC in [0, 1] (None when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    correct = sum((s > threshold) == bool(t) for s, t in zip(scores, targets))
    auc = roc_auc_score(targets, scores) if len(set(targets)) == 2 else None
    return {"accuracy": round(100.0 * correct / len(targets), 2), "auc": None if auc is None else round(float(auc), 4),
            "count": len(targets), "threshold": threshold}


def fit_threshold(scores: list[float], targets: list[int]) -> float:
    """The cut between sorted scores that classifies the training labels best."""
    ranked = sorted(zip(scores, targets))
    positives_above = sum(targets)
    negatives_below = 0
    best = (positives_above, float(ranked[0][0]) - 1e-6)  # everything "correct"
    for i, (score, target) in enumerate(ranked):
        positives_above -= target
        negatives_below += 1 - target
        cut = score if i + 1 == len(ranked) else (score + ranked[i + 1][0]) / 2
        if i + 1 < len(ranked) and ranked[i + 1][0] == score:
            continue  # a cut must fall between distinct scores
        if positives_above + negatives_below > best[0]:
            best = (positives_above + negatives_below, float(cut))
    return best[1]


def breakdown_key(row: dict, families: dict[str, str]) -> str:
    """Question family when the dataset names it, else a kind read off the ground truth."""
    if row["question_id"] in families:
        return families[row["question_id"]]

    gt = [normalize_answer(a) for a in row["gt_answers"]]
    if not gt:
        return "unknown"
    top = max(set(gt), key=gt.count)
    if top in ("yes", "no"):
        return "yes/no"
    if top.isdigit():
        return "number"
    if top in COLOUR_WORDS:
        return "colour"
    return "other"


COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink", "gray", "grey"}


def question_families(image_root: Path) -> dict[str, str]:
    """question id -> question_family from the dataset the labels were drawn from, if it has one."""
    from datasets import load_from_disk

    path = Path(image_root) / "vqa"
    if not path.exists():
        return {}
    families = {}
    for split in load_from_disk(str(path)).values():
        if "question_family" in split.column_names:
            families.update(zip(split["id"], split["question_family"]))
    return families
