"""Judgments that teach (the default run's regime): few written answers, a simulated labeler that can
err, the likelihood reward model, and the probe of what a reward knows."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import REPO
from tests.test_label_store import make_store
from tests.test_reward_model import planted_labels


def config_with(overrides, *extra):
    from vlm.config import load_config

    return load_config(REPO / "configs/default.yaml", [*overrides, *extra])


# ---------------------------------------------------------------- few written answers

def test_answer_images_keeps_the_records_of_the_first_images_of_a_split(tiny_data_dir):
    from vlm.data import answer_carrying, load_split

    for kind in ("vqa", "captions"):
        split = load_split(tiny_data_dir, kind, "train")
        kept = answer_carrying(split, 3)
        first_three = sorted(set(split["image"]))[:3]
        assert sorted(set(kept["image"])) == first_three
        assert len(kept) == sum(image in first_three for image in split["image"])  # every record of those images
    with pytest.raises(ValueError, match="data.answer_images.*only 30 images"):
        answer_carrying(load_split(tiny_data_dir, "vqa", "train"), 31)


def test_sft_learns_only_from_the_answer_carrying_images(tiny_overrides, tiny_processor, tiny_model, tmp_path):
    from stages.sft import setup_data

    config = config_with(tiny_overrides, "data.answer_images=2")
    dataset, *_ = setup_data(config, tiny_processor, tiny_model, tmp_path, frozenset({"vqa", "captions"}))
    # 2 images x 4 questions + int(8 * caption_ratio) captions drawn from those two images' captions
    assert len(dataset) == 8 + int(8 * config.data.caption_ratio)


@pytest.mark.parametrize("key,value", [("data.answer_images", 0), ("autolabel.error_rate", 0.5), ("rlhf.rounds", 0),
                                      ("rm.min_labels_per_class", -1)])
def test_out_of_range_settings_are_config_errors_naming_the_key(key, value):
    from vlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/default.yaml", [f"{key}={value}"])


def test_a_judging_budget_larger_than_the_pool_is_an_error_naming_the_key(tiny_overrides):
    from stages.sample import sample_to_store

    config = config_with(tiny_overrides, "sample.max_questions=1000")  # the tiny rl split has 24 questions
    with pytest.raises(SystemExit, match="sample.max_questions.*1000.*24 questions"):
        sample_to_store(config, progress=False)


# ---------------------------------------------------------------- a labeler who errs

def test_autolabel_error_rate_flips_a_fixed_share_of_the_labels(tmp_path):
    exact = make_store(tmp_path / "exact", n=200)  # 400 samples: "red" correct, "blue" incorrect
    exact.autolabel(0.6)
    truth = {r["sample_id"]: r["label"] for r in exact.current_labels()}
    noisy = make_store(tmp_path / "noisy", n=200)
    counts = noisy.autolabel(0.6, error_rate=0.1, seed=3)
    labels = {r["sample_id"]: r["label"] for r in noisy.current_labels()}
    flipped = sum(labels[s] != truth[s] for s in truth)
    assert counts["flipped"] == flipped and 20 <= flipped <= 60  # about 10% of 400
    assert noisy.autolabel(0.6, error_rate=0.1, seed=3)["written"] == 0  # the same ones again: nothing to write
    assert make_store(tmp_path / "again", n=200).autolabel(0.6, error_rate=0.1, seed=3)["flipped"] == flipped


# ---------------------------------------------------------------- the likelihood reward model

def test_likelihood_loss_is_binary_cross_entropy_on_the_answer_probability():
    from rewards.answer_likelihood import likelihood_loss

    log_p = torch.log(torch.tensor([0.9, 0.2, 0.5]))
    targets = torch.tensor([1.0, 0.0, 0.3])
    expected = -(torch.tensor([math.log(0.9), math.log(0.8), 0.3 * math.log(0.5) + 0.7 * math.log(0.5)])).mean()
    torch.testing.assert_close(likelihood_loss(log_p, targets), expected)
    assert torch.isfinite(likelihood_loss(torch.zeros(1), torch.zeros(1)))  # p = 1 labeled incorrect: finite


def test_answer_log_probs_sum_the_answer_and_eos_tokens_only(tiny_model, tiny_processor, tiny_data_dir):
    from vlm.data import ImageCache
    from rewards.answer_likelihood import JudgedAnswerCollator, answer_log_probs, encode_judged_rows

    config = config_with([], "model.vision_model=null")
    images = ImageCache(tiny_processor.image_processor, tiny_data_dir)
    rows = [{"question_id": "q", "image": "images/train/000000.png", "question": "What colour is the circle?",
             "answer": answer} for answer in ("red", "two purple")]
    encoded = encode_judged_rows(rows, tiny_processor.tokenizer, images,
                                 lambda row: config.data.prompt_template.format(question=row["question"]),
                                 config.data.answer_template, tiny_model.config.image_seq_length, 128)
    batch = JudgedAnswerCollator(tiny_processor.tokenizer.pad_token_id)(encoded)
    tiny_model.eval()
    with torch.no_grad():
        got = answer_log_probs(tiny_model, batch)
        for row, item in enumerate(encoded):  # each row alone, unpadded, summed by hand
            ids = torch.tensor([item["input_ids"]])
            logits = tiny_model(input_ids=ids, pixel_values=item["pixel_values"][None]).logits[0]
            answer = [i for i, label in enumerate(item["labels"]) if label != -100]
            assert len(answer) == len(tiny_processor.tokenizer(" " + rows[row]["answer"])["input_ids"]) + 1  # + EOS
            expected = sum(torch.log_softmax(logits[i - 1], -1)[item["input_ids"][i]] for i in answer)
            torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=1e-4)


def test_the_likelihood_reward_model_learns_the_labels_and_ppo_reads_it_as_the_model_reward(
        saved_tiny_model, tiny_data_dir, tiny_overrides, tiny_processor, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlm.data import ImageCache
    from rewards.base import RewardContext, RewardInput, build_reward
    from rewards.model_reward import LikelihoodReward
    from stages.rm import train

    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    config = config_with(tiny_overrides, "rm.objective=likelihood", "rm.steps=40", "rm.batch_size=16", "rm.lr=3e-3",
                         "rm.warmup_steps=0", "rm.save_steps=100", "rm.logging_steps=10", "rm.heldout_fraction=0.3",
                         "rm.best_of_n=0", "rm.candidate_questions=6")
    metrics = train(config, labels, saved_tiny_model, tmp_path / "rm")
    assert metrics["train_fit"]["accuracy"] >= 90, metrics["train_fit"]  # it fits its own labels
    assert metrics["objective"] == "likelihood" and 0 < metrics["threshold"] < 1  # a probability's cut
    assert 0 < metrics["candidate_top1"]["questions"] <= 6  # (a family with one answer in the split is left out)
    final = tmp_path / "rm" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "llava"  # stock: loads without our code
    LlavaForConditionalGeneration.from_pretrained(final)

    pixels = ImageCache(tiny_processor.image_processor, tiny_data_dir)
    reward = build_reward(config_with(tiny_overrides, f"ppo.reward_model={final}"),
                          RewardContext(tiny_processor, lambda model: pixels, tiny_data_dir))
    assert isinstance(reward, LikelihoodReward) and reward.threshold == metrics["threshold"]
    rows = [json.loads(line) for line in (labels / "labels.jsonl").read_text().splitlines()][:8]
    scores = reward([RewardInput(str(r["question_id"]), r["image"], r["question"], r["answer"]) for r in rows])
    assert ((0 <= scores) & (scores <= 1)).all()  # an answer's probability
    correct = scores[[i for i, r in enumerate(rows) if r["label"] == "correct"]]
    wrong = scores[[i for i, r in enumerate(rows) if r["label"] == "incorrect"]]
    assert correct.mean() > wrong.mean()


def test_the_likelihood_form_refuses_facts_before_training(saved_tiny_model, tiny_data_dir, tiny_overrides, tmp_path):
    from stages.rm import train

    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    config = config_with(tiny_overrides, "rm.objective=likelihood", "rm.facts=true")
    with pytest.raises(SystemExit, match="rm.facts.*rm.objective"):
        train(config, labels, saved_tiny_model, tmp_path / "rm")


def test_labels_of_one_class_are_refused_before_training_naming_what_makes_both(
        saved_tiny_model, tiny_data_dir, tiny_overrides, tmp_path):
    from datasets import load_from_disk

    from stages.rm import train

    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    load_from_disk(str(labels)).filter(lambda row: row["label"] == "incorrect").save_to_disk(str(tmp_path / "wrong"))
    (tmp_path / "wrong" / "meta.json").write_text((labels / "meta.json").read_text())
    config = config_with(tiny_overrides, "rm.objective=likelihood")
    with pytest.raises(SystemExit, match=r"labels are incorrect.*sample\.k, sample\.temperature") as raised:
        train(config, tmp_path / "wrong", saved_tiny_model, tmp_path / "rm")
    assert str(tmp_path / "wrong") in str(raised.value)
    assert not (tmp_path / "rm" / "final").exists()


def test_the_labels_each_class_needs_is_a_config_key_and_zero_accepts_one_class_loudly(capsys):
    from vlm.config import RewardTrainConfig
    from rewards.train_rm import check_objective
    from stages.pipeline import SMOKE_OVERRIDES

    rows = [{"target": 1}] * 3 + [{"target": 0}] * 40
    check_objective(RewardTrainConfig(), rows)  # both classes: fine
    with pytest.raises(ValueError, match=r"3 of 43 training labels are correct, fewer than rm.min_labels_per_class=5"):
        check_objective(RewardTrainConfig(min_labels_per_class=5), rows)
    check_objective(RewardTrainConfig(min_labels_per_class=0), rows[3:])  # --smoke: accepted, said loudly
    assert "WARNING: all 40 training labels are incorrect" in capsys.readouterr().out
    assert "rm.min_labels_per_class=0" in SMOKE_OVERRIDES


# ---------------------------------------------------------------- what a reward knows

class _Scores(torch.nn.Module):
    """A reward from a function of the answer and its record's references."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, inputs):
        return torch.tensor([float(self.fn(item)) for item in inputs])


