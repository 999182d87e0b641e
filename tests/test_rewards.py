"""The reward interface (rewards/base.py) and each reward, RL on unseen prompts, the reward-hacking
guard, the before/after comparison, and GRPO / RLOO log-probs under left padding."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from rewards.base import RewardContext, RewardInput, build_reward
from tests.conftest import REPO
from tests.test_ppo import ppo_config, ppo_dirs  # noqa: F401  (fixture)


def item(answer, answers=("red",) * 10, caption=None, record_id="q1", image="images/train/000000.png",
         question="What color is the circle?"):
    return RewardInput(record_id, image, question, answer, tuple(answers), caption)


def config_with(tiny_overrides, *extra):
    from vlm.config import load_config

    return load_config(REPO / "configs/default.yaml", [*tiny_overrides, *extra])


def context_for(processor, data_dir):
    from vlm.data import ImageCache
    from rewards.base import RewardContext

    pixels = ImageCache(processor.image_processor, data_dir)
    return RewardContext(processor, lambda model: pixels, data_dir)


# ---------------------------------------------------------------- each reward behind one interface

def test_vqa_accuracy_reward_is_the_official_metric_and_needs_reference_answers(tiny_overrides, tiny_processor,
                                                                                tiny_data_dir):
    from vlm.vqa_metric import vqa_accuracy
    from rewards.base import build_reward

    reward = build_reward(config_with(tiny_overrides, "ppo.reward=vqa_accuracy"),
                          context_for(tiny_processor, tiny_data_dir))
    answers = ["2"] * 6 + ["two"] * 2 + ["3"] * 2
    inputs = [item("2", answers), item("two", answers), item("3", answers), item("4", answers)]
    assert reward(inputs).tolist() == pytest.approx([vqa_accuracy(i.answer, answers) for i in inputs])
    assert reward([item("3", answers)]).item() == pytest.approx(0.6)  # two of ten annotators: partial credit
    with pytest.raises(ValueError, match="record q7 .*'reference_answers'"):
        reward([item("2", answers=(), record_id="q7")])


def test_similarity_reward_is_minilm_against_the_closest_reference(tiny_overrides, tiny_processor, tiny_data_dir):
    from rewards.base import build_reward

    reward = build_reward(config_with(tiny_overrides, "ppo.reward=similarity"),
                          context_for(tiny_processor, tiny_data_dir))
    same, colour, other = reward([item("red"), item("black"), item("triangle")]).tolist()
    assert same == pytest.approx(1.0, abs=1e-4) and other < colour < same


def test_model_reward_scores_an_answer_as_the_reward_model_was_trained_on_it(tiny_overrides, tiny_processor,
                                                                             tiny_data_dir, ppo_dirs):
    from vlm.data import ImageCache
    from rewards.base import build_reward
    from rewards.reward_model import RewardModel
    from rewards.train_rm import encode_rows, score

    sft, rm = ppo_dirs
    config = config_with(tiny_overrides, f"ppo.reward_model={rm}")
    reward = build_reward(config, context_for(tiny_processor, tiny_data_dir))
    assert reward.name == "model" and not reward.needs
    records = [("images/train/000000.png", "red"), ("images/train/000001.png", "purple triangle"),
               ("images/train/000001.png", "red")]
    inputs = [item(answer, image=image) for image, answer in records]
    reward_model = RewardModel.from_pretrained(rm).eval()
    expected = score(reward_model, encode_rows(
        [{"question_id": "q1", "image": image, "question": "What color is the circle?", "answer": answer, "target": 1}
         for image, answer in records], tiny_processor.tokenizer, ImageCache(tiny_processor.image_processor, tiny_data_dir),
        config.data.prompt_template, config.data.answer_template, reward_model.config.image_seq_length,
        config.data.max_length), tiny_processor.tokenizer.pad_token_id)
    scores = reward(inputs)
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-4)
    assert scores[0] != scores[2]  # same answer, another image: the reward sees the image
    assert reward([item("")]).shape == (1,)  # an empty answer is scored (as "?"), not an error


def test_rewards_mix_as_a_weighted_sum(tiny_overrides, tiny_processor, tiny_data_dir, ppo_dirs):
    from rewards.base import build_reward

    context = context_for(tiny_processor, tiny_data_dir)
    common = [f"ppo.reward_model={ppo_dirs[1]}"]
    model = build_reward(config_with(tiny_overrides, *common), context)
    mixed = build_reward(config_with(tiny_overrides, *common, "ppo.reward=model+vqa_accuracy",
                                     "ppo.reward_weights={vqa_accuracy: 2.5}"), context)
    inputs = [item("red"), item("blue"), item("red", image="images/train/000002.png")]
    expected = model(inputs) + 2.5 * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(mixed(inputs), expected)
    assert mixed.name == "model+vqa_accuracy" and mixed.needs == ("reference_answers",)
    assert mixed.threshold == pytest.approx(model.threshold + 2.5 * (0.6 - 1e-6))


def test_reward_config_errors_name_the_key_and_suggest(tiny_overrides, tmp_path):
    """Checked where rewards are resolved (vlm/config.py knows no reward names) and by the
    pipeline before its first stage."""
    from vlm.config import ConfigError
    from rewards.registry import check_reward_config

    with pytest.raises(ConfigError, match=r"ppo.reward.*'vqa_acuracy'.*did you mean vqa_accuracy"):
        check_reward_config(config_with(tiny_overrides, "ppo.reward=vqa_acuracy").ppo)
    with pytest.raises(ConfigError, match=r"ppo.reward_weights.similarity.*not in ppo.reward"):
        check_reward_config(config_with(tiny_overrides, "ppo.reward_weights={similarity: 1}").ppo)
    with pytest.raises(ConfigError, match=r"ppo.reward_weights.model.*number"):
        check_reward_config(config_with(tiny_overrides, "ppo.reward_weights={model: high}").ppo)
    with pytest.raises(ConfigError, match=r"did you mean vqa_accuracy"):
        build_reward(config_with(tiny_overrides, "ppo.reward=vqa_acuracy"), RewardContext(None, None, tmp_path))
    result = subprocess.run([str(REPO / "launch.sh"), "ppo.reward=vqa_acuracy", f"output_root={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "did you mean vqa_accuracy" in result.stderr
    assert not (tmp_path / "default").exists()  # no stage started


# ---------------------------------------------------------------- the fact-augmented reward model

FACT_COLOURS = ("red", "blue")


@pytest.fixture
def colour_facts(tiny_data_dir, tmp_path):
    """Labels whose correctness only the image's reference facts tell: every image is the same
    picture, its caption names a colour, and the answer naming that colour is the correct one
    (two colours: the tiny model learns to compare the answer with the caption in seconds)."""
    from datasets import Dataset, DatasetDict

    root = tmp_path / "facts-data"
    (root / "images").mkdir(parents=True)
    captions, rows = [], []
    for i in range(36):
        colour, image = FACT_COLOURS[i % 2], f"images/{i:03d}.png"
        shutil.copy(tiny_data_dir / "images/train/000000.png", root / image)
        captions.append({"id": str(i), "image": image, "caption": colour})
        rows += [{"sample_id": len(rows), "question_id": f"q{i}", "image": image, "question": "What colour is named?",
                  "answer": answer, "label": "correct" if answer == colour else "incorrect", "labeler": "auto",
                  "label_source": "auto", "gt_answers": []} for answer in FACT_COLOURS]
    DatasetDict({"train": Dataset.from_list(captions)}).save_to_disk(str(root / "captions"))
    labels = tmp_path / "facts-labels"
    Dataset.from_list(rows).save_to_disk(str(labels))
    (labels / "meta.json").write_text(json.dumps({"image_root": str(root)}))
    return root, labels


def test_the_fact_model_reads_the_caption_and_a_wrong_caption_flips_its_score(
        colour_facts, saved_tiny_model, tiny_overrides, tiny_processor, tiny_data_dir, tmp_path):
    from rewards.base import build_reward
    from stages.rm import train

    root, labels = colour_facts
    config = config_with(tiny_overrides, "rm.facts=true", "rm.objective=pointwise", "rm.steps=200", "rm.batch_size=36", "rm.lr=3e-3",
                         "rm.warmup_steps=0", "rm.save_steps=1000", "rm.logging_steps=100", "rm.heldout_fraction=0.25",
                         "rm.best_of_n=0", "rm.freeze_vision=true")
    assert config.rm_dir == config.run_dir / "rm-fact"
    metrics = train(config, labels, saved_tiny_model)
    assert metrics["facts"] and metrics["accuracy"] >= 95, metrics  # held-out images: only the caption tells
    reward = build_reward(config_with(tiny_overrides, "ppo.reward=fact_model"), context_for(tiny_processor, root))
    assert reward.name == "fact_model"
    asked = dict(answers=(), image="images/000.png", question="What colour is named?")
    right = reward([item(c, caption=c, **asked) for c in FACT_COLOURS])
    wrong = reward([item(c, caption=other, **asked) for c, other in zip(FACT_COLOURS, FACT_COLOURS[::-1])])
    assert (right > reward.threshold).all() and (wrong < reward.threshold).all(), (right, wrong, reward.threshold)

    # a plain `model` reward never reads facts: given the fact model, it refuses rather than score without them
    with pytest.raises(ValueError, match="with the image's reference facts; use ppo.reward=fact_model"):
        build_reward(config_with(tiny_overrides, f"ppo.reward_model={config.ppo_fact_model}"),
                     context_for(tiny_processor, root))


def test_fact_model_training_needs_captions(saved_tiny_model, tiny_overrides, tiny_data_dir, tmp_path):
    from stages.rm import train
    from tests.test_reward_model import planted_labels

    no_captions = tmp_path / "no-captions"
    shutil.copytree(tiny_data_dir, no_captions, ignore=shutil.ignore_patterns("captions"))
    labels = planted_labels(no_captions, tmp_path / "labels")
    with pytest.raises(SystemExit, match="rm.facts=true needs .* no captions"):
        train(config_with(tiny_overrides, "rm.facts=true", "rm.objective=pointwise", "rm.steps=1"), labels,
              saved_tiny_model)


def test_soft_targets_train_on_the_official_accuracy(saved_tiny_model, tiny_data_dir, tiny_overrides, tmp_path,
                                                    monkeypatch):
    from vlm.vqa_metric import vqa_accuracy
    from rewards.labels_io import load_labels
    from stages import rm as rm_stage
    from tests.test_reward_model import planted_labels

    seen = {}

    class Capturing(rm_stage.RewardTrainer):
        def __init__(self, *args, train_dataset, **kwargs):
            seen["targets"] = [example["target"] for example in train_dataset]
            super().__init__(*args, train_dataset=train_dataset, **kwargs)

    monkeypatch.setattr(rm_stage, "RewardTrainer", Capturing)
    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    # each question's least common annotator answer too, labeled incorrect: the official metric gives it credit
    rows = [json.loads(l) for l in (labels / "labels.jsonl").read_text().splitlines()]
    for row in [r for r in rows if r["label"] == "correct"]:
        minority = min(row["gt_answers"], key=row["gt_answers"].count)
        rows.append({**row, "sample_id": len(rows), "answer": minority, "label": "incorrect"})
    from datasets import Dataset

    shutil.rmtree(labels)
    Dataset.from_list(rows).save_to_disk(str(labels))
    (labels / "meta.json").write_text(json.dumps({"image_root": str(tiny_data_dir)}))
    config = config_with(tiny_overrides, "rm.soft_targets=true", "rm.steps=1", "rm.batch_size=4", "rm.best_of_n=0",
                         "rm.heldout_fraction=0.3")
    metrics = rm_stage.train(config, labels, saved_tiny_model, tmp_path / "rm")
    rows, _ = load_labels(labels)
    held_out = {r["image"] for r in rm_stage.split_by_image(rows, 0.3)[1]}
    expected = [vqa_accuracy(r["answer"], r["gt_answers"]) for r in rows if r["image"] not in held_out]
    assert seen["targets"] == pytest.approx(expected) and metrics["soft_targets"]
    assert 0 < sum(0 < t < 1 for t in expected)  # partial credit: an answer 1-2 annotators gave


# ---------------------------------------------------------------- RL on unseen prompts, verifiable reward

def test_ppo_with_the_verifiable_reward_draws_unseen_prompts_and_scores_the_official_metric(
        tiny_overrides, ppo_dirs):
    from vlm.vqa_metric import vqa_accuracy
    from rewards.ppo_run import PPORun

    run = PPORun(ppo_config(tiny_overrides, ppo_dirs, "ppo.reward=vqa_accuracy", "ppo.reward_model=/nonexistent"))
    trainer = run.build()  # no reward model needed: the critic starts from the policy's backbone
    batch = next(iter(trainer.dataloader))
    assert {ref["image"].split("/")[1] for ref in batch["references"]} == {"rl"}
    assert all(ref["caption"] for ref in batch["references"])  # the image's facts travel with the prompt
    torch.manual_seed(0)
    rollout = trainer.rollout(batch)
    expected = torch.tensor([vqa_accuracy(t, ref["answers"]) for t, ref in zip(rollout["texts"], rollout["references"])])
    has_eos = ((rollout["responses"] == run.processor.tokenizer.eos_token_id) & rollout["response_mask"].bool()).any(1)
    torch.testing.assert_close(rollout["scores"], expected - 1.0 * (~has_eos).float())  # missing_eos_penalty 1


# ---------------------------------------------------------------- the reward-hacking guard

def test_hacking_alarm_fires_when_reward_rises_while_agreement_falls():
    from rewards.ppo_run import hacking_alarm

    def log(rewards, agreements):
        return [{"step": 0, "val_vqa_accuracy": 50}] + [
            {"step": i + 1, "mean_reward": r, "rm_vqa_agreement": a} for i, (r, a) in enumerate(zip(rewards, agreements))]

    assert hacking_alarm(log([0, 0, 1, 1], [90, 90, 80, 80]), window=2, drop=5)
    assert not hacking_alarm(log([0, 0, 1, 1], [90, 90, 88, 88]), window=2, drop=5)  # agreement holds
    assert not hacking_alarm(log([1, 1, 0, 0], [90, 90, 80, 80]), window=2, drop=5)  # reward falls too
    assert not hacking_alarm(log([0, 0, 1], [90, 90, 50]), window=2, drop=5)  # too few updates to tell


class PlantedHacking:
    """Registered as a reward in the planted run: it agrees with the ground truth for the first two
    rollouts, then pays every answer 10 (more the wronger it is): reward up, agreement down."""

    @classmethod
    def from_config(cls, config, context):
        from rewards.vqa_accuracy_reward import VQAAccuracyReward

        class Planted(VQAAccuracyReward):
            calls = 0

            def score(self, inputs):
                self.calls += 1
                honest = super().score(inputs)
                return honest if self.calls <= 2 else [10.0 + (1.0 - a) for a in honest]

        return Planted(config.autolabel.min_accuracy)


@pytest.fixture
def planted_held_out(monkeypatch):
    """Held-out accuracy by update as planted here; the policy's weights at each evaluation kept."""
    from rewards.ppo_run import PPORun

    planted, weights = {}, {}

    def held_out(self, trainer):
        update = trainer.state.global_step
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        weights[update] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        return planted[update]

    monkeypatch.setattr(PPORun, "held_out_accuracy", held_out)
    return planted, weights


