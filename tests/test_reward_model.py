"""The multimodal reward model, its losses, its training stage and the baselines."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rewards.labels_io import binary_metrics, fit_threshold, split_by_image
from rewards.reward_model import RewardModel, last_token_index
from rewards.train_rm import pairwise_loss, pointwise_loss
from tests.conftest import REPO


@pytest.fixture
def reward_model(saved_tiny_model):
    torch.manual_seed(0)
    model = RewardModel.from_sft(saved_tiny_model).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a head that reacts visibly to its input
    return model


def _rows(model, lengths):
    image = model.config.image_token_index
    n_image = model.config.image_seq_length
    torch.manual_seed(1)
    return [[image] * n_image + torch.randint(5, 200, (n,)).tolist() for n in lengths]


def _pad(rows, pad_id, side):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def test_reward_reads_last_non_pad_token_under_left_and_right_padding(reward_model):
    pad = 0  # GPT-2 pads with EOS: here a token id that also occurs as a real token
    rows = _rows(reward_model, [3, 7, 5])
    pixels = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        alone = torch.stack([reward_model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), pixels[i:i + 1])[0]
                             for i, r in enumerate(rows)])
        for side in ("left", "right"):
            ids, mask = _pad(rows, pad, side)
            padded = reward_model(ids, mask, pixels)
            torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
            # and it is the head at the last unmasked position, not at the last column
            per_token = reward_model.token_values(ids, mask, pixels)
            expected = per_token[torch.arange(3), torch.tensor([len(r) - 1 if side == "right" else ids.shape[1] - 1
                                                                for r in rows])]
            torch.testing.assert_close(padded, expected)
    assert last_token_index(torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])).tolist() == [3, 1]


def test_images_change_the_reward(reward_model):
    rows = _rows(reward_model, [4, 4])
    ids, mask = _pad(rows[:1] * 2, 0, "right")
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        rewards = reward_model(ids, mask, pixels)
    assert not torch.allclose(rewards[0], rewards[1]), "same text, different images, same reward: image ignored"


def test_reward_model_saves_and_loads(reward_model, tmp_path):
    from transformers import AutoModel

    reward_model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    for loaded in (RewardModel.from_pretrained(tmp_path / "rm"), AutoModel.from_pretrained(tmp_path / "rm")):
        assert isinstance(loaded, RewardModel)
        for (name, a), (_, b) in zip(reward_model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    # what TRL's PPO reads: the backbone by base_model_prefix and the per-token head
    assert getattr(loaded, loaded.base_model_prefix) is loaded.model and callable(loaded.score)


def test_pointwise_and_pairwise_losses():
    rewards = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 1.0])
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                 + math.log(torch.sigmoid(torch.tensor(0.5)))) / 3
    assert pointwise_loss(rewards, targets).item() == pytest.approx(expected, rel=1e-5)
    pair = torch.tensor([3.0, 1.0, 0.0, 2.0], requires_grad=True)  # correct: 3, 1; incorrect: 0, 2
    loss = pairwise_loss(pair)
    assert loss.item() == pytest.approx(-(math.log(torch.sigmoid(torch.tensor(3.0))) +
                                          math.log(torch.sigmoid(torch.tensor(-1.0)))) / 2, rel=1e-5)
    loss.backward()
    assert (pair.grad[:2] < 0).all() and (pair.grad[2:] > 0).all()  # raise correct, lower incorrect


def test_threshold_metrics_and_split():
    scores, targets = [0.1, 0.2, 0.8, 0.9, 0.7], [0, 0, 1, 1, 1]
    threshold = fit_threshold(scores, targets)
    assert 0.2 < threshold < 0.7
    metrics = binary_metrics(scores, targets, threshold)
    assert metrics["accuracy"] == 100.0 and metrics["auc"] == 1.0
    assert binary_metrics([0.9, 0.1], [0, 1], 0.5) == {"accuracy": 0.0, "auc": 0.0, "count": 2, "threshold": 0.5}
    rows = [{"image": f"images/{i % 10}.png", "i": i} for i in range(100)]
    train, heldout = split_by_image(rows, 0.3)
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in heldout})
    assert split_by_image(rows, 0.3) == (train, heldout)  # deterministic


def test_similarity_baseline_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from rewards.baselines import load_similarity_model, similarity_scores

    model = load_similarity_model()
    same, colour, other = similarity_scores(model, [
        {"answer": "red", "gt_answers": ["red"]}, {"answer": "black", "gt_answers": ["red"]},
        {"answer": "triangle", "gt_answers": ["red"]}])
    assert same == pytest.approx(1.0, abs=1e-4) and colour < same
    assert colour > 0.4  # colours sit close together: why similarity accepts wrong colours


def planted_labels(data_dir, out_dir, per_image: int = 4):
    """correct = the majority ground-truth answer, incorrect = an answer from another question."""
    from datasets import Dataset, load_from_disk

    records = load_from_disk(str(data_dir / "vqa"))["train"]
    rows = []
    for i, record in enumerate(records):
        wrong = "purple" if record["multiple_choice_answer"] != "purple" else "green"
        for answer, label in ((record["multiple_choice_answer"], "correct"), (wrong, "incorrect")):
            rows.append({"sample_id": len(rows), "question_id": record["id"], "image": record["image"],
                         "question": record["question"], "answer": answer, "label": label, "labeler": "auto",
                         "label_source": "auto", "gt_answers": list(record["answers"])})
    Dataset.from_list(rows).save_to_disk(str(out_dir))
    (out_dir / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / "meta.json").write_text(json.dumps({"image_root": str(data_dir)}))
    return out_dir


@pytest.mark.parametrize("objective,lora", [("pointwise", False), ("pairwise", False), ("pointwise", True)])
def test_rm_stage_on_planted_labels(objective, lora, saved_tiny_model, tiny_data_dir, tiny_overrides, tmp_path):
    from vlm.config import load_config
    from stages.rm import train

    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    config = load_config(REPO / "configs/default.yaml", [
        *tiny_overrides, f"rm.objective={objective}", "rm.steps=30", "rm.batch_size=16", "rm.lr=3e-3",
        "rm.warmup_steps=0", "rm.save_steps=100", "rm.logging_steps=10", "rm.heldout_fraction=0.3",
        f"rm.lora.enabled={str(lora).lower()}", "rm.lora.r=4"])
    metrics = train(config, labels, saved_tiny_model, tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and 0 <= metrics["accuracy"] <= 100
    assert metrics["heldout_labels"] > 0 and metrics["train_labels"] > 0
    # "purple" for a colour question is the planted hard case; elsewhere the wrong answer is off-topic
    assert metrics["auc"] > 0.6, metrics
    baselines = metrics["baselines"]
    assert baselines["exact_match"]["accuracy"] == 100.0  # planted wrong answers are never in the ground truth
    assert 0 <= baselines["similarity"]["accuracy"] <= 100 and baselines["similarity"]["auc"] is not None
    assert set(metrics["by_group"]) and set(baselines["similarity"]["by_group"]) == set(metrics["by_group"])
    loaded = RewardModel.from_pretrained(tmp_path / "rm" / "final")
    assert isinstance(loaded, RewardModel)


def test_bad_label_row_names_the_row(tmp_path, tiny_data_dir):
    from datasets import Dataset

    from rewards.labels_io import load_labels

    out = tmp_path / "bad"
    Dataset.from_list([{"sample_id": 7, "question_id": "q", "image": "i.png", "question": "Q?", "answer": "a",
                        "label": "maybe", "labeler": "x", "label_source": "human", "gt_answers": []}]).save_to_disk(str(out))
    (out / "meta.json").write_text(json.dumps({"image_root": str(tiny_data_dir)}))
    with pytest.raises(ValueError, match="sample_id 7.*label"):
        load_labels(out)


def test_pairwise_preferences_train_the_pairwise_reward_model(saved_tiny_model, tiny_data_dir, tiny_overrides, tmp_path):
    """Pairs people compared on the labeling page (pairs.jsonl of the export) are training pairs of
    rm.objective=pairwise, beside the pairs the correct / incorrect labels make."""
    from vlm.config import load_config
    from stages.rm import train

    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    rows = [json.loads(l) for l in (labels / "labels.jsonl").read_text().splitlines()]
    # the preferences: the ground-truth answer over "triangle"; labels: only correct ones (no labelled pairs)
    preferred = [r for r in rows if r["label"] == "correct"]
    (labels / "pairs.jsonl").write_text("".join(json.dumps({
        "question_id": r["question_id"], "image": r["image"], "question": r["question"], "chosen": r["answer"],
        "rejected": "triangle", "labelers": "ann", "gt_answers": r["gt_answers"]}) + "\n" for r in preferred))
    from datasets import Dataset

    Dataset.from_list(preferred).save_to_disk(str(tmp_path / "only-correct"))
    only_correct = tmp_path / "only-correct"
    for name in ("meta.json", "pairs.jsonl"):
        (only_correct / name).write_text((labels / name).read_text())
    config = load_config(REPO / "configs/default.yaml", [
        *tiny_overrides, "rm.objective=pairwise", "rm.steps=2", "rm.batch_size=8", "rm.warmup_steps=0",
        "rm.save_steps=100", "rm.best_of_n=0"])
    metrics = train(config, only_correct, saved_tiny_model, tmp_path / "rm")
    assert metrics["preference_pairs"] > 0 and metrics["steps"] == 2
    (only_correct / "pairs.jsonl").unlink()
    with pytest.raises(SystemExit, match="labels in .*only-correct: rm.objective=pairwise needs .* or pairwise preferences"):
        train(config, only_correct, saved_tiny_model, tmp_path / "rm2")