def test_candidate_probe_scores_every_answer_of_the_family(tiny_data_dir):
    """An oracle is right on every question; a blind reward only where the first candidate is the answer;
    a reward that knows the answer only in another spelling ("two" for "2") still counts as knowing it."""
    from vlm.data import load_split
    from vlm.vqa_metric import vqa_accuracy
    from rewards.diagnostics import candidate_top1, family_candidates, majority_answer

    records = list(load_split(tiny_data_dir, "vqa", "test"))
    candidates = family_candidates(records)
    assert set(candidates["exists"]) <= {"no", "yes"}
    assert all(answer in forms or len(forms) == 3 for family in candidates.values() for answer, forms in family.items())
    oracle = candidate_top1(_Scores(lambda item: vqa_accuracy(item.answer, item.reference_answers)), records,
                            candidates, {})
    assert oracle["overall"] == 100.0 and set(oracle["by_family"].values()) == {100.0}
    blind = candidate_top1(_Scores(lambda item: 0.0), records, candidates, {})  # picks each family's first answer
    expected = [majority_answer(r["answers"]) == next(iter(candidates[r["question_family"]])) for r in records
                if len(candidates[r["question_family"]]) > 1]
    assert blind["questions"] == len(expected)
    assert blind["overall"] == pytest.approx(100.0 * sum(expected) / len(expected), abs=0.01)
    spelled = {"numbers": {"1": ["1", "one"], "2": ["2", "two"]}}
    record = {"question_family": "numbers", "answers": ["2"] * 10, "id": "q", "image": "i.png", "question": "?"}
    knows_words = candidate_top1(_Scores(lambda item: item.answer == "two"), [record], spelled, {})
    assert knows_words["overall"] == 100.0


