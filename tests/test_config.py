"""Configs: typos fail loudly with suggestions; key=value overrides are typed."""
import pytest

from vlm.config import ConfigError, load_config
from tests.conftest import REPO

DEFAULT = REPO / "configs" / "default.yaml"


def test_default_config_loads():
    config = load_config(DEFAULT)
    assert config.stages == ["prep", "vision", "sft", "eval", "sample", "autolabel", "rm", "ppo", "instruct", "caption_eval"]
    assert str(config.run_dir) == "runs/default"


def test_run_dir_in_a_value_names_the_run_the_overrides_make():
    config = load_config(DEFAULT, ["name=other", "output_root=/tmp/x"])
    assert config.model.vision_model == "/tmp/x/other/vision/final"
    assert config.data.feature_cache == "/tmp/x/other/vision/features"


def test_overrides_are_parsed_as_yaml_scalars():
    config = load_config(DEFAULT, ["sft.lr=3e-4", "sft.freeze_vision=true", "data.max_train_samples=10",
                                   "sft.lora.target_modules=[c_attn]"])
    assert config.sft.lr == 3e-4 and config.sft.freeze_vision is True
    assert config.data.max_train_samples == 10 and config.sft.lora.target_modules == ["c_attn"]


def test_unknown_key_names_the_key_and_the_closest_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.batch_szie'.*did you mean batch_size"):
        load_config(DEFAULT, ["sft.batch_szie=1"])
    with pytest.raises(ConfigError, match=r"'sft\.lora\.rank'.*valid keys|'sft\.lora\.rank'.*did you mean"):
        load_config(DEFAULT, ["sft.lora.rank=8"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  text_layerz: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.text_layerz.*text_layers"):
        load_config(path)


def test_bad_choices_and_malformed_overrides_are_errors():
    with pytest.raises(ConfigError, match="eval.decoding.strategy"):
        load_config(DEFAULT, ["eval.decoding.strategy=nucleus"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEFAULT, ["sft.lr"])
    with pytest.raises(ConfigError, match=r"'sft\.steps' must be int, got 'many'"):
        load_config(DEFAULT, ["sft.steps=many"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(DEFAULT, ["stages=[prep,dance]"])
