"""The architecture's seams: imports only run down the layers, a stage is one file plus one line
of the stage table, the report lists stages in pipeline order, and one image-input object decides
between pixels and cached features."""
from __future__ import annotations

import ast
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from vlm.config import STAGES, Stage, load_config
from tests.conftest import REPO

# Lower layers know nothing of higher ones. data_prep and rewards are siblings above vlm: neither
# imports the other. Nothing imports a stage module: stages run as processes (`python -m`), and
# the CLI dispatcher (stages/cli.py) reaches every subcommand's module by name (importlib), so
# it has no import of a stage either. bench sits beside the stages and imports none of them.
LAYERS = {"vlm": 0, "data_prep": 1, "rewards": 1, "stages": 2, "bench": 2}
SIBLINGS_APART = {("data_prep", "rewards"), ("rewards", "data_prep"), ("bench", "stages")}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in LAYERS:  # `from vlm import pipeline`: the submodules are what is imported
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def layering_violations() -> list[str]:
    violations = []
    for package, layer in LAYERS.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in imports_of(path):
                target = module.split(".")[0]
                where = f"{path.relative_to(REPO)}:{line} imports {module}"
                if target == "stages":  # from the stages themselves too
                    violations.append(f"{where}: nothing imports a stage module")
                elif target not in LAYERS or target == package:
                    continue
                elif LAYERS[target] > layer or (package, target) in SIBLINGS_APART:
                    violations.append(f"{where}: {package} sits below {target}")
    return violations