# ---------------------------------------------------------------- rounds (online RLHF)

def test_rounds_repeat_the_rlhf_stages_each_from_the_previous_rounds_policy(tmp_path):
    from vlm.pipeline import config_fingerprint, plan_rounds

    stages = ["prep", "sft", "eval", "sample", "autolabel", "rm", "ppo", "instruct"]
    config = config_with([f"output_root={tmp_path}", "name=r", "rlhf.rounds=3"])
    plan = plan_rounds(config, stages, ["x=1"])
    assert [(stage, c.round) for stage, c, _ in plan] == [
        ("prep", 3), ("sft", 3), ("eval", 3),
        *[(stage, r) for r in (1, 2, 3) for stage in ("sample", "autolabel", "rm", "ppo")], ("instruct", 3)]
    by_round = {c.round: (c, o) for stage, c, o in plan if stage == "rm"}
    run = tmp_path / "r"
    assert by_round[1][0].round_start_policy == run / "sft" / "final"
    assert by_round[2][0].round_start_policy == run / "rounds" / "1" / "ppo" / "final"
    assert by_round[2][0].paths.stage_dir("rm") == run / "rounds" / "2" / "rm"
    assert by_round[3][0].paths.final("ppo") == run / "ppo" / "final"  # the last round: where instruct reads
    assert by_round[2][0].ppo_policy == by_round[2][0].round_start_policy
    assert by_round[2][0].labels_db == run / "labels" / "labels.db"  # one label store: every round's labels
    assert by_round[2][1] == ["x=1", "rlhf.round=2"]
    assert by_round[2][0].round_tag("ppo") == "ppo-round2" and by_round[3][0].round_tag("ppo") == "ppo"
    # more rounds rerun the rounds, not the data, the tower or SFT
    one = config_with([f"output_root={tmp_path}", "name=r"])
    assert all(config_fingerprint(one, stage) == config_fingerprint(config, stage) for stage in ("prep", "sft", "eval"))
    assert config_fingerprint(one, "sample") != config_fingerprint(config, "sample")
    assert [stage for stage, _, _ in plan_rounds(one, stages, [])] == stages  # one round: the plain pipeline