def saved_policy(config):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(config.run_dir / "ppo" / "final").state_dict()


def assert_same_weights(saved, expected):
    for key, value in saved.items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_a_planted_hacking_run_stops_early_and_keeps_the_best_held_out_policy(
        tiny_overrides, ppo_dirs, planted_held_out, monkeypatch, capsys):
    from rewards import registry
    from stages.ppo import train

    planted, weights = planted_held_out
    planted.update({0: 40.0, 2: 50.0, 4: 45.0, 6: 44.0, 8: 43.0})
    monkeypatch.setitem(registry.REWARDS, "planted", "tests.test_rewards:PlantedHacking")
    config = ppo_config(tiny_overrides, ppo_dirs, "ppo.reward=planted", "ppo.steps=8", "ppo.eval_steps=2",
                        "ppo.hacking_window=2", "ppo.hacking_drop=5")
    metrics = train(config)
    log = [json.loads(l) for l in (config.run_dir / "ppo" / "log.jsonl").read_text().splitlines()]
    alarms = [e["step"] for e in log if e.get("hacking_alarm")]
    assert alarms == [4] and metrics["hacking_alarm_at"] == 4
    assert metrics["stopped_early"] and metrics["updates"] == 4 < metrics["planned_updates"] == 8
    assert metrics["kept_update"] == 2 and metrics["kept_because"].startswith("best held-out")
    assert_same_weights(saved_policy(config), weights[2])
    assert "REWARD-HACKING ALARM" in capsys.readouterr().out


