"""Shared fixtures: a tiny built-in dataset and a tiny model config, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent

# Small enough for a training step in well under a second on 2 CPU cores.
TINY_DIMS = [
    "model.text_layers=1", "model.text_width=32", "model.text_heads=2", "model.vision_layers=1",
    "model.vision_width=32", "model.vision_heads=2", "model.vocab_size=300",
]
# A tiny model built wholly from scratch: the default config's tower from the vision stage and
# its feature cache are not there in tests that run one stage (tests of the whole pipeline and
# of the vision stage use TINY_DIMS).
TINY_MODEL = [*TINY_DIMS, "model.vision_model=null", "data.feature_cache=null"]
TINY_DATA = ["data.synthetic.train_images=30", "data.synthetic.val_images=6", "data.synthetic.test_images=6",
             "data.synthetic.rl_images=6", "data.answer_images=null"]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from data_prep.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate(SyntheticConfig(train_images=30, val_images=6, test_images=6, rl_images=6, seed=0), out, progress=False)
    return out


@pytest.fixture
def tiny_overrides(tiny_data_dir, tmp_path) -> list[str]:
    """Overrides of configs/default.yaml for a run of a few tiny steps into tmp_path."""
    return [
        *TINY_MODEL, *TINY_DATA, f"data.dir={tiny_data_dir}", f"output_root={tmp_path}", "name=tiny",
        "sft.steps=4", "sft.batch_size=4", "sft.save_steps=2", "sft.eval_steps=0", "sft.logging_steps=1",
        "sft.warmup_steps=0", "eval.batch_size=8",
        "data.questions_per_example=1",  # one example per record: the tests count examples and epochs
    ]


@pytest.fixture(scope="session")
def tiny_processor(tiny_data_dir):
    from vlm.config import load_config
    from vlm.model import build_processor
    from stages.sft import corpus

    config = load_config(REPO / "configs/default.yaml", [*TINY_MODEL, f"data.dir={tiny_data_dir}"])
    return build_processor(config.model, corpus(config))


@pytest.fixture
def tiny_model(tiny_processor):
    import torch

    from vlm.config import load_config
    from vlm.model import build_model

    torch.manual_seed(0)
    config = load_config(REPO / "configs/default.yaml", TINY_MODEL)
    return build_model(config.model, tiny_processor)


@pytest.fixture
def saved_tiny_model(tiny_model, tiny_processor, tmp_path) -> Path:
    """The tiny model and its processor saved as a stage saves its final model."""
    path = tmp_path / "saved-model"
    tiny_model.save_pretrained(path)
    tiny_processor.save_pretrained(path)
    return path
