"""The vision stage: a tower pretrained on the captions' regions, saved stock, frozen under SFT."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_DATA, TINY_DIMS


def test_caption_regions_reads_back_every_object_of_every_generated_caption(tiny_data_dir):
    from datasets import load_from_disk

    from data_prep.synthetic import caption_regions

    for record in load_from_disk(str(tiny_data_dir / "captions"))["train"]:
        expected = {o["row"] * 3 + o["col"]: {"colour": o["colour"], "shape": o["shape"]} for o in record["objects"]}
        assert caption_regions(record["caption"], 3) == expected


def test_a_caption_outside_the_region_grammar_is_an_error_naming_the_phrase():
    from data_prep.synthetic import caption_regions

    with pytest.raises(ValueError, match="'somewhere a red circle'"):
        caption_regions("at the top left a red circle and somewhere a red circle.", 3)
    with pytest.raises(ValueError, match="'at the top left a red hexagon'"):
        caption_regions("at the top left a red hexagon.", 3)


def test_each_region_named_by_a_caption_is_a_colour_a_shape_and_its_place(tiny_data_dir, monkeypatch):
    """The place target is the phrase's location words: it keeps patch tokens saying where they are."""
    from datasets import Dataset

    from vlm import regions
    from vlm.config import load_config
    from vlm.vision import NOTHING

    config = load_config(REPO / "configs/default.yaml", [*TINY_DIMS, f"data.dir={tiny_data_dir}"])
    records = [{"id": "a", "image": "images/train/000000.png",
                "caption": "the circle is red on the left. at the top left a red circle and at the bottom a blue square."}]
    monkeypatch.setattr(regions, "load_split", lambda *args: Dataset.from_list(records))
    _, targets = regions.load_regions(config, "train")
    said = {attr: [targets.classes[attr][i] for i in targets.labels[attr][0].tolist()] for attr in targets.classes}
    assert said["place"] == ["top left", NOTHING, NOTHING, NOTHING, NOTHING, NOTHING, NOTHING, "bottom", NOTHING]
    assert said["colour"][0] == "red" and said["shape"][7] == "square"
    assert sorted(targets.classes["place"]) == sorted([NOTHING, "top left", "top", "top right", "left", "middle",
                                                       "right", "bottom left", "bottom", "bottom right"])


def test_a_caption_outside_the_grammar_in_a_dataset_names_the_file_record_and_field(tiny_data_dir, monkeypatch):
    from datasets import Dataset

    from vlm import regions
    from vlm.config import load_config

    config = load_config(REPO / "configs/default.yaml", [*TINY_DIMS, f"data.dir={tiny_data_dir}"])
    records = [{"id": "a", "image": "images/train/000000.png", "caption": "at the top left a red circle."},
               {"id": "b", "image": "images/train/000001.png", "caption": "a dog on a sofa."}]
    monkeypatch.setattr(regions, "load_split", lambda *args: Dataset.from_list(records))
    with pytest.raises(ValueError, match=r"captions/train: record 1 \(id b\), field 'caption': caption phrase "
                                         r"'a dog on a sofa'"):
        regions.load_regions(config, "train")


def _normalised(image: Image.Image) -> np.ndarray:
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - np.array(OPENAI_CLIP_MEAN)[:, None, None]) / np.array(OPENAI_CLIP_STD)[:, None, None]


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_the_image_processor_only_normalises_at_the_built_in_size(backend, tmp_path):
    """Whatever backend stock transformers picks when it loads the saved processor, an image at
    the model's size reaches the tower pixel for pixel: its resize and crop change nothing."""
    from transformers import AutoImageProcessor

    from vlm.vision import clip_image_processor

    if backend == "torchvision":
        pytest.importorskip("torchvision", reason="torchvision's fast processor is not installed here")
    clip_image_processor(48).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, use_fast=backend == "torchvision")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 48, 48)
    assert np.allclose(pixels.numpy(), _normalised(image), atol=1e-5)
    # ... while an image of another size is still brought to the tower's
    assert processor(images=[image.resize((96, 72))], return_tensors="pt")["pixel_values"].shape == (1, 3, 48, 48)


@pytest.fixture
def vision_overrides(tiny_data_dir, tmp_path) -> list[str]:
    return [*TINY_DIMS, *TINY_DATA, f"data.dir={tiny_data_dir}", f"output_root={tmp_path}", "name=tiny",
            "vision.steps=6", "vision.save_steps=3", "vision.batch_size=8", "vision.probe_images=20",
            "vision.warmup_steps=0"]