def test_a_run_that_ends_worse_than_its_start_on_held_out_keeps_the_start_and_says_so(
        tiny_overrides, ppo_dirs, planted_held_out, capsys):
    from stages.ppo import train

    planted, weights = planted_held_out
    planted.update({0: 50.0, 2: 40.0})
    config = ppo_config(tiny_overrides, ppo_dirs, "ppo.steps=2", "ppo.eval_steps=2", "ppo.lr=1e-2")
    metrics = train(config)
    assert not metrics["stopped_early"] and metrics["kept_update"] == 0
    assert "below the start's" in metrics["kept_because"]
    assert "WARNING" in capsys.readouterr().out
    assert_same_weights(saved_policy(config), weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])  # PPO did change the policy


def test_a_run_that_ends_at_least_as_good_keeps_its_last_policy(tiny_overrides, ppo_dirs, planted_held_out):
    from stages.ppo import train

    planted, weights = planted_held_out
    planted.update({0: 50.0, 2: 50.0})
    config = ppo_config(tiny_overrides, ppo_dirs, "ppo.steps=2", "ppo.eval_steps=2")
    metrics = train(config)
    assert metrics["kept_update"] == 2 and metrics["kept_because"] == "last"
    assert_same_weights(saved_policy(config), weights[2])


# ---------------------------------------------------------------- before / after, question by question

