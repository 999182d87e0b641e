"""The CLIP feature cache: what it stores, that it resumes, that only its own tower may use it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from vlm import evaluation as evaluate
from vlm.config import load_config
from vlm.data import ImageCache, RejectLog, SupervisedDataset, VLMCollator, caption_items
from vlm.features import FeatureCacheMismatch, FeatureStore, open_for_model
from vlm.generate import answer_questions
from vlm.image_input import FEATURES, vision_features
from vlm.stage_cli import DEFAULT_CONFIG
from data_prep.features import build_cache, dataset_images
from data_prep.features import main as features_main
from stages import sft


@pytest.fixture
def cache_dir(saved_tiny_model, tiny_data_dir, tmp_path):
    out = tmp_path / "features"
    build_cache(str(saved_tiny_model), tiny_data_dir, out, batch_size=16)
    return out


def test_the_cache_holds_every_dataset_image_once_with_what_the_projector_consumes(
        cache_dir, tiny_data_dir, tiny_model, tiny_processor):
    store = FeatureStore(cache_dir)
    images = dataset_images(tiny_data_dir)
    assert store.meta["images"] == images and len(set(images)) == len(images) == 30 + 6 + 6 + 6  # train, val, test, rl
    pixels = ImageCache(tiny_processor.image_processor, tiny_data_dir)
    image = images[7]
    expected = vision_features(tiny_model.model.vision_tower, pixels(image)[None], tiny_model.config.vision_feature_layer)
    assert store(image).shape == (tiny_model.config.image_seq_length, tiny_model.config.vision_config.hidden_size)
    torch.testing.assert_close(store(image), expected[0])


def test_a_forward_on_cached_features_equals_the_forward_on_pixels(cache_dir, tiny_data_dir, tiny_model, tiny_processor):
    store, pixels = FeatureStore(cache_dir), ImageCache(tiny_processor.image_processor, tiny_data_dir)
    records = list(caption_items(
        [{"id": str(i), "image": image, "caption": "a red circle"} for i, image in enumerate(store.meta["images"][:3])],
        load_config(DEFAULT_CONFIG, []).data, "test"))
    dataset_pixels = SupervisedDataset(records, tiny_processor.tokenizer, pixels, tiny_model.config.image_seq_length,
                                       128, RejectLog(None, "error"))
    dataset_cached = SupervisedDataset(records, tiny_processor.tokenizer, store, tiny_model.config.image_seq_length,
                                       128, RejectLog(None, "error"))
    collate = VLMCollator(tiny_processor.tokenizer.pad_token_id)
    on_pixels = collate([dataset_pixels[i] for i in range(3)])
    on_cache = collate([dataset_cached[i] for i in range(3)])
    assert "image_features" in on_cache and "pixel_values" not in on_cache
    with torch.no_grad():
        expected = tiny_model(**on_pixels)
        features = on_cache.pop("image_features")
        got = tiny_model(**on_cache, **FEATURES.model_inputs(tiny_model, features))
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_generation_from_cached_features_gives_the_same_answers(cache_dir, tiny_data_dir, tiny_model, tiny_processor):
    config = load_config(DEFAULT_CONFIG, [])
    from vlm.data import load_split

    records = list(load_split(tiny_data_dir, "vqa", "val"))[:8]
    args = (config.data.prompt_template, config.eval.decoding, 8, 128)
    with_pixels = answer_questions(tiny_model, tiny_processor, records,
                                   ImageCache(tiny_processor.image_processor, tiny_data_dir), *args)
    with_cache = answer_questions(tiny_model, tiny_processor, records, FeatureStore(cache_dir), *args)
    assert with_cache == with_pixels


def test_answers_sampled_for_labeling_from_cached_features_equal_those_from_pixels(
        cache_dir, tiny_data_dir, tiny_model, tiny_processor, monkeypatch):
    from transformers.models.clip import modeling_clip

    from vlm.config import DecodingConfig
    from vlm.data import load_split
    from rewards.sampling import sample_candidates

    config = load_config(DEFAULT_CONFIG, [])
    records = list(load_split(tiny_data_dir, "vqa", "train"))[:6]
    decoding = DecodingConfig(strategy="sample", temperature=1.5, top_p=1.0, max_new_tokens=4)

    def candidates(images):
        torch.manual_seed(0)
        return [c for _, c, _ in sample_candidates(tiny_model, tiny_processor, records, images,
                                                   config.data.prompt_template, 3, decoding, 4, 128, progress=False)]

    with_pixels = candidates(ImageCache(tiny_processor.image_processor, tiny_data_dir))
    monkeypatch.setattr(modeling_clip.CLIPVisionModel, "forward", lambda *a, **k: pytest.fail("the tower ran"))
    assert candidates(FeatureStore(cache_dir)) == with_pixels


def test_an_interrupted_build_resumes_where_it_stopped_and_ends_identical(saved_tiny_model, tiny_data_dir, tmp_path,
                                                                         cache_dir):
    out = tmp_path / "resumed"
    first = build_cache(str(saved_tiny_model), tiny_data_dir, out, batch_size=16, max_batches=1)
    assert first["done"] == 16 and first["encoded_now"] == 16
    with pytest.raises(ValueError, match="incomplete cache"):
        FeatureStore(out)
    second = build_cache(str(saved_tiny_model), tiny_data_dir, out, batch_size=16)
    assert second["encoded_now"] == 48 - 16 and second["done"] == 48  # 30 + 6 + 6 + 6 images (train, val, test, rl)
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(cache_dir / "features.npy"))


def test_a_cache_of_another_model_is_refused_when_building_and_when_training(saved_tiny_model, tiny_data_dir, tmp_path,
                                                                            cache_dir, tiny_model, tiny_processor):
    with torch.no_grad():
        tiny_model.model.vision_tower.embeddings.patch_embedding.weight.add_(0.1)
    with pytest.raises(FeatureCacheMismatch, match="vision tower weights differ"):
        open_for_model(cache_dir, tiny_model, tiny_processor, "the model being trained")
    other = tmp_path / "other-model"
    tiny_model.save_pretrained(other)
    tiny_processor.save_pretrained(other)
    with pytest.raises(SystemExit, match="another model or dataset"):
        build_cache(str(other), tiny_data_dir, cache_dir)


def test_a_cache_made_for_another_feature_layer_or_image_size_is_a_mismatch(cache_dir, tiny_model, tiny_processor):
    tiny_model.config.vision_feature_layer = -2
    with pytest.raises(FeatureCacheMismatch, match="feature_layer"):
        open_for_model(cache_dir, tiny_model, tiny_processor, "model")
    tiny_model.config.vision_feature_layer = -1
    processor = type(tiny_processor.image_processor)(**{**tiny_processor.image_processor.to_dict(),
                                                       "crop_size": {"height": 32, "width": 32}})
    tiny_processor_other = type("P", (), {"image_processor": processor})()
    with pytest.raises(FeatureCacheMismatch, match="image_processor"):
        open_for_model(cache_dir, tiny_model, tiny_processor_other, "model")


def test_unreadable_images_are_recorded_and_become_counted_rejects(saved_tiny_model, tiny_data_dir, tmp_path, tiny_processor):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data_dir)
    broken = dataset_images(data_dir)[3]
    (data_dir / broken).write_bytes(b"not a png")
    out = tmp_path / "features"
    counts = build_cache(str(saved_tiny_model), data_dir, out, batch_size=16)
    assert counts["failed"] == 1
    assert "image unreadable" in json.loads((out / "progress.json").read_text())["failed"][broken]
    rejects = RejectLog(tmp_path / "rejects.jsonl", "skip")
    items = [("q1", "vqa/train", broken, [("USER: <image>\nWhat?\nASSISTANT:", " red")])]
    dataset = SupervisedDataset(items, tiny_processor.tokenizer, FeatureStore(out), 10, 128, rejects)
    assert len(dataset) == 0 and rejects.count == 1
    assert "image unreadable" in json.loads((tmp_path / "rejects.jsonl").read_text())["reason"]


def test_sft_and_eval_use_the_cache_with_a_frozen_tower_and_refuse_a_foreign_one(
        tiny_overrides, saved_tiny_model, tiny_data_dir, cache_dir, tmp_path, capsys):
    overrides = [*tiny_overrides, f"model.checkpoint={saved_tiny_model}", f"data.feature_cache={cache_dir}",
                 "sft.freeze_vision=true", "sft.steps=2", "sft.save_steps=2", "eval.max_samples=8"]
    config = load_config(DEFAULT_CONFIG, overrides)
    metrics = sft.train(config)
    assert metrics["steps"] == 2 and metrics["rejected"] == 0
    # the frozen tower is unchanged, so the cache still matches the trained model
    results = evaluate.evaluate(config, config.run_dir / "sft" / "final", "cached")
    assert results["count"] == 8

    trains_vision = load_config(DEFAULT_CONFIG, [*overrides, "sft.freeze_vision=false", "name=trains-vision"])
    sft.train(trains_vision)
    assert "data.feature_cache is not used" in capsys.readouterr().out
    with pytest.raises(FeatureCacheMismatch):
        evaluate.evaluate(trains_vision, trains_vision.run_dir / "sft" / "final", "stale")


def test_the_command_line_builds_a_cache(saved_tiny_model, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "cli-features"
    assert features_main(["--model", str(saved_tiny_model), "--data", str(tiny_data_dir), "--out", str(out),
                          "--dtype", "float16"]) == 0
    assert "48 of 48 images" in capsys.readouterr().out
    assert np.load(out / "features.npy", mmap_mode="r").dtype == np.float16


def test_a_cache_built_from_a_clip_model_serves_a_vlm_built_on_that_clip(tiny_data_dir, tmp_path):
    """The real-config path: `prep features --model openai/clip-vit-base-patch32 --feature-layer -2`,
    then SFT of a VLM whose vision_model is that CLIP (here a local tiny copy)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    from vlm.config import ModelConfig
    from vlm.model import build_model, build_processor, train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["what color is the circle? red blue"] * 10, 290)
    tokenizer.save_pretrained(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=64)
                    ).save_pretrained(tmp_path / "gpt2")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=48, patch_size=16)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(
        tmp_path / "clip")
    build_cache(str(tmp_path / "clip"), tiny_data_dir, tmp_path / "features", feature_layer=-2)

    config = ModelConfig(text_model=str(tmp_path / "gpt2"), vision_model=str(tmp_path / "clip"), vision_feature_layer=-2)
    processor = build_processor(config)
    model = build_model(config, processor)
    store = open_for_model(tmp_path / "features", model, processor, "the VLM")
    image = store.meta["images"][0]
    pixels = ImageCache(processor.image_processor, tiny_data_dir)(image)
    torch.testing.assert_close(store(image), vision_features(model.model.vision_tower, pixels[None], -2)[0])
    model.config.vision_feature_layer = -1
    with pytest.raises(FeatureCacheMismatch, match="feature_layer"):
        open_for_model(tmp_path / "features", model, processor, "the VLM")