# ---------------------------------------------------------------- the peers' objectives

def test_dpo_loss_is_log_sigmoid_of_the_margin_of_log_ratios():
    from rewards.answer_likelihood import dpo_loss

    ref = torch.log(torch.tensor([0.5, 0.5]))  # chosen, rejected
    assert dpo_loss(ref, ref, beta=0.1) == pytest.approx(math.log(2))  # no change from the reference: log 2
    moved = torch.log(torch.tensor([0.9, 0.1]))  # chosen up, rejected down
    expected = -torch.nn.functional.logsigmoid(torch.tensor(0.1 * (math.log(0.9 / 0.5) - math.log(0.1 / 0.5))))
    torch.testing.assert_close(dpo_loss(moved, ref, beta=0.1), expected)


@pytest.mark.parametrize("objective,only_correct", [("likelihood", True), ("dpo", False)])
def test_rejection_sampling_and_dpo_train_the_policy_on_the_labels(objective, only_correct, saved_tiny_model,
                                                                   tiny_data_dir, tiny_overrides, tmp_path,
                                                                   monkeypatch):
    from stages import rm as rm_stage

    seen = {}

    class Capturing(rm_stage.RewardTrainer):
        def __init__(self, *args, train_dataset, **kwargs):
            seen["dataset"] = list(train_dataset)
            super().__init__(*args, train_dataset=train_dataset, **kwargs)

    monkeypatch.setattr(rm_stage, "RewardTrainer", Capturing)
    labels = planted_labels(tiny_data_dir, tmp_path / "labels")
    config = config_with(tiny_overrides, f"rm.objective={objective}", f"rm.only_correct={str(only_correct).lower()}",
                         "rm.steps=20", "rm.batch_size=8", "rm.lr=3e-3", "rm.warmup_steps=0", "rm.best_of_n=0",
                         "rm.candidate_questions=0", "rm.heldout_fraction=0.3")
    metrics = rm_stage.train(config, labels, saved_tiny_model, tmp_path / "out")
    if objective == "likelihood":  # SFT on the answers labeled correct, and on nothing else
        assert seen["dataset"] and all(row["target"] == 1.0 for row in seen["dataset"])
    else:  # (correct, incorrect) pairs of one question, each with its reference log p from the starting model
        good, bad = seen["dataset"][0]
        assert good["target"] == 1.0 and bad["target"] == 0.0 and good["ref_log_p"] < 0 and bad["ref_log_p"] < 0
    assert metrics["objective"] == objective and metrics["only_correct"] == only_correct
    from vlm.model import load_model

    load_model(tmp_path / "out" / "final")  # a policy: a stock Llava model with its processor