def write_predictions(eval_dir, accuracies, families):
    eval_dir.mkdir(parents=True)
    eval_dir.joinpath("predictions.jsonl").write_text("".join(
        json.dumps({"question_id": f"q{i}", "accuracy": a, "question_family": f}) + "\n"
        for i, (a, f) in enumerate(zip(accuracies, families))))


def test_before_after_comparison_is_paired_over_questions(tmp_path):
    from vlm.evaluation import compare_evaluations

    families = ["count"] * 50 + ["colour"] * 50
    before = [0.3] * 100
    after = [1.0] * 20 + [0.3] * 30 + [0.0] * 5 + [0.3] * 45  # 20 count questions fixed, 5 colour ones broken
    write_predictions(tmp_path / "before", before, families)
    write_predictions(tmp_path / "after", after, families)
    result = compare_evaluations(tmp_path / "before", tmp_path / "after")
    change = (20 * 0.7 - 5 * 0.3)  # points over 100 questions
    assert result["change"] == pytest.approx(change)
    low, high = result["ci95"]
    assert 0 < low < change < high
    assert result["error_removed"] == pytest.approx(100 * change / 70, abs=0.01)
    assert (result["better"], result["worse"]) == (20, 5)
    assert result["by_family"]["count"] == {"before": 30.0, "after": 58.0, "error_removed": 40.0, "better": 20,
                                            "worse": 0, "count": 50}
    assert result["by_family"]["colour"]["worse"] == 5 and result["by_family"]["colour"]["error_removed"] < 0
    write_predictions(tmp_path / "other", after[:99], families[:99])
    with pytest.raises(ValueError, match="different questions"):
        compare_evaluations(tmp_path / "before", tmp_path / "other")


