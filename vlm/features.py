"""Cached CLIP features: a frozen vision tower runs once per image, training reads its output.

The cache (built by `vqa-rlhf prep features`, data_prep/features.py) stores what the
projector consumes: the vision tower's hidden state at `vision_feature_layer`, CLS
included (the "full" strategy every model here uses). A step that reads it skips image
decoding, preprocessing and the vision forward; the projector still runs and trains.

A cache belongs to the tower that made it. Its signature records the vision config,
the image-processor settings, the feature layer and a hash of the tower's weights; a
model whose signature differs gets an error, never silently stale features.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from vlm.data import ImageCache
from vlm.image_input import FEATURES, llava_of

FORMAT_VERSION = 1

# What decides the features besides the weights. Names, versions and paths do not.
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps")
_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                   "do_normalize", "image_mean", "image_std", "do_convert_rgb")


class FeatureCacheMismatch(ValueError):
    """A feature cache made by another vision tower, processor or feature layer (`details`: what differs)."""

    details = ""


def weights_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def signature(vision_tower, image_processor, feature_layer: int) -> dict:
    config = vision_tower.config.to_dict()
    processor = image_processor.to_dict()
    return json.loads(json.dumps({  # as stored: JSON has lists where the processor has tuples
        "vision_config": {k: config.get(k) for k in _VISION_KEYS},
        "image_processor": {k: processor.get(k) for k in _PROCESSOR_KEYS},
        "feature_layer": feature_layer,
        "select_strategy": "full",
        "weights_sha256": weights_sha256(vision_tower),
    }))


def model_signature(model, processor) -> dict:
    llava = llava_of(model)
    return signature(llava.model.vision_tower, processor.image_processor, llava.config.vision_feature_layer)


class FeatureStore:
    """A finished cache, read through a memory map: `store(image_path)` -> [seq, width] float32.

    It stands in for vlm.data.ImageCache (pixels) when the vision tower is frozen."""

    kind = FEATURES

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no feature cache here (meta.json missing); "
                                    f"build one with `vqa-rlhf prep features`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: cache format {self.meta.get('format')}, expected {FORMAT_VERSION}")
        progress = json.loads((self.path / "progress.json").read_text())
        if progress["done"] < len(self.meta["images"]):
            raise ValueError(f"{self.path}: incomplete cache ({progress['done']} of {len(self.meta['images'])} "
                             f"images); run the same `vqa-rlhf prep features` command again to finish it")
        self.failed: dict[str, str] = progress["failed"]
        self.rows = {image: row for row, image in enumerate(self.meta["images"])}
        self.features = np.load(self.path / "features.npy", mmap_mode="r")

    def check_matches(self, expected: dict, what: str) -> None:
        cached = self.meta["signature"]
        differing = [key for key in expected if cached.get(key) != expected[key]]
        if differing:
            details = "; ".join(f"{key}: cache {cached.get(key)!r} vs model {expected[key]!r}"
                                for key in differing if key != "weights_sha256")
            if "weights_sha256" in differing:
                details = "; ".join(filter(None, [details, "vision tower weights differ"]))
            mismatch = FeatureCacheMismatch(f"feature cache {self.path} does not match {what}: {details}. "
                                            f"Rebuild it for this model, or unset data.feature_cache")
            mismatch.details = details
            raise mismatch

    def __call__(self, image: str) -> torch.Tensor:
        if image in self.failed:
            raise ValueError(f"image {image}: {self.failed[image]} (when the feature cache was built)")
        row = self.rows.get(image)
        if row is None:
            raise ValueError(f"image {image} is not in the feature cache {self.path}")
        return torch.from_numpy(np.array(self.features[row], dtype=np.float32))


def open_for_model(path: str | Path, model, processor, what: str) -> FeatureStore:
    """The cache at `path`, checked against `model`: an error unless it was made by this tower."""
    store = FeatureStore(path)
    store.check_matches(model_signature(model, processor), what)
    return store


def image_source(feature_cache: str | None, data_dir, processor, model, vision_frozen: bool, what: str):
    """Where a stage's batches get their images: the feature cache when one is configured and
    the vision tower is frozen (checked against `model`), else pixels decoded from `data_dir`."""
    if feature_cache and vision_frozen:
        return open_for_model(feature_cache, model, processor, what)
    if feature_cache:
        print(f"note: data.feature_cache is not used by {what}: its vision tower trains", flush=True)
    return ImageCache(processor.image_processor, data_dir)