def test_bench_rlhf_runs_each_peer_from_the_runs_sft_model_on_its_labels(tmp_path):
    from bench.rlhf import METHODS, method_overrides, plan

    config = config_with([f"output_root={tmp_path}", "name=r"])
    run = tmp_path / "r"
    shared = method_overrides(config, "dpo")
    assert f"output_root={run / 'bench-rlhf'}" in shared and "name=dpo" in shared
    assert f"rm.base={run / 'sft' / 'final'}" in shared and f"rm.labels={run / 'rm' / 'labels'}" in shared
    assert f"ppo.policy={run / 'sft' / 'final'}" in shared and f"ppo.reward_model={run / 'rm' / 'final'}" in shared
    modules = {}
    for method in METHODS:
        if method == "ppo":
            continue  # read from the run's own report
        commands, eval_dir = plan(config, method, run / "bench-rlhf" / method)
        modules[method] = [command[0] for command in commands]
        assert eval_dir.parent.name == "eval"
    assert modules == {"grpo": ["stages.ppo"], "rloo": ["stages.ppo"], "verifiable": ["stages.ppo"],
                       "dpo": ["stages.rm", "stages.evaluate"], "rft": ["stages.rm", "stages.evaluate"],
                       "judge": ["stages.evaluate"], "ceiling": ["stages.sft", "stages.evaluate"],
                       "noisy": ["stages.sample", "stages.autolabel", "stages.rm", "stages.ppo"]}
    noisy = method_overrides(config, "noisy")  # its own labels: no rm.labels, no ppo.reward_model of the run
    assert "autolabel.error_rate=0.1" in noisy and f"sample.model={run / 'sft' / 'final'}" in noisy
    assert not any(o.startswith(("rm.labels=", "ppo.reward_model=")) for o in noisy)
    rft, _ = plan(config, "rft", run / "bench-rlhf" / "rft")
    assert "rm.only_correct=true" in rft[0] and "rm.objective=likelihood" in rft[0]
    ceiling, _ = plan(config, "ceiling", run / "bench-rlhf" / "ceiling")
    assert "data.train_split=rl" in ceiling[0] and f"model.checkpoint={run / 'sft' / 'final'}" in ceiling[0]


def test_bench_rlhf_refuses_an_unknown_method(capsys):
    from bench.rlhf import main

    with pytest.raises(SystemExit):
        main(["--methods", "ppo,reinforce"])
    assert "unknown method(s) ['reinforce']" in capsys.readouterr().err


def test_bench_rlhf_without_a_finished_run_says_what_to_run(tmp_path):
    from bench.rlhf import main

    with pytest.raises(SystemExit, match="no finished run.*launch.sh"):
        main([str(REPO / "configs/default.yaml"), f"output_root={tmp_path}", "--methods", "rft"])


def test_bench_rlhf_seeds_are_whole_runs_of_their_own_and_their_spread_is_computed():
    from bench.rlhf import over_seeds, seed_overrides, seeds_table

    config = config_with(["name=r"])
    assert seed_overrides(config, ["sft.steps=9"], 0) == ["sft.steps=9"]  # the config's own run
    assert seed_overrides(config, ["sft.steps=9"], 2) == ["sft.steps=9", "seed=2", "name=r-seed2"]
    seeded = config_with(["name=r", *seed_overrides(config, [], 2)])
    assert seeded.run_dir.name == "r-seed2" and seeded.seed == 2  # seed=N drives the built-in dataset too

    def run(start, test, low):
        return {"start": start, "methods": {"ppo": {"test": test, "change": test - start, "ci95": [low, low + 2],
                                                    "error_removed": round(100 * (test - start) / (100 - start), 2)}}}

    spread = over_seeds({0: run(70.0, 85.0, 5.0), 1: run(80.0, 90.0, 1.0), 2: run(75.0, 80.0, -0.5)})
    assert spread["start"] == {"mean": 75.0, "sd": 5.0}
    assert spread["ppo"]["test"] == {"mean": 85.0, "sd": 5.0}
    assert spread["ppo"]["error_removed"]["mean"] == round((50.0 + 50.0 + 20.0) / 3, 2)
    assert spread["ppo"]["seeds"] == [0, 1, 2] and not spread["ppo"]["ci_above_zero_on_every_seed"]
    assert over_seeds({0: run(70.0, 85.0, 5.0), 1: run(80.0, 90.0, 1.0)})["ppo"]["ci_above_zero_on_every_seed"]
    assert "85.00 +- 5.00" in seeds_table(spread)


def test_bench_rlhf_refuses_seeds_that_are_not_integers(capsys):
    from bench.rlhf import main

    with pytest.raises(SystemExit):
        main(["--seeds", "0,one"])
    assert "--seeds: comma-separated integers" in capsys.readouterr().err