# ---------------------------------------------------------------- diagnostics of a reward

def test_ranking_accuracy_and_label_noise():
    from rewards.diagnostics import label_noise, ranking_accuracy

    gt = ["2"] * 7 + ["3"] * 3
    rows = [{"question_id": "q", "image": "a.png", "answer": a, "gt_answers": gt, "target": t}
            for a, t in (("2", 1), ("3", 1), ("4", 0))]
    # official accuracies 1.0, 0.9.., 0: the reward orders "2" > "4" right, "3" vs "4" right, "2" vs "3" wrong
    assert ranking_accuracy(rows, [0.5, 0.9, 0.1]) == {"accuracy": pytest.approx(66.67), "pairs": 3}
    assert ranking_accuracy(rows, [0.5, 0.5, 0.5])["accuracy"] == 50.0  # ties are a coin
    # "3" (three annotators) labeled correct disagrees with the majority answer "2"
    assert label_noise(rows) == {"share": pytest.approx(33.33), "labels": 3, "noisy": 1}


def test_best_of_n_picks_by_the_reward(tiny_overrides, tiny_processor, tiny_data_dir, saved_tiny_model):
    from vlm.config import DecodingConfig
    from vlm.data import ImageCache, load_split
    from vlm.model import load_model
    from rewards.base import build_reward
    from rewards.diagnostics import best_of_n

    config = config_with(tiny_overrides, "ppo.reward=vqa_accuracy")
    policy, processor = load_model(saved_tiny_model)
    records = [r for r in load_split(tiny_data_dir, "vqa", "test")][:6]
    oracle = build_reward(config, context_for(processor, tiny_data_dir))
    result = best_of_n(policy, processor, oracle, records, ImageCache(processor.image_processor, tiny_data_dir), {},
                       config.data, DecodingConfig(strategy="sample", max_new_tokens=4), n=4, batch_size=3)
    assert result["n"] == 4 and result["questions"] == 6
    assert result["reward"] == result["oracle"] >= result["random"]  # the verifiable reward picks as the oracle
    assert 0 <= result["greedy"] <= 100 and result["majority"] <= result["oracle"]