def test_the_vision_stage_saves_a_stock_tower_its_probe_and_the_feature_cache(vision_overrides, tmp_path):
    from transformers import AutoImageProcessor, CLIPVisionModel

    from vlm.config import load_config
    from vlm.features import FeatureStore, signature
    from stages import vision

    assert vision.main(["configs/default.yaml", *vision_overrides]) == 0
    config = load_config(REPO / "configs/default.yaml", vision_overrides)
    assert config.model.vision_model == str(tmp_path / "tiny" / "vision" / "final")  # {run_dir} expanded
    tower = CLIPVisionModel.from_pretrained(config.vision_final)  # stock transformers, no code of ours
    processor = AutoImageProcessor.from_pretrained(config.vision_final)
    assert tower.config.hidden_size == 32 and tower.config.num_hidden_layers == 1
    metrics = json.loads((tmp_path / "tiny" / "vision" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["seconds"] > 0
    for probe in (metrics["probe"], metrics["probe_untrained"]):
        assert set(probe) == {"shape", "colour", "place"} and all(0 <= v <= 100 for v in probe.values())
    store = FeatureStore(config.vision_features)
    store.check_matches(signature(tower, processor, -1), "the saved tower")  # made by exactly this tower
    assert len(store.rows) == 30 + 6 + 6 + 6  # every image of every split (train, val, test, rl)


def test_a_killed_vision_stage_resumes_to_the_same_tower(vision_overrides, tmp_path, monkeypatch):
    from vlm.config import load_config
    from stages import vision

    config = load_config(REPO / "configs/default.yaml", [*vision_overrides, "vision.feature_cache=false"])
    whole = vision.train(config)["tower"].state_dict()

    killed = load_config(REPO / "configs/default.yaml",
                         [*vision_overrides, "vision.feature_cache=false", "name=killed"])
    save = vision.save_checkpoint

    def save_then_die(checkpoints, step, *args):
        save(checkpoints, step, *args)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(vision, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        vision.train(killed)
    monkeypatch.setattr(vision, "save_checkpoint", save)
    losses = []
    loss = vision.region_loss
    monkeypatch.setattr(vision, "region_loss", lambda *args: losses.append(1) or loss(*args))
    resumed = vision.train(killed)
    assert resumed["steps"] == 6 and len(losses) == 3  # steps 4-6 only: it went on from the checkpoint
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed["tower"].state_dict()[name]), name


def test_sft_on_the_vision_stage_tower_keeps_it_frozen_and_reads_its_feature_cache(vision_overrides, tmp_path,
                                                                                monkeypatch):
    from transformers import CLIPVisionModel

    from vlm.config import load_config
    from stages import sft, vision

    assert vision.main(["configs/default.yaml", *vision_overrides]) == 0
    overrides = [*vision_overrides, "sft.steps=3", "sft.batch_size=4", "sft.save_steps=3", "sft.eval_steps=0",
                 "sft.warmup_steps=0", "data.questions_per_example=1"]

    def no_tower_forward(*args, **kwargs):
        raise AssertionError("the vision tower ran during SFT: the feature cache was not used")

    monkeypatch.setattr(CLIPVisionModel, "forward", no_tower_forward)
    sft.train(load_config(REPO / "configs/default.yaml", overrides))
    before = load_file(tmp_path / "tiny" / "vision" / "final" / "model.safetensors")
    after = load_file(tmp_path / "tiny" / "sft" / "final" / "model.safetensors")
    towers = {k.split("vision_tower.", 1)[1]: v for k, v in after.items() if "vision_tower." in k}
    assert set(towers) == set(before)
    for name, tensor in before.items():
        assert torch.equal(tensor, towers[name]), name
    projector = [v for k, v in after.items() if "multi_modal_projector" in k]
    assert projector  # the projector trained (and exists) while the tower stayed as pretrained


def test_the_default_pipeline_pretrains_vision_right_before_sft():
    import importlib.util

    from vlm.config import STAGES, load_config

    config = load_config(REPO / "configs/default.yaml")
    assert config.stages.index("vision") == config.stages.index("sft") - 1 == 1
    assert config.model.vision_model == str(config.vision_final) and config.sft.freeze_vision
    assert config.data.feature_cache == str(config.vision_features)
    assert list(STAGES)[:3] == ["prep", "vision", "sft"]
    for name, stage in STAGES.items():  # every stage of the table is a module that exists
        assert importlib.util.find_spec(stage.module) is not None, name


def test_bench_seeds_runs_each_seed_on_the_same_data_and_reports_mean_and_sd(tmp_path, monkeypatch):
    from vlm import pipeline
    from bench import seeds

    runs = []

    def fake_run(config, config_path, stages, overrides, force):
        runs.append((config.seed, config.data_dir, config.data.synthetic.get("seed"), stages))
        accuracy = {0: 80.0, 1: 90.0}[config.seed]
        for path, data in ((config.run_dir / "eval" / "sft" / "metrics.json",
                            {"vqa_accuracy": accuracy, "by_question_family": {"exists": accuracy - 10}}),
                           (config.run_dir / "sft" / "metrics.json", {"seconds": 1.5})):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
        return 0

    monkeypatch.setattr(pipeline, "run", fake_run)
    results = [seeds.run_seed(str(REPO / "configs/default.yaml"), [f"output_root={tmp_path}"], s) for s in (0, 1)]
    assert [r[0] for r in runs] == [0, 1]
    assert runs[0][1] == runs[1][1] == tmp_path / "default" / "data"  # one dataset ...
    assert runs[1][2] == 0  # ... generated with the config's seed, not the training seed
    assert (tmp_path / "default" / "eval").is_dir() and (tmp_path / "default-seed1" / "eval").is_dir()
    assert runs[0][3] == ["prep", "vision", "sft", "eval"]
    table = seeds.table(results)
    assert "exists               70.00    80.00    75.00 +-  7.07" in table
    assert "overall              80.00    90.00    85.00 +-  7.07" in table