def test_imports_only_run_down_the_layers_and_nothing_imports_a_stage():
    assert layering_violations() == []


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself reads nested imports, `from package import module` and every layer."""
    fake = tmp_path / "repo"
    for package in LAYERS:
        (fake / package).mkdir(parents=True)
    (fake / "vlm" / "ok.py").write_text("import torch\nfrom vlm.config import RunConfig\n")
    (fake / "vlm" / "up.py").write_text("def f():\n    from rewards.base import Reward\n")
    (fake / "rewards" / "stage.py").write_text("from stages import ppo\n")
    (fake / "data_prep" / "side.py").write_text("import rewards.registry\n")
    (fake / "stages" / "one.py").write_text("def main():\n    import stages.other\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    assert sorted(v.split(":")[0] for v in layering_violations()) == [
        "data_prep/side.py", "rewards/stage.py", "stages/one.py", "vlm/up.py"]


# ---------------------------------------------------------------- the stage table

NEW_STAGE = '''"""A stage added for the test: one file plus one line of vlm.config.STAGES."""
import sys

from vlm.files import write_json
from vlm.stage_cli import parse_stage_args, run_stage


def main(argv=None):
    config = parse_stage_args("count-questions", __doc__, argv)
    write_json(config.paths.metrics("count_questions"), {"questions": 7, "seconds": 0.1, "internal": "x"})
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
'''


def test_a_new_stage_is_one_file_plus_one_line_of_the_stage_table(tmp_path, monkeypatch, capsys):
    """The config check, the pipeline (run, skip rules, launcher), the CLI and the report all read
    STAGES: the new stage runs, is listed and is reported without another edit."""
    from vlm import pipeline
    from stages import cli

    (tmp_path / "count_questions_stage.py").write_text(NEW_STAGE)  # the one new file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the stage's own process finds it too
    monkeypatch.setitem(STAGES, "count_questions", Stage(  # the one new line
        "count_questions_stage", "count the questions", report=("questions", "seconds")))

    overrides = [f"output_root={tmp_path}", "name=added"]
    config = load_config(REPO / "configs/default.yaml", [*overrides, "stages=[prep, count_questions]"])
    assert config.stages == ["prep", "count_questions"]  # the config check knows it
    assert pipeline.stage_command(config, "count_questions", "c.yaml", []) == [
        sys.executable, "-m", "count_questions_stage", "c.yaml"]
    assert pipeline.run(config, str(REPO / "configs/default.yaml"), ["count_questions"], overrides, False) == 0
    report = json.loads((tmp_path / "added" / "report.json").read_text())
    assert report["stages"]["count_questions"] == {"questions": 7, "seconds": 0.1}

    assert cli.resolve(["count-questions", "--help"]) == ("count_questions_stage", ["--help"])
    assert cli.main([]) == 0
    assert any(line.split() == ["count-questions", "count", "the", "questions"]
               for line in capsys.readouterr().out.splitlines())


def test_the_report_lists_stages_in_pipeline_order(tmp_path):
    from vlm.report import build_report

    def write(path: str, data: dict):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(data))

    # written in another order than the pipeline's, as a re-run of some stages leaves them
    write("instruct/metrics.json", {"vqa_accuracy_before": 80.0, "vqa_accuracy_after": 81.0,
                                    "description_precision": 90.0, "description_recall": 91.0, "seconds": 3})
    write("eval/captions/metrics.json", {"cider": 1.0, "seconds": 1})
    write("ppo/metrics.json", {"algo": "ppo", "vqa_accuracy_before": 80.0, "vqa_accuracy_after": 80.5,
                               "updates": 2, "seconds": 2, "mean_reward": 0.5, "kl": 0.1})
    write("rm/metrics.json", {"accuracy": 70.0, "auc": 0.7, "objective": "pointwise", "count": 10, "seconds": 4,
                              "checkpoint": "rm/final", "baselines": {}})
    write("sft/metrics.json", {"seconds": 5, "steps": 10, "checkpoint": "sft/final", "train_loss": 1.0})
    write("eval/sft/metrics.json", {"vqa_accuracy": 80.0, "by_answer_type": {"yes/no": 80.0}, "by_question_family": {},
                                    "split": "test", "count": 4, "baselines": {"majority_answer": {"vqa_accuracy": 20}}})
    write("vision/metrics.json", {"objective": "region_text", "steps": 5, "seconds": 1, "probe_split": "test",
                                  "probe": {"shape": 90, "colour": 95}, "probe_untrained": {"shape": 50, "colour": 60},
                                  "checkpoint": "vision/final"})
    report = build_report(tmp_path)
    assert list(report["stages"]) == ["vision", "sft", "rm", "ppo", "instruct", "caption_eval"]
    order = [name for name in STAGES if name in report["stages"]]
    assert list(report["stages"]) == order
    markdown = (tmp_path / "report.md").read_text()
    table = markdown.split("## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| stage |")]
    assert [row.split(" | ")[0].strip("| ") for row in rows][:len(order)] == order
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    first = [next(i for i, h in enumerate(headings) if h.startswith(prefix))
             for prefix in ("## Vision", "## By answer type", "## Reward model", "## RL", "## Instruction")]
    assert first == sorted(first)  # each stage's sections in pipeline order


# ---------------------------------------------------------------- the image input

def test_one_image_input_object_decides_pixels_or_cached_features(saved_tiny_model, tiny_data_dir, tmp_path,
                                                                    tiny_model, tiny_processor, capsys):
    from vlm.data import ImageCache
    from vlm.features import FeatureCacheMismatch, FeatureStore, image_source
    from vlm.image_input import FEATURES, PIXELS
    from data_prep.features import build_cache

    cache = tmp_path / "features"
    build_cache(str(saved_tiny_model), tiny_data_dir, cache, batch_size=16)
    frozen = image_source(str(cache), tiny_data_dir, tiny_processor, tiny_model, True, "the test model")
    assert isinstance(frozen, FeatureStore) and frozen.kind is FEATURES
    trains = image_source(str(cache), tiny_data_dir, tiny_processor, tiny_model, False, "the test model")
    assert isinstance(trains, ImageCache) and trains.kind is PIXELS
    assert "not used by the test model: its vision tower trains" in capsys.readouterr().out
    # the kind is what a model is fed: pixels as they are, features through the projector
    image = "images/train/000000.png"
    assert set(PIXELS.model_inputs(tiny_model, trains(image)[None])) == {"pixel_values"}
    assert set(FEATURES.model_inputs(tiny_model, frozen(image)[None])) == {"mm_encoder_outputs"}
    torch.testing.assert_close(FEATURES.pooled(tiny_model, frozen(image)[None]),
                               PIXELS.pooled(tiny_model, trains(image)[None]), atol=1e-5, rtol=1e-4)

    other = copy.deepcopy(tiny_model)  # the same architecture, another tower's weights
    with torch.no_grad():
        for param in other.model.vision_tower.parameters():
            param.add_(0.01)
    with pytest.raises(FeatureCacheMismatch, match=r"does not match the other model: vision tower weights differ\. "
                                                   r"Rebuild it for this model, or unset data.feature_cache"):
        image_source(str(cache), tiny_data_dir, tiny_processor, other, True, "the other model")


NEW_REWARD = '''"""A reward added for the test: one file plus one line of rewards.registry.REWARDS."""
from rewards.base import Reward


class ShortAnswerReward(Reward):
    threshold = 0.5

    @classmethod
    def from_config(cls, config, context):
        return cls()

    def score(self, inputs):
        return [1.0 if len(item.answer.split()) == 1 else 0.0 for item in inputs]
'''


def test_a_new_reward_is_one_file_plus_one_line_of_the_reward_table(tmp_path, monkeypatch, tiny_overrides):
    from rewards.base import RewardContext, RewardInput, build_reward
    from rewards.registry import REWARDS, check_reward_config

    (tmp_path / "short_answer_reward.py").write_text(NEW_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REWARDS, "short_answer", "short_answer_reward:ShortAnswerReward")
    config = load_config(REPO / "configs/default.yaml",
                         [*tiny_overrides, "ppo.reward=vqa_accuracy+short_answer", "ppo.reward_weights={short_answer: 0.5}"])
    check_reward_config(config.ppo)
    reward = build_reward(config, RewardContext(None, None, tmp_path))
    inputs = [RewardInput("q1", "a.png", "What color?", answer, ("red",) * 10, None) for answer in ("red", "dark red")]
    torch.testing.assert_close(reward(inputs), torch.tensor([1.0 + 0.5, 0.0]))