# ---------------------------------------------------------------- GRPO / RLOO under left padding

@pytest.mark.parametrize("trainer_name", ["GRPOTrainer", "RLOOTrainer"])
def test_group_rl_log_probs_of_a_left_padded_row_equal_the_unpadded_rows(trainer_name, tiny_model, tiny_processor):
    """trl's log-prob forward passes no position_ids; with GPT-2 a left-padded row's tokens then sit
    at shifted positions. With rewards.group_rl.positions_from_the_mask they do not."""
    import inspect
    import types

    import trl

    from rewards.group_rl import positions_from_the_mask

    logps_of = getattr(trl, trainer_name)._get_per_token_logps_and_entropies
    model = tiny_model.eval()
    stub = types.SimpleNamespace(model_kwarg_keys=set(inspect.signature(model.forward).parameters),
                                 temperature=1.0, _entropy_bonus_enabled=False)
    image = [model.config.image_token_index] * model.config.image_seq_length
    rows = [image + [40, 41, 42, 43, 44, 45], image + [50, 51]]  # the second row gets 4 pads on the left
    completion = 2
    pad = tiny_processor.tokenizer.pad_token_id
    ids = torch.tensor([rows[0], [pad] * 4 + rows[1]])
    mask = torch.tensor([[1] * len(rows[0]), [0] * 4 + [1] * len(rows[1])])
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))

    def padded_and_alone():
        with torch.no_grad():
            padded, _, _ = logps_of(stub, model, ids, mask, completion, pixel_values=pixels, num_images=[1, 1])
            alone, _, _ = logps_of(stub, model, torch.tensor([rows[1]]), torch.ones(1, len(rows[1]), dtype=torch.long),
                                   completion, pixel_values=pixels[1:], num_images=[1])
        return padded[1], alone[0]

    padded, alone = padded_and_alone()
    assert not torch.allclose(padded, alone, atol=1e-3)  # upstream as is: the padding moves the positions
    positions_from_the_mask(model)
    padded, alone = padded_and_alone()
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)


def test_the_ppo_command_reports_the_comparison_and_the_oracle_control(tiny_overrides, ppo_dirs, tmp_path):
    """`vqa-rlhf ppo` end to end on the tiny model: before / after per question, then the same budget with
    the verifiable reward (ppo.oracle_control), all in metrics.json and the report."""
    from vlm.report import build_report
    from stages.ppo import main

    sft, rm = ppo_dirs
    assert main([str(REPO / "configs/default.yaml"), *tiny_overrides, f"ppo.policy={sft}", f"ppo.reward_model={rm}",
                 "ppo.steps=2", "ppo.batch_size=4", "ppo.mini_batches=2", "ppo.ppo_epochs=1", "ppo.eval_steps=0",
                 "ppo.save_steps=0", "ppo.max_prompts=16", "ppo.oracle_control=true"]) == 0
    run_dir = tmp_path / "tiny"
    metrics = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    assert metrics["reward"] == "model" and metrics["prompt_split"] == "rl"
    assert metrics["better"] + metrics["worse"] <= metrics["eval_count"] == 24  # the tiny test split
    assert len(metrics["ci95"]) == 2 and metrics["ci95"][0] <= metrics["change"] <= metrics["ci95"][1]
    assert set(metrics["oracle_control"]) == {"vqa_accuracy_after", "error_removed", "ci95", "updates", "seconds"}
    oracle = json.loads((run_dir / "ppo-oracle" / "metrics.json").read_text())
    assert oracle["reward"] == "vqa_accuracy" and oracle["updates"] == metrics["updates"] == 2  # the same budget
    assert (run_dir / "eval" / "ppo-oracle" / "predictions.jsonl").is_file()
    report = build_report(run_dir)["stages"]["ppo"]
    for key in ("reward", "error_removed", "ci95", "better", "worse", "by_family", "oracle_control"):
        assert report[key] == metrics[key], key
    assert "Oracle control" in (run_dir / "report.md").read_text()
